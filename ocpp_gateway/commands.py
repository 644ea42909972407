"""Running one relayed Command on a station: the part both session kinds share.

A StationSession (endpoint mode) and a ProxySession (proxy mode) differ only in how a CALL
frame reaches the station and its answer comes back (the ``Exchange``); refusing a command
the station may not get, building and validating the CALL, the deadline and turning the
answer into a Reply are the same, and live here once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

# The library's own camelCase <-> snake_case conversion (public functions of its
# charge_point module, what ChargePoint.call() applies): the same wire names as its stations.
from ocpp.charge_point import camel_to_snake_case, snake_to_camel_case
from ocpp.exceptions import OCPPError
from ocpp.messages import Call, CallError, CallResult, validate_payload
from websockets.exceptions import ConnectionClosed

from ocpp_gateway.envelopes import Command, EnvelopeError, Outcome, Reply, payload_of
from ocpp_gateway.registry import BootStatus

OCPP_VERSION = "1.6"


class Progress:
    """How far one command got: whether its frame was handed to the socket."""

    sent = False


# Sends the CALL to the station and returns its answer; sets progress.sent once the frame
# may have reached the station. Bounded by the caller's deadline (it may be cancelled).
Exchange = Callable[[Command, Call, Progress], Awaitable[CallResult | CallError]]


class CommandTarget(Protocol):
    """What a Reply says about the session that ran the command."""

    id: str
    csms: str
    boot_status: BootStatus | None
    boot_hardware: dict[str, str] | None


async def run_command(
    command: Command, target: CommandTarget, exchange: Exchange, *, unique_id: str | None = None
) -> Reply:
    """Send one OCPP call through ``exchange`` and describe what came back; never raises.

    ``unique_id`` is the CALL's message id on the wire (default: the command's id).
    """
    started = time.time()

    def reply(outcome: Outcome, **fields: Any) -> Reply:
        return Reply(
            command_id=command.id,
            station=target.id,
            csms=target.csms,
            outcome=outcome,
            sent_at=started,
            finished_at=time.time(),
            boot=target.boot_hardware,
            **fields,
        )

    if target.boot_status in (BootStatus.REJECTED, BootStatus.PENDING):
        # Nothing that answers through a station this CSMS has not accepted may count
        # as the station being here (the migration's confirmation asks exactly that).
        return reply(
            Outcome.REJECTED,
            error_description=f"station not accepted by this CSMS ({target.boot_status})",
            sent=False,
        )
    try:
        request = command.request()
    except EnvelopeError as exc:
        return reply(Outcome.REJECTED, error_description=str(exc), sent=False)
    remaining = command.remaining()
    if remaining <= 0:
        return reply(
            Outcome.TIMEOUT, error_description="deadline passed before sending", sent=False
        )
    progress = Progress()
    try:
        message = Call(
            unique_id=unique_id or command.id,
            action=command.action,
            payload=snake_to_camel_case(payload_of(request)),
        )
        await validate_payload(message, OCPP_VERSION)
        async with asyncio.timeout(remaining):
            response = await exchange(command, message, progress)
    except TimeoutError:
        waited = "no answer" if progress.sent else "not sent: the station was busy"
        return reply(
            Outcome.TIMEOUT,
            error_description=f"{waited} within {remaining:.1f}s",
            sent=progress.sent,
        )
    except OCPPError as exc:
        # Raised by validating our own request: nothing was sent.
        return reply(
            Outcome.REJECTED, error_description=f"{error_code(exc)}: {exc.description}", sent=False
        )
    except (ConnectionError, ConnectionClosed) as exc:
        return reply(
            Outcome.DISCONNECTED,
            error_description=str(exc) or "connection lost",
            sent=progress.sent,
        )
    if isinstance(response, CallError):
        return reply(
            Outcome.CALL_ERROR,
            error_code=response.error_code,
            error_description=response.error_description or "",
        )
    response.action = command.action
    try:
        await validate_payload(response, OCPP_VERSION)
    except OCPPError as exc:
        return reply(
            Outcome.BAD_RESPONSE,
            payload=response.payload,
            error_code=error_code(exc),
            error_description=str(exc.description),
        )
    return reply(Outcome.RESULT, payload=camel_to_snake_case(response.payload))


def error_code(error: OCPPError) -> str:
    """The OCPP error code of one of the library's errors (each subclass names its own)."""
    return str(getattr(error, "code", "GenericError"))
