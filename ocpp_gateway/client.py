"""The sending side of the command bridge, for the Django side (plain, synchronous Python)."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, cast

import redis

from ocpp_gateway.envelopes import (
    REPLY_TTL_SECONDS,
    Command,
    Outcome,
    Reply,
    claim_key,
    command_channel,
    new_command_id,
    reply_key,
)

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

# How long past the deadline to wait for the gateway's own "timeout" reply, which carries
# its timing; after that the caller reports the timeout itself.
REPLY_GRACE_SECONDS = 1.0
# The Redis server a claim was taken on: its run id (new at every start) and its replication
# id (new at every promotion). A claim taken on another server, or before a restart, may
# have lost its later marks (published, revoked) with the writes the restart or failover
# lost: it is never published, and never taken back.
_SERVER_LUA = """
redis.replicate_commands()
local function server()
  local run = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')
  local replication = string.match(redis.call('INFO', 'replication'), 'master_replid:(%x+)')
  return 'claimed:' .. run .. ':' .. replication
end
"""
_CLAIM = (
    _SERVER_LUA
    + """
redis.call('SET', KEYS[1], server(), 'EX', ARGV[1])
return 1
"""
)
# PUBLISH the command and, when no gateway received it, leave a mark in its reply list, so
# that the BLPOP sent behind it returns at once: one round trip to Redis for a command, not
# two (on a busy host each round trip also waits for Redis to be scheduled; the PUBLISH's
# own took as long as the station's answer). EVAL, not EVALSHA: a Redis that restarted
# has no script cache, and a failed first command would leave the BLPOP blocking.
# KEYS[3], for a claimed command only: its claim, then marked as published to nobody.
_PUBLISH_OR_MARK = """
local receivers = redis.call('PUBLISH', KEYS[1], ARGV[1])
if receivers == 0 then
  redis.call('RPUSH', KEYS[2], ARGV[2])
  redis.call('EXPIRE', KEYS[2], ARGV[3])
  if KEYS[3] then redis.call('SET', KEYS[3], 'nobody', 'KEEPTTL') end
end
return receivers
"""
# A claimed command (KEYS[3], its claim) is published only while its claim stands, and the
# claim then says it was: published, or published to nobody. Not published: -1 when the
# claim was taken back (by a run that then sends the command, or stops the station), -2
# when it does not stand on this server (expired, or taken before a restart or failover: it
# is revoked here, so that it can never be published, and the sender may claim anew), -3
# when it was published already (a second publish of one id: never sent twice). A script
# of its own: the server look-up stays off every other command's path.
_PUBLISH_CLAIMED = (
    _SERVER_LUA
    + """
local claim = redis.call('GET', KEYS[3])
if claim ~= server() then
  redis.call('RPUSH', KEYS[2], ARGV[2])
  redis.call('EXPIRE', KEYS[2], ARGV[3])
  if claim == 'revoked' then return -1 end
  if claim == 'published' or claim == 'nobody' then return -3 end
  if claim then redis.call('SET', KEYS[3], 'revoked', 'KEEPTTL') end
  return -2
end
redis.call('SET', KEYS[3], 'published', 'KEEPTTL')
"""
    + _PUBLISH_OR_MARK
)
# Take a claim back if its command never reached a gateway: 1 when it did not (and now
# never will), 0 when it may have, or when nothing can tell (expired, another server's).
_REVOKE = (
    _SERVER_LUA
    + """
local claim = redis.call('GET', KEYS[1])
if claim == server() then
  redis.call('SET', KEYS[1], 'revoked', 'KEEPTTL')
  return 1
end
if claim == 'revoked' or claim == 'nobody' then return 1 end
return 0
"""
)
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


class CommandRevoked(CommandNotSent):
    """The command's claim was taken back (revoke_command) before it was published."""


class ClaimLapsed(CommandNotSent):
    """The command's claim does not stand on this Redis server (it expired, or was taken
    before a restart or failover): not published, and now never will be."""


class ClaimRefused(Exception):
    """Redis refused to claim a command (an ACL without EVAL or INFO): nothing was claimed,
    nothing sent. Not a RedisError: retrying will not help."""


class StationOffline(Exception):
    """No gateway holds a connection to the station."""

    def __init__(self, station: str) -> None:
        super().__init__(f"station {station} is offline: no gateway holds its connection")
        self.station = station


def claim_command(client: redis.Redis, *, ttl: float) -> str:
    """A new command id, claimed for a command that must reach a station at most once.

    Sent with ``send_command(..., claimed_id=...)``, the command is published only while
    the claim stands. Whoever finds the sender gone takes it back with revoke_command: if
    that succeeds the command never reached a gateway and now never will, so it may be sent
    again under a new claim. ``ttl``: how long the claim is kept (past any such look).
    """
    command_id = new_command_id()
    try:
        client.eval(_CLAIM, 1, claim_key(command_id), max(1, math.ceil(ttl)))
    except redis.ResponseError as exc:
        # Not an outage to wait out: this Redis user may not run the claim (EVAL, INFO).
        raise ClaimRefused(f"Redis refused the claim of a command: {exc}") from exc
    return command_id


def revoke_command(client: redis.Redis, command_id: str) -> bool:
    """Take a claimed command back: True when it never reached a gateway, and now never will.

    False when it may have been sent, and when nothing can tell (the claim expired, or
    Redis restarted or failed over since it was taken and may have lost that it was
    published).
    """
    return bool(client.eval(_REVOKE, 1, claim_key(command_id)))


def send_command(
    client: redis.Redis,
    station: str,
    request: DataclassInstance,
    *,
    timeout: float,
    csms: str = "",
    claimed_id: str = "",
) -> Reply:
    """Send one OCPP call (an ocpp.v16.call dataclass, e.g. ``call.GetConfiguration()``) to
    a station and wait for the outcome (``reply.result(call_result.GetConfiguration)``).

    Raises StationOffline at once when no gateway holds the station, CommandNotSent when
    the command could not even be published, and other redis errors when the wait for the
    reply failed (the command may have been sent). Otherwise returns the Reply: a result payload,
    a CALLERROR with its code, or a timeout. With ``csms``, only a gateway of that CSMS
    sends it. With ``claimed_id`` (claim_command), the command has that id and is published
    only while its claim stands (CommandRevoked when it was taken back, ClaimLapsed when it
    does not stand on this Redis server). The client must not have a socket timeout
    shorter than ``timeout``.
    """
    command = Command.calling(
        station, request, deadline=time.time() + timeout, csms=csms, command_id=claimed_id
    )
    receivers, popped = _publish_and_wait(client, command, claimed=bool(claimed_id))
    if receivers == -1:
        raise CommandRevoked(f"command {command.id} not published: its claim was taken back")
    if receivers == -2:
        raise ClaimLapsed(
            f"command {command.id} not published: its claim does not stand on this Redis "
            "server (expired, or taken before a restart or failover)"
        )
    if receivers < 0:
        raise redis.RedisError(f"command {command.id} was published before: not sent again")
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


def _publish_and_wait(
    client: redis.Redis, command: Command, *, claimed: bool
) -> tuple[int, Popped]:
    """The PUBLISH (with the mark) and the first BLPOP, written together on one connection:
    the number of gateways that received the command (below 0: its claim did not stand), and
    what the BLPOP popped.

    Not through redis-py's retrying commands: a pipeline retried after the PUBLISH would
    publish again (a second Reset). A failure before the PUBLISH's answer was read is
    CommandNotSent only when nothing can have reached Redis; once it was read, a lost
    connection only ends this wait, and the rest is waited for with the retrying BLPOP.
    """
    key = reply_key(command.id)
    keys = (command_channel(command.station), key, *([claim_key(command.id)] if claimed else []))
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
                            _PUBLISH_CLAIMED if claimed else _PUBLISH_OR_MARK,
                            len(keys),
                            *keys,
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
            # The read dropped the connection already. Not published: no reply to wait for.
            return receivers, _wait_more(client, command) if receivers > 0 else None
    except BaseException:
        connection.disconnect()
        raise
    finally:
        pool.release(pooled)
    if receivers <= 0:
        return receivers, None
    return receivers, (popped[0], popped[1]) if popped else None


def _wait_more(client: redis.Redis, command: Command) -> Popped:
    # The sync client's BLPOP: (key, value) or None; redis-py types it for both clients.
    return cast(Popped, client.blpop([reply_key(command.id)], timeout=_reply_wait(command)))


def _reply_wait(command: Command) -> float:
    return max(command.remaining() + REPLY_GRACE_SECONDS, 0.01)
