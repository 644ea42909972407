"""Report station events durably: a Redis stream that the Django side consumes and acks.

Events are queued in memory and written in batches (XADD), so the event loop never waits on
Redis and 1000 stations booting at once cost a handful of round trips. After each write the
Django side is nudged (a Celery task) at most once per interval; if the nudge or Redis fails,
the work is retried, never dropped: the stream keeps events until a consumer acknowledges them.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from ocpp_gateway.envelopes import EVENT_STREAM, INGEST_EVENTS_TASK, Event, EventKind, last_boot_key

logger = logging.getLogger(__name__)

BATCH_SIZE = 500
# A backlog this large means Redis has been away for a while: say so, keep everything.
BACKLOG_WARNING = 50_000


class EventReporter:
    def __init__(
        self,
        redis: aioredis.Redis,
        csms: str,
        nudge: Callable[[], None] | None = None,
        *,
        nudge_interval: float = 0.25,
    ) -> None:
        self._redis = redis
        self._csms = csms
        self._nudge = nudge
        self._nudge_interval = nudge_interval
        self._queue: collections.deque[Event] = collections.deque()
        self._has_events = asyncio.Event()
        self._needs_nudge = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self.written = 0

    def report(self, kind: EventKind, station: str, data: dict[str, Any]) -> None:
        event = Event(kind=kind, station=station, csms=self._csms, at=time.time(), data=data)
        self._queue.append(event)
        self._idle.clear()
        self._has_events.set()
        if len(self._queue) == BACKLOG_WARNING:
            logger.warning("%d events waiting for Redis", BACKLOG_WARNING)

    async def run(self) -> None:
        """Write queued events until cancelled."""
        nudger = asyncio.create_task(self._nudge_loop()) if self._nudge else None
        try:
            while True:
                await self._has_events.wait()
                await self._write_pending()
        finally:
            if nudger:
                nudger.cancel()

    async def flush(self) -> None:
        """Wait until every queued event is in Redis and the consumer was nudged."""
        await self._idle.wait()
        if self._nudge and self._needs_nudge.is_set():
            await asyncio.to_thread(self._nudge)

    @property
    def backlog(self) -> int:
        return len(self._queue)

    async def _write_pending(self) -> None:
        backoff = 0.1
        while self._queue:
            batch = [self._queue[i] for i in range(min(BATCH_SIZE, len(self._queue)))]
            try:
                await self._write(batch)
            except RedisError as exc:
                logger.warning("Redis refused %d events (%s); retrying", len(batch), exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            for _ in batch:
                self._queue.popleft()
            self.written += len(batch)
            self._needs_nudge.set()
            backoff = 0.1
        self._has_events.clear()
        self._idle.set()

    async def _write(self, batch: list[Event]) -> None:
        pipe = self._redis.pipeline(transaction=False)
        for event in batch:
            pipe.xadd(EVENT_STREAM, {"e": event.to_json()})
            if event.kind is EventKind.BOOT:
                # Verification reads the last boot here, so it never depends on the stream
                # having been consumed yet.
                boot = json.dumps({**event.data, "at": event.at, "event_id": event.id})
                pipe.hset(last_boot_key(event.csms), event.station, boot)
        await pipe.execute()

    async def _nudge_loop(self) -> None:
        assert self._nudge is not None
        while True:
            await self._needs_nudge.wait()
            self._needs_nudge.clear()
            try:
                # Celery's publish blocks on the broker: keep it off the event loop.
                await asyncio.to_thread(self._nudge)
            except Exception:
                logger.exception("could not nudge the event consumer; will retry")
                self._needs_nudge.set()
                await asyncio.sleep(1.0)
            await asyncio.sleep(self._nudge_interval)


def celery_nudger(broker_url: str) -> Callable[[], None]:
    """Send the ingestion task by name: the gateway needs Celery's client, not Django."""
    from celery import Celery

    app = Celery("ocpp_gateway", broker=broker_url)
    app.conf.broker_connection_retry_on_startup = True

    def nudge() -> None:
        app.send_task(INGEST_EVENTS_TASK)

    return nudge
