"""The gateway side of the command bridge.

The gateway subscribes to the command channel of every station it holds, so PUBLISH tells
the sender at once whether any gateway holds the station. Each command runs in its own task:
a slow station never delays commands to another one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from ocpp_gateway.envelopes import (
    REDIS_CALL_TIMEOUT,
    RELAYED_ACTIONS,
    REPLY_TTL_SECONDS,
    Command,
    EnvelopeError,
    Outcome,
    Reply,
    command_channel,
    reply_key,
)

logger = logging.getLogger(__name__)

# At most this many replies in one pipeline (two commands each).
PUSH_BATCH = 500
# Runs a command on the station's session, or returns None when this gateway lost it.
Executor = Callable[[Command], Awaitable[Reply | None]]


class CommandRelay:
    """Keeps the pubsub subscriptions equal to the stations held, whatever Redis does.

    attach/detach only change the wanted set: a station's connection never waits for
    Redis. A reconciler subscribes what is missing once the pubsub connection is up. redis-py
    re-subscribes its known channels on reconnect (also to a restarted, empty Redis) but
    forgets a channel whose SUBSCRIBE failed; the reconciler covers that.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        csms: str,
        execute: Executor,
        allowed_actions: frozenset[str] = frozenset(RELAYED_ACTIONS),
        on_reply: Callable[[str, Reply], None] | None = None,
    ) -> None:
        self._redis = redis
        self._csms = csms
        self._execute = execute
        # Sees each command's action and reply before it is pushed (the gateway's metrics).
        self._on_reply = on_reply
        self._allowed = allowed_actions
        self._pubsub = redis.pubsub()
        self._tasks: set[asyncio.Task[None]] = set()
        # Replies waiting for the pusher task (None when none runs): see _push_outbox.
        self._outbox: list[Reply] = []
        self._pusher: asyncio.Future[None] | None = None
        # A channel of our own keeps the pubsub connection open while no station is held.
        self._own_channel = f"ocpp:gateway:{csms}:{uuid.uuid4()}"
        self._wanted: set[str] = {self._own_channel}
        # Channels to check at the next reconcile; all of them after a reconnect.
        self._dirty: set[str] = set()
        self._check_all = False
        self._changed = asyncio.Event()
        # None until the first attempt: a Redis that is down at start is logged too.
        self.connected: bool | None = None
        self.ready = asyncio.Event()  # set once the pubsub connection is up

    def attach(self, station: str) -> asyncio.Future[None] | None:
        """Subscribe the station's channel; the SUBSCRIBE under way, if Redis is up."""
        channel = command_channel(station)
        self._wanted.add(channel)
        subscribing = None
        if self.connected:
            # Not behind the reconciler's work in progress: a command may follow the boot.
            subscribing = self._spawn(self._subscribe_now(channel))
        # The reconciler checks it too: an UNSUBSCRIBE of an earlier detach may follow ours.
        self._dirty.add(channel)
        self._changed.set()
        return subscribing

    def detach(self, station: str) -> None:
        self._wanted.discard(command_channel(station))
        self._dirty.add(command_channel(station))
        self._changed.set()

    async def run(self) -> None:
        """Receive commands and keep the subscriptions current, until cancelled."""
        reconciler = asyncio.create_task(self._reconcile())
        try:
            await self._receive()
        finally:
            reconciler.cancel()
            await asyncio.gather(reconciler, return_exceptions=True)

    async def _receive(self) -> None:
        while True:
            try:
                if self._pubsub.connection is None:
                    await self._pubsub.subscribe(self._own_channel)  # connects
                message = await self._pubsub.get_message(
                    ignore_subscribe_messages=True, timeout=1.0
                )
            except (RedisError, OSError) as exc:
                # The next get_message reconnects and redis-py re-subscribes what it knows.
                if self.connected is not False:
                    logger.warning("command channel lost (%s); reconnecting", exc)
                self.connected = False
                await asyncio.sleep(0.5)
                continue
            if not self.connected:
                self.connected = True
                self.ready.set()
                self._check_all = True
                self._changed.set()
            if message is None or message["type"] != "message":
                continue
            self._spawn(self._handle(message["data"]))

    async def _subscribe_now(self, channel: str) -> None:
        with contextlib.suppress(RedisError, OSError, TimeoutError):  # the reconciler retries
            async with asyncio.timeout(REDIS_CALL_TIMEOUT):
                await self._pubsub.subscribe(channel)

    async def _reconcile(self) -> None:
        while True:
            await self._changed.wait()
            self._changed.clear()
            connection = self._pubsub.connection
            if not self.connected or connection is None or not connection.is_connected:
                continue  # _receive reconnects, then sets _changed again
            if self._check_all:  # after a reconnect: whatever redis-py knows or forgot
                candidates = self._wanted | {_text(c) for c in self._pubsub.channels}
            else:
                candidates = self._dirty
            self._dirty, self._check_all = set(), False
            missing, extra = [], []
            for channel in candidates:
                key = channel.encode()
                # A channel being unsubscribed counts as gone: a station that reconnected at
                # once is subscribed again, after the UNSUBSCRIBE (Redis keeps the order).
                subscribed = (
                    key in self._pubsub.channels
                    and key not in self._pubsub.pending_unsubscribe_channels
                )
                if channel in self._wanted and not subscribed:
                    missing.append(channel)
                elif channel not in self._wanted and subscribed:
                    extra.append(channel)
            try:
                async with asyncio.timeout(REDIS_CALL_TIMEOUT):
                    for chunk in _chunks(missing):
                        await self._pubsub.subscribe(*chunk)
                    for chunk in _chunks(extra):
                        # Not a station that came back while the subscriptions were sent.
                        chunk = [channel for channel in chunk if channel not in self._wanted]
                        if chunk:
                            await self._pubsub.unsubscribe(*chunk)
            except (RedisError, OSError, TimeoutError) as exc:
                logger.warning("could not update %d subscriptions (%r)", len(candidates), exc)
                if isinstance(exc, TimeoutError):
                    # A write cut short leaves the connection unusable: start it afresh.
                    await connection.disconnect()
                self._dirty |= candidates
                await asyncio.sleep(0.5)
                self._changed.set()
                continue
            if len(missing) >= 100:  # after a reconnect, not one station at a time
                logger.info("subscribed %d stations' command channels", len(missing))

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._pubsub.aclose()

    def _spawn(self, coroutine: Awaitable[None]) -> asyncio.Future[None]:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _handle(self, raw: bytes) -> None:
        try:
            command = Command.from_json(raw)
        except EnvelopeError as exc:
            logger.error("refusing a malformed command: %s", exc)
            await self._refuse_malformed(raw, str(exc))
            return
        if command.csms and command.csms != self._csms:
            reply = self._not_here(command, f"addressed to {command.csms}, not {self._csms}")
        elif command.action not in self._allowed:
            why = (
                f"action {command.action} is not allowed by this gateway"
                " (add it with --allow-action)"
            )
            reply = self._not_here(command, why, Outcome.REJECTED)
        else:
            try:
                reply = await self._execute(command) or self._not_here(
                    command, "the station disconnected from this gateway"
                )
            except Exception as exc:  # never leave the caller waiting for its deadline
                logger.exception("command %s failed in the gateway", command.id)
                reply = self._not_here(command, f"gateway error: {exc!r}", Outcome.REJECTED)
        if self._on_reply is not None:
            self._on_reply(command.action, reply)
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
        """Queue the reply for the pusher, which sends all replies ready in one pipeline."""
        self._outbox.append(reply)
        if self._pusher is None:
            self._pusher = self._spawn(self._push_outbox())

    async def _push_outbox(self) -> None:
        # One pipeline (a write and a read) for all replies that finished in the same turn
        # of the event loop or while the previous pipeline was under way, instead of one
        # each: the pipeline's round trip was a fifth of the gateway's CPU per command.
        try:
            while self._outbox:
                batch = self._outbox[:PUSH_BATCH]
                del self._outbox[:PUSH_BATCH]
                await self._push_batch(batch)
        finally:
            self._pusher = None

    async def _push_batch(self, replies: list[Reply]) -> None:
        for attempt in range(5):
            try:
                pipe = self._redis.pipeline(transaction=False)
                for reply in replies:
                    key = reply_key(reply.command_id)
                    pipe.rpush(key, reply.to_json())
                    pipe.expire(key, REPLY_TTL_SECONDS)
                async with asyncio.timeout(REDIS_CALL_TIMEOUT):
                    await pipe.execute()
                return
            except (RedisError, OSError, TimeoutError) as exc:
                logger.warning("could not push %d replies (%s)", len(replies), exc)
                await asyncio.sleep(0.2 * (attempt + 1))
        for reply in replies:
            logger.error("gave up pushing reply %s; the caller will time out", reply.command_id)


def _text(channel: bytes | str) -> str:
    return channel.decode() if isinstance(channel, bytes) else channel


def _chunks(channels: list[str], size: int = 1000) -> list[list[str]]:
    return [channels[i : i + size] for i in range(0, len(channels), size)]
