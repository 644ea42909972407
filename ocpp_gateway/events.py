"""Report station events durably: a Redis stream that the Django side consumes and acks.

Events are queued in memory and written in batches (XADD), so the event loop never waits on
Redis and 1000 stations booting at once cost a handful of round trips. After each write the
Django side is nudged (a Celery task) at most once per interval; if the nudge or Redis fails,
the work is retried: the stream keeps events until a consumer acknowledges them. While Redis
is away the queue is bounded: routine events (status, connect, disconnect) go first, boots
and security events only when nothing else is left to drop.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from ocpp_gateway.envelopes import (
    EVENT_STREAM,
    INGEST_EVENTS_TASK,
    REDIS_CALL_TIMEOUT,
    Event,
    EventKind,
    last_boot_key,
)

logger = logging.getLogger(__name__)

BATCH_SIZE = 500
# A backlog this large means Redis has been away for a while: say so.
BACKLOG_WARNING = 50_000
# About 10 events per station of a 10,000-station gateway; ~50 MB at most.
MAX_BACKLOG = 100_000
# The kinds the Django side can do without: a later event or a reconnect supersedes them.
ROUTINE_KINDS = frozenset({EventKind.STATUS, EventKind.CONNECT, EventKind.DISCONNECT})


class EventReporter:
    def __init__(
        self,
        redis: aioredis.Redis,
        csms: str,
        nudge: Callable[[], None] | None = None,
        *,
        nudge_interval: float = 0.25,
        max_backlog: int = MAX_BACKLOG,
        on_report: Callable[[Event], None] | None = None,
    ) -> None:
        self._redis = redis
        # Sees every event as it is reported (the gateway's metrics count them).
        self._on_report = on_report
        self._csms = csms
        self._nudge = nudge
        self._nudge_interval = nudge_interval
        self._queue: collections.deque[Event] = collections.deque()
        self._has_events = asyncio.Event()
        self._needs_nudge = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._max_backlog = max_backlog
        self.written = 0
        self.dropped = 0
        # Taken out of the queue while being written, so dropping never shifts it.
        self._in_flight = 0

    def report(self, kind: EventKind, station: str, data: dict[str, Any]) -> None:
        event = Event(kind=kind, station=station, csms=self._csms, at=time.time(), data=data)
        if self._on_report is not None:
            self._on_report(event)
        if len(self._queue) + self._in_flight >= self._max_backlog:
            self._drop()
        self._queue.append(event)
        self._idle.clear()
        self._has_events.set()
        if len(self._queue) == BACKLOG_WARNING:
            logger.warning("%d events waiting for Redis", BACKLOG_WARNING)

    def _drop(self) -> None:
        """Make room: the oldest tenth of routine events, else the oldest events at all."""
        want = max(1, self._max_backlog // 10)
        kept: collections.deque[Event] = collections.deque()
        dropped: collections.Counter[str] = collections.Counter()
        count = 0
        for event in self._queue:
            if count < want and event.kind in ROUTINE_KINDS:
                dropped[event.kind] += 1
                count += 1
            else:
                kept.append(event)
        while count < want and kept:
            dropped[kept.popleft().kind] += 1
            count += 1
        self._queue = kept
        self.dropped += count
        logger.error(
            "event backlog full (%d, Redis away): dropped the oldest %s (%d dropped in all)",
            self._max_backlog,
            ", ".join(f"{n} {kind}" for kind, n in sorted(dropped.items())),
            self.dropped,
        )

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
        return len(self._queue) + self._in_flight

    async def _write_pending(self) -> None:
        backoff = 0.1
        while self._queue:
            batch = [self._queue.popleft() for _ in range(min(BATCH_SIZE, len(self._queue)))]
            self._in_flight = len(batch)
            try:
                await self._write(batch)
            except (RedisError, OSError, TimeoutError) as exc:
                self._queue.extendleft(reversed(batch))
                self._in_flight = 0
                if backoff == 0.1:
                    logger.warning("Redis refused %d events (%s); retrying", len(batch), exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            self._in_flight = 0
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
        async with asyncio.timeout(REDIS_CALL_TIMEOUT):
            await pipe.execute()

    async def _nudge_loop(self) -> None:
        assert self._nudge is not None
        backoff = 1.0
        while True:
            await self._needs_nudge.wait()
            self._needs_nudge.clear()
            try:
                # Celery's publish blocks on the broker: keep it off the event loop.
                await asyncio.to_thread(self._nudge)
            except Exception as exc:
                # Redis is away (the usual cause): one line per attempt, not a traceback.
                logger.warning("could not nudge the event consumer (%s); retrying", exc)
                self._needs_nudge.set()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            backoff = 1.0
            await asyncio.sleep(self._nudge_interval)


TaskSender = Callable[..., None]


def celery_sender(broker_url: str) -> TaskSender:
    """send(task_name, *args): tasks by name, so the gateway needs Celery's client, not Django."""
    from celery import Celery

    app = Celery("ocpp_gateway", broker=broker_url)
    app.conf.broker_connection_retry_on_startup = True

    def send(task: str, *args: Any) -> None:
        # The worker takes the message's ignore_result over the task's own (False unless
        # given): without it every ingestion would write a result row.
        app.send_task(task, args=list(args), ignore_result=True)

    return send


def ingest_nudger(send: TaskSender) -> Callable[[], None]:
    return functools.partial(send, INGEST_EVENTS_TASK)
