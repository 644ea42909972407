"""Fixtures that start real servers: Redis, Celery workers and OCPP gateways.

Each server binds 127.0.0.1 on a free port and is stopped by the fixture that started it.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from devstack.processes import free_port, gateway, gateway_listening, redis_server, worker

# The ocpp library logs every frame at INFO: a failing test's output would be all frames.
logging.getLogger("ocpp").setLevel(logging.WARNING)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> Iterator[str]:
    """A private redis-server for the test session (never the machine's shared one)."""
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    with redis_server(port, workdir, log=workdir / "redis.log"):
        url = f"redis://127.0.0.1:{port}/0"
        # Tasks this process sends (services enqueue on commit) must reach the test's
        # workers: point the project's Celery app at this server before its first use.
        # By its CELERY_ name: the app reads Django's settings under that namespace, and a
        # plain broker_url would be ignored (tasks would go to the machine's own Redis).
        from fleet.celery import app

        app.conf["CELERY_BROKER_URL"] = url
        yield url


@pytest.fixture
def redis_client(redis_url, settings) -> Iterator[redis.Redis]:
    """A clean Redis for each test; Django's settings point at it too."""
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    settings.REDIS_URL = redis_url
    yield client
    client.close()


def process_env(redis_url: str) -> dict[str, str]:
    """Environment for a child process that must share this test's Redis and database."""
    from django.db import connection

    env = {"REDIS_URL": redis_url, "DJANGO_SETTINGS_MODULE": "fleet.settings", "DEBUG": "1"}
    db = connection.settings_dict
    if db["ENGINE"] == "django.db.backends.sqlite3":
        env["DATABASE_URL"] = f"sqlite:///{db['NAME']}"
    else:
        env["DATABASE_URL"] = (
            f"postgres://{db['USER']}:{db['PASSWORD']}@{db['HOST'] or '127.0.0.1'}:"
            f"{db['PORT'] or 5432}/{db['NAME']}"
        )
    return env


@pytest.fixture
def start_worker(transactional_db, redis_client, redis_url, tmp_path):
    """Start real `celery -A fleet worker` processes on this test's Redis and database.

    start_worker(name, beat=False, concurrency=2, **env) -> (Popen, log path). Every worker
    is stopped at the end of the test; a test may also kill one itself.
    """
    with contextlib.ExitStack() as stack:

        def start(name: str = "w1", *, beat: bool = False, concurrency: int = 2, **env: str):
            log = tmp_path / f"worker-{name}.log"
            proc = stack.enter_context(
                worker(
                    name,
                    env={**process_env(redis_url), **env},
                    log=log,
                    concurrency=concurrency,
                    beat_schedule=tmp_path / f"beat-{name}" if beat else None,
                    # Killed when the test ends: what it was doing no longer matters, and a
                    # warm shutdown would cost every test with a worker 1.5-2.5 s.
                    stop_timeout=0,
                )
            )
            return proc, log

        yield start


@pytest.fixture
def celery_worker(start_worker) -> Path:
    """One real worker (2 prefork children); yields the path of its log file."""
    _, log = start_worker()
    return log


class GatewayStarter:
    """``start_gateway(csms, *extra, redis=None, port=None, wait=True)``: start
    `python -m ocpp_gateway --csms NAME *extra` on a free port; its ws base URL.

    The gateway admits only the stations registered on its CSMS (the registry in Redis):
    a test that is not about admission passes "--open". ``redis`` replaces this test's
    Redis URL (e.g. a server with a password); ``port`` restarts a killed gateway in place.
    With wait=False it returns at once, and ``listening(url)`` waits for it later (a stack
    starts its worker meanwhile).
    """

    def __init__(self, stack: contextlib.ExitStack, redis_url: str, tmp_path: Path) -> None:
        self._stack, self._redis_url, self._tmp_path = stack, redis_url, tmp_path
        self._starting: dict[str, tuple[subprocess.Popen, str, int, Path]] = {}

    def __call__(
        self, csms: str, *extra: str, redis: str | None = None, port: int | None = None,
        wait: bool = True,
    ) -> str:  # fmt: skip
        port = port or free_port()
        log = self._tmp_path / f"gateway-{csms}.log"
        env = {"REDIS_URL": redis or self._redis_url}
        proc = self._stack.enter_context(gateway(csms, port, *extra, env=env, log=log, wait=wait))
        url = f"ws://127.0.0.1:{port}/ocpp"
        if not wait:
            self._starting[url] = (proc, csms, port, log)
        return url

    def listening(self, url: str) -> None:
        gateway_listening(*self._starting.pop(url))


@pytest.fixture
def start_gateway(redis_client, redis_url, tmp_path) -> Iterator[GatewayStarter]:
    """A GatewayStarter; every gateway it started is stopped at the end of the test."""
    with contextlib.ExitStack() as stack:
        yield GatewayStarter(stack, redis_url, tmp_path)
