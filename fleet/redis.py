"""The Django side's Redis client: one per process and URL, shared by every caller."""

from __future__ import annotations

import threading

import redis
from django.conf import settings

_clients: dict[str, redis.Redis] = {}
_lock = threading.Lock()


def get_redis() -> redis.Redis:
    """The client for settings.REDIS_URL.

    Keyed by URL so that a changed setting (tests point it at a private server) gets its own
    client. redis-py's pool notices a fork and reconnects, so Celery's prefork children can
    share what the parent created.
    """
    url = settings.REDIS_URL
    client = _clients.get(url)
    if client is None:
        with _lock:
            client = _clients.get(url)
            if client is None:
                # Every wait on Redis has a deadline: a stalled server must fail the task
                # (which is retried) rather than hang a worker forever.
                client = redis.Redis.from_url(
                    url,
                    socket_connect_timeout=5,
                    # Longer than the longest command wait (a BLPOP for the reply).
                    socket_timeout=settings.OCPP_COMMAND_TIMEOUT + 30,
                    health_check_interval=30,
                )
                _clients[url] = client
    return client


def as_text(value: bytes | str) -> str:
    """A reply item as text: this client returns bytes (no decode_responses), which
    redis-py's types cannot tell from str."""
    return value.decode() if isinstance(value, bytes) else value
