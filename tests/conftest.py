"""Fixtures that start real servers: Redis, Celery workers and OCPP gateways.

Each server binds 127.0.0.1 on a free port and is stopped by the fixture that started it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.processes import free_port, python, redis_server_binary, running, wait_for


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> Iterator[str]:
    """A private redis-server for the test session (never the machine's shared one)."""
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    args = [
        redis_server_binary(),
        "--bind", "127.0.0.1",
        "--port", str(port),
        "--save", "",
        "--appendonly", "no",
        "--dir", str(workdir),
    ]
    with running(args, log=workdir / "redis.log"):
        url = f"redis://127.0.0.1:{port}/0"
        client = redis.Redis.from_url(url)
        wait_for(lambda: _pings(client), 10, "redis-server to answer")
        yield url


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


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
def celery_worker(transactional_db, redis_client, redis_url, tmp_path) -> Iterator[Path]:
    """A real `celery -A fleet worker` (2 prefork children) on this test's Redis and DB.

    Yields the path of its log file.
    """
    log = tmp_path / "worker.log"
    args = python(
        "-m", "celery", "-A", "fleet", "worker", "--concurrency", "2",
        "--loglevel", "INFO", "--without-mingle", "--without-gossip",
        "--hostname", f"test-{os.getpid()}@%h",
    )
    with running(args, env=process_env(redis_url), log=log):
        wait_for(lambda: b"ready." in log.read_bytes(), 30, "the celery worker to be ready")
        yield log


@pytest.fixture
def start_gateway(redis_client, redis_url, tmp_path):
    """Start `python -m ocpp_gateway --csms NAME` on a free port; returns its ws base URL."""
    from contextlib import ExitStack

    from tests.processes import port_open

    with ExitStack() as stack:

        def start(csms: str, *extra: str) -> str:
            port = free_port()
            log = tmp_path / f"gateway-{csms}.log"
            args = python(
                "-m", "ocpp_gateway", "--csms", csms, "--host", "127.0.0.1",
                "--port", str(port), *extra,
            )
            stack.enter_context(running(args, env={"REDIS_URL": redis_url}, log=log))
            wait_for(lambda: port_open(port), 15, f"gateway {csms} to listen")
            return f"ws://127.0.0.1:{port}/ocpp"

        yield start
