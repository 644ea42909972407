"""Running one relayed Command on a station: the part both session kinds share.

A StationSession (endpoint mode) and a ProxySession (proxy mode) differ only in how a CALL
frame reaches the station and its answer comes back (the ``Exchange``); refusing a command
the station may not get, building and validating the CALL, the deadline and turning the
answer into a Reply are the same, and live here once.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from functools import lru_cache
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
# How many distinct requests (action and payload) are remembered as valid, and how many
# distinct payload keys keep their converted spelling: the product sends the same few
# requests (GetConfiguration of the same keys, one URL per CSMS, Reset Hard) to every
# station, whose answers use the few dozen key names of the specification.
VALIDATED_REQUESTS = 256
CONVERTED_KEYS = 1024


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
            payload=camel_case_keys(payload_of(request)),
        )
        await validate_request(message)
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
    return reply(Outcome.RESULT, payload=snake_case_keys(response.payload))


_validated_requests: OrderedDict[tuple[str, str], None] = OrderedDict()


async def validate_request(message: Call) -> None:
    """Validate our own CALL against its schema, as the library does (OCPPError when it
    does not fit), once per distinct action and payload: jsonschema is the gateway's
    largest CPU cost per command, and the same request goes to every station.

    Only requests that passed are remembered: one that fails is checked (and refused)
    each time. The station's answers are validated every time (run_command).
    """
    key = (message.action, json.dumps(message.payload, separators=(",", ":")))
    if key in _validated_requests:
        _validated_requests.move_to_end(key)
        return
    await validate_payload(message, OCPP_VERSION)
    _validated_requests[key] = None
    if len(_validated_requests) > VALIDATED_REQUESTS:
        _validated_requests.popitem(last=False)


def snake_case_keys(data: Any) -> Any:
    """``camel_to_snake_case`` of the library (what ChargePoint.call() applies to a result),
    with each key's spelling worked out once (its regular expressions are per key)."""
    if isinstance(data, dict):
        return {_snake_key(key): snake_case_keys(value) for key, value in data.items()}
    if isinstance(data, list):
        return [snake_case_keys(value) for value in data]
    return data


def camel_case_keys(data: Any) -> Any:
    """``snake_to_camel_case`` of the library (what ChargePoint.call() applies to a
    request), with each key's spelling worked out once."""
    if isinstance(data, dict):
        return {_camel_key(key): camel_case_keys(value) for key, value in data.items()}
    if isinstance(data, list):
        return [camel_case_keys(value) for value in data]
    return data


@lru_cache(maxsize=CONVERTED_KEYS)
def _snake_key(key: str) -> str:
    (converted,) = camel_to_snake_case({key: None})
    return str(converted)


@lru_cache(maxsize=CONVERTED_KEYS)
def _camel_key(key: str) -> str:
    (converted,) = snake_to_camel_case({key: None})
    return str(converted)


def error_code(error: OCPPError) -> str:
    """The OCPP error code of one of the library's errors (each subclass names its own)."""
    return str(getattr(error, "code", "GenericError"))
