"""The gateway side of the command bridge.

The gateway subscribes to the command channel of every station it holds, so PUBLISH tells
the sender at once whether any gateway holds the station. Each command runs in its own task:
a slow station never delays commands to another one.
"""

from __future__ import annotations

import asyncio
import json
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
        try:
            await self._pubsub.unsubscribe(command_channel(station))
        except RedisError as exc:
            # The subscription dies with the connection; a command meanwhile gets the
            # "disconnected" answer, since the station is no longer registered.
            logger.warning("could not unsubscribe %s (%s)", station, exc)

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
            logger.error("refusing a malformed command: %s", exc)
            await self._refuse_malformed(raw, str(exc))
            return
        if command.csms and command.csms != self._csms:
            reply = self._not_here(command, f"addressed to {command.csms}, not {self._csms}")
        else:
            try:
                reply = await self._execute(command) or self._not_here(
                    command, "the station disconnected from this gateway"
                )
            except Exception as exc:  # never leave the caller waiting for its deadline
                logger.exception("command %s failed in the gateway", command.id)
                reply = self._not_here(command, f"gateway error: {exc!r}", Outcome.REJECTED)
        await self._push(reply)

    def _not_here(
        self, command: Command, why: str, outcome: Outcome = Outcome.DISCONNECTED
    ) -> Reply:
        """A reply for a command this gateway did not send to the station."""
        return Reply(
            command_id=command.id,
            station=command.station,
            csms=self._csms,
            outcome=outcome,
            error_description=why,
            sent=False,
        )

    async def _refuse_malformed(self, raw: bytes, why: str) -> None:
        try:
            data = json.loads(raw)
        except ValueError:
            return  # no id to answer to
        if isinstance(data, dict) and isinstance(data.get("id"), str):
            reply = Reply(
                command_id=data["id"],
                station=str(data.get("station", "")),
                csms=self._csms,
                outcome=Outcome.REJECTED,
                error_description=f"malformed command: {why}",
                sent=False,
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
