"""The sending side of the command bridge, for the Django side (plain, synchronous Python)."""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING

import redis

from ocpp_gateway.envelopes import Command, Outcome, Reply, command_channel, reply_key

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

# How long past the deadline to wait for the gateway's own "timeout" reply, which carries
# its timing; after that the caller reports the timeout itself.
REPLY_GRACE_SECONDS = 1.0


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
    try:
        receivers = client.publish(command_channel(station), command.to_json())
    except redis.RedisError as exc:
        raise CommandNotSent(f"command not published: {exc}") from exc
    if receivers == 0:
        raise StationOffline(station)
    key = reply_key(command.id)
    sent_anywhere = False
    while True:
        wait = max(command.remaining() + REPLY_GRACE_SECONDS, 0.01)
        popped = client.blpop([key], timeout=wait)
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
            continue
        if sent_anywhere and not reply.sent:
            # One gateway may have sent it before losing the station: a Reset must not be
            # taken as unsent and sent again.
            return dataclasses.replace(reply, sent=True)
        return reply
