"""A redis-server of a test's own, for tests that kill, restart or password-protect it."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import redis

from tests.processes import redis_server_binary, running, wait_for


def pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


@contextlib.contextmanager
def redis_server(port: int, workdir: Path, *extra: str) -> Iterator[subprocess.Popen]:
    """redis-server on 127.0.0.1:port without persistence (a restart starts empty)."""
    args = [redis_server_binary(), "--bind", "127.0.0.1", "--port", str(port), "--save", "",
            "--appendonly", "no", "--dir", str(workdir), *extra]  # fmt: skip
    password = extra[extra.index("--requirepass") + 1] if "--requirepass" in extra else None
    with running(args, log=workdir / f"redis-{port}.log") as proc:
        client = redis.Redis(port=port, password=password)
        wait_for(lambda: pings(client), 10, f"redis-server on port {port} to answer")
        client.close()
        yield proc
