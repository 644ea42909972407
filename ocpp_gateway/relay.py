"""The gateway side of the command bridge.

The gateway subscribes to the command channel of every station it holds, so PUBLISH tells
the sender at once whether any gateway holds the station. Each command runs in its own task:
a slow station never delays commands to another one.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from ocpp_gateway.envelopes import (
    REPLY_TTL_SECONDS,
    Command,
    EnvelopeError,
    Outcome,
    Reply,
    command_channel,
    reply_key,
)

logger = logging.getLogger(__name__)

# Runs a command on the station's session, or returns None when this gateway lost it.
Executor = Callable[[Command], Awaitable[Reply | None]]


class CommandRelay:
    def __init__(self, redis: aioredis.Redis, csms: str, execute: Executor) -> None:
        self._redis = redis
        self._csms = csms
        self._execute = execute
        self._pubsub = redis.pubsub()
        self._tasks: set[asyncio.Task] = set()
        # A channel of our own keeps the pubsub connection open while no station is held.
        self._own_channel = f"ocpp:gateway:{csms}:{uuid.uuid4()}"

    async def start(self) -> None:
        await self._pubsub.subscribe(self._own_channel)

    async def attach(self, station: str) -> None:
        await self._pubsub.subscribe(command_channel(station))

    async def detach(self, station: str) -> None:
        await self._pubsub.unsubscribe(command_channel(station))

    async def run(self) -> None:
        """Receive commands until cancelled."""
        while True:
            try:
                message = await self._pubsub.get_message(
                    ignore_subscribe_messages=True, timeout=1.0
                )
            except RedisError as exc:
                # redis-py reconnects and re-subscribes on the next call.
                logger.warning("command channel lost (%s); reconnecting", exc)
                await asyncio.sleep(0.5)
                continue
            if message is None or message["type"] != "message":
                continue
            self._spawn(self._handle(message["data"]))

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._pubsub.aclose()

    def _spawn(self, coroutine: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, raw: bytes) -> None:
        try:
            command = Command.from_json(raw)
        except EnvelopeError as exc:
            logger.error("dropping a malformed command: %s", exc)
            return
        reply = await self._execute(command)
        if reply is None:
            reply = Reply(
                command_id=command.id,
                station=command.station,
                csms=self._csms,
                outcome=Outcome.DISCONNECTED,
                error_description="the station disconnected from this gateway",
            )
        await self._push(reply)

    async def _push(self, reply: Reply) -> None:
        key = reply_key(reply.command_id)
        for attempt in range(5):
            try:
                pipe = self._redis.pipeline(transaction=False)
                pipe.rpush(key, reply.to_json())
                pipe.expire(key, REPLY_TTL_SECONDS)
                await pipe.execute()
                return
            except RedisError as exc:
                logger.warning("could not push reply %s (%s)", reply.command_id, exc)
                await asyncio.sleep(0.2 * (attempt + 1))
        logger.error("gave up pushing reply %s; the caller will time out", reply.command_id)
