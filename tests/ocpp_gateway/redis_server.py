"""A redis-server of a test's own, for tests that kill, restart or password-protect it."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import redis

from tests.processes import redis_pings, redis_server_args, running, wait_for


@contextlib.contextmanager
def redis_server(port: int, workdir: Path, *extra: str) -> Iterator[subprocess.Popen]:
    """redis-server on 127.0.0.1:port without persistence (a restart starts empty)."""
    args = redis_server_args(port, workdir, *extra)
    password = extra[extra.index("--requirepass") + 1] if "--requirepass" in extra else None
    with running(args, log=workdir / f"redis-{port}.log") as proc:
        client = redis.Redis(port=port, password=password)
        wait_for(lambda: redis_pings(client), 10, f"redis-server on port {port} to answer")
        client.close()
        yield proc
