"""The sending side of the command bridge, for the Django side (plain, synchronous Python)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, cast

import redis

from ocpp_gateway.envelopes import (
    REPLY_TTL_SECONDS,
    Command,
    Outcome,
    Reply,
    command_channel,
    reply_key,
)

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

# How long past the deadline to wait for the gateway's own "timeout" reply, which carries
# its timing; after that the caller reports the timeout itself.
REPLY_GRACE_SECONDS = 1.0
# PUBLISH the command and, when no gateway received it, leave a mark in its reply list, so
# that the BLPOP sent behind it returns at once: one round trip to Redis for a command, not
# two (on a busy host each round trip also waits for Redis to be scheduled; the PUBLISH's
# own took as long as the station's answer). EVAL, not EVALSHA: a Redis that restarted
# has no script cache, and a failed first command would leave the BLPOP blocking.
_PUBLISH_OR_MARK = """
local receivers = redis.call('PUBLISH', KEYS[1], ARGV[1])
if receivers == 0 then
  redis.call('RPUSH', KEYS[2], ARGV[2])
  redis.call('EXPIRE', KEYS[2], ARGV[3])
end
return receivers
"""
_NO_RECEIVER = b"\x00no receiver"
Popped = tuple[bytes, bytes] | None


class _Connection(Protocol):
    """The part of a redis-py connection used here (redis-py leaves it untyped)."""

    def pack_commands(self, commands: Sequence[Sequence[object]]) -> list[bytes]: ...
    def send_packed_command(self, command: list[bytes]) -> None: ...
    def read_response(self) -> Any: ...
    def disconnect(self) -> None: ...


class CommandNotSent(redis.RedisError):
    """Redis refused the PUBLISH: no gateway received the command, so none sent it.

    Any other Redis error from send_command came after the publish, when the command may
    already be on its way to the station (a Reset must then not be sent again).
    """


class StationOffline(Exception):
    """No gateway holds a connection to the station."""

    def __init__(self, station: str) -> None:
        super().__init__(f"station {station} is offline: no gateway holds its connection")
        self.station = station


def send_command(
    client: redis.Redis,
    station: str,
    request: DataclassInstance,
    *,
    timeout: float,
    csms: str = "",
) -> Reply:
    """Send one OCPP call (an ocpp.v16.call dataclass, e.g. ``call.GetConfiguration()``) to
    a station and wait for the outcome (``reply.result(call_result.GetConfiguration)``).

    Raises StationOffline at once when no gateway holds the station, CommandNotSent when
    the command could not even be published, and other redis errors when the wait for the
    reply failed (the command may have been sent). Otherwise returns the Reply: a result payload,
    a CALLERROR with its code, or a timeout. With ``csms``, only a gateway of that CSMS
    sends it. The client must not have a socket timeout shorter than ``timeout``.
    """
    command = Command.calling(station, request, deadline=time.time() + timeout, csms=csms)
    receivers, popped = _publish_and_wait(client, command)
    if receivers == 0:
        raise StationOffline(station)
    sent_anywhere = False
    while True:
        if popped is None:
            return Reply(
                command_id=command.id,
                station=station,
                csms="",
                outcome=Outcome.TIMEOUT,
                error_description=f"no gateway replied within {timeout:.1f}s",
            )
        reply = Reply.from_json(popped[1])
        # A gateway holding a stale connection answers "disconnected"; the one holding the
        # live connection may still answer.
        if reply.outcome is Outcome.DISCONNECTED and receivers > 1:
            receivers -= 1
            sent_anywhere = sent_anywhere or reply.sent
            popped = _wait_more(client, command)
            continue
        if sent_anywhere and not reply.sent:
            # One gateway may have sent it before losing the station: a Reset must not be
            # taken as unsent and sent again.
            return dataclasses.replace(reply, sent=True)
        return reply


def _publish_and_wait(client: redis.Redis, command: Command) -> tuple[int, Popped]:
    """The PUBLISH (with the mark) and the first BLPOP, written together on one connection:
    the number of gateways that received the command, and what the BLPOP popped.

    Not through redis-py's retrying commands: a pipeline retried after the PUBLISH would
    publish again (a second Reset). A failure before the PUBLISH's answer was read is
    CommandNotSent only when nothing can have reached Redis; once it was read, a lost
    connection only ends this wait, and the rest is waited for with the retrying BLPOP.
    """
    key = reply_key(command.id)
    pool = client.connection_pool
    try:
        pooled = pool.get_connection()
    except redis.RedisError as exc:
        raise CommandNotSent(f"command not published: {exc}") from exc
    connection = cast(_Connection, pooled)
    try:
        try:
            connection.send_packed_command(
                connection.pack_commands(
                    [
                        (
                            "EVAL",
                            _PUBLISH_OR_MARK,
                            2,
                            command_channel(command.station),
                            key,
                            command.to_json(),
                            _NO_RECEIVER,
                            REPLY_TTL_SECONDS,
                        ),
                        ("BLPOP", key, _reply_wait(command)),
                    ]
                )
            )
        except redis.RedisError as exc:
            # A few hundred bytes to a socket that failed: none of it reached Redis.
            raise CommandNotSent(f"command not published: {exc}") from exc
        try:
            receivers = int(connection.read_response())
        except redis.ResponseError as exc:
            # Redis refused the script, so nothing was published; the BLPOP behind it
            # must not block: the connection is dropped (below), which ends it.
            raise CommandNotSent(f"command not published: {exc}") from exc
        # Any other error here: Redis may have published it (the caller counts it as sent).
        try:
            popped = connection.read_response()
        except (redis.ConnectionError, redis.TimeoutError):
            # The read dropped the connection already.
            return receivers, _wait_more(client, command)
    except BaseException:
        connection.disconnect()
        raise
    finally:
        pool.release(pooled)
    if receivers == 0:
        return 0, None
    return receivers, (popped[0], popped[1]) if popped else None


def _wait_more(client: redis.Redis, command: Command) -> Popped:
    # The sync client's BLPOP: (key, value) or None; redis-py types it for both clients.
    return cast(Popped, client.blpop([reply_key(command.id)], timeout=_reply_wait(command)))


def _reply_wait(command: Command) -> float:
    return max(command.remaining() + REPLY_GRACE_SECONDS, 0.01)
