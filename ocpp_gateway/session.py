"""One station's OCPP 1.6J session on the central-system side."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from ocpp.exceptions import OCPPError
from ocpp.messages import Call, CallError, CallResult, unpack
from ocpp.routing import after, on
from ocpp.v16 import ChargePoint, call_result, datatypes
from ocpp.v16.enums import (
    Action,
    AuthorizationStatus,
    DataTransferStatus,
    RegistrationStatus,
)
from websockets.asyncio.server import ServerConnection

from ocpp_gateway.boot import admit_boot, answer_boot, boot_hardware, close_rejected, now_iso
from ocpp_gateway.commands import Progress, error_code, run_command
from ocpp_gateway.connections import answers_ping
from ocpp_gateway.envelopes import Command, EventKind, Reply
from ocpp_gateway.events import EventReporter
from ocpp_gateway.registry import BootStatus, Registry

logger = logging.getLogger(__name__)

# Transaction ids must be unique per central system; seeding from the clock keeps them
# unique across gateway restarts without shared state.
_transaction_ids = itertools.count(int(time.time()) % 1_000_000_000)
# Authorisation stays with the operator's CSMS; the gateway must not stop charging.
_ACCEPTED = datatypes.IdTagInfo(status=AuthorizationStatus.accepted)


class StationSession(ChargePoint):
    """Answers what a station sends and runs the commands the Django side relays to it."""

    def __init__(
        self,
        identity: str,
        connection: ServerConnection,
        *,
        csms: str,
        reporter: EventReporter,
        heartbeat_interval: int,
        registry: Registry,
        on_rejected: Callable[[str], None],
        address: str = "",
        authenticated: bool = False,
        on_malformed: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(identity, connection)
        # Our own reference: the library keeps its one private (ChargePoint._connection).
        self._websocket = connection
        self.csms = csms
        self._reporter = reporter
        self._heartbeat_interval = heartbeat_interval
        self._registry = registry
        self._on_rejected = on_rejected
        self._address = address
        self._on_malformed = on_malformed
        # Whether the handshake proved a password: a station admitted while the registry
        # was unknown is checked against it at its boot.
        self._authenticated = authenticated
        # The answer to the last BootNotification on this connection; None: no boot yet
        # (a station reconnecting after a network drop does not boot again).
        self.boot_status: BootStatus | None = None
        self.boot_hardware: dict[str, str] | None = None
        self._rejection = ""
        self._closing: asyncio.Task[None] | None = None

    async def close(self, reason: str) -> None:
        await self._websocket.close(1000, reason)

    async def answers_ping(self, within: float) -> bool:
        """Whether the station's connection is alive: it answers a websocket ping in time."""
        return await answers_ping(self._websocket, within)

    # --- inbound: what the station sends -------------------------------------------------

    async def route_message(self, raw_msg: str) -> None:
        # The library only logs a frame it cannot parse; a central system should answer a
        # malformed CALL with a CALLERROR so the station (and its log) learns why.
        try:
            unpack(raw_msg)
        except OCPPError as error:
            logger.warning("%s sent a malformed frame (%s): %.200s", self.id, error, raw_msg)
            if self._on_malformed is not None:
                self._on_malformed()
            unique_id = _unique_id_of(raw_msg)
            if unique_id is not None:
                reply = CallError(unique_id, error_code(error), error.description, {})
                await self._to_station(reply.to_json())
            return
        await super().route_message(raw_msg)

    @on(Action.boot_notification)
    def on_boot_notification(self, **kwargs: Any) -> call_result.BootNotification:
        self.boot_hardware = boot_hardware(kwargs)
        verdict = admit_boot(
            self._registry,
            self._reporter,
            self.id,
            self.boot_hardware,
            authenticated=self._authenticated,
            address=self._address,
        )
        self.boot_status = verdict.status
        self._rejection = verdict.reason if verdict.status is BootStatus.REJECTED else ""
        answer = answer_boot(
            self._reporter,
            self.id,
            self.boot_hardware,
            kwargs,
            verdict,
            heartbeat_interval=self._heartbeat_interval,
        )
        return call_result.BootNotification(
            current_time=answer.current_time,
            interval=answer.interval,
            status=RegistrationStatus(answer.status.value),
        )

    @after(Action.boot_notification)
    def after_boot_notification(self, **_: Any) -> None:
        # After the answer went out: the station learns it was Rejected, then is closed.
        if self._rejection and self._closing is None:
            self._closing = close_rejected(
                self._websocket, self.id, self._rejection, self._on_rejected
            )

    @on(Action.heartbeat)
    def on_heartbeat(self) -> call_result.Heartbeat:
        return call_result.Heartbeat(current_time=now_iso())

    @on(Action.status_notification)
    def on_status_notification(
        self, connector_id: int, error_code: str, status: str, **kwargs: Any
    ) -> call_result.StatusNotification:
        self._reporter.report(
            EventKind.STATUS,
            self.id,
            {"connector_id": connector_id, "status": status, "error_code": error_code},
        )
        return call_result.StatusNotification()

    @on(Action.authorize)
    def on_authorize(self, id_tag: str) -> call_result.Authorize:
        return call_result.Authorize(id_tag_info=_ACCEPTED)

    @on(Action.start_transaction)
    def on_start_transaction(
        self, connector_id: int, id_tag: str, **kwargs: Any
    ) -> call_result.StartTransaction:
        return call_result.StartTransaction(
            transaction_id=next(_transaction_ids), id_tag_info=_ACCEPTED
        )

    @on(Action.stop_transaction)
    def on_stop_transaction(
        self, transaction_id: int, **kwargs: Any
    ) -> call_result.StopTransaction:
        return call_result.StopTransaction(id_tag_info=_ACCEPTED)

    @on(Action.meter_values)
    def on_meter_values(
        self, connector_id: int, meter_value: list[dict[str, Any]], **kwargs: Any
    ) -> call_result.MeterValues:
        return call_result.MeterValues()

    @on(Action.data_transfer)
    def on_data_transfer(self, vendor_id: str, **kwargs: Any) -> call_result.DataTransfer:
        # No vendor extensions are implemented: the answer the specification prescribes.
        return call_result.DataTransfer(status=DataTransferStatus.unknown_vendor_id)

    @on(Action.diagnostics_status_notification)
    def on_diagnostics_status(self, status: str) -> call_result.DiagnosticsStatusNotification:
        return call_result.DiagnosticsStatusNotification()

    @on(Action.firmware_status_notification)
    def on_firmware_status(self, status: str) -> call_result.FirmwareStatusNotification:
        return call_result.FirmwareStatusNotification()

    # --- outbound: commands relayed from the Django side ---------------------------------

    async def run_command(self, command: Command) -> Reply:
        """Send one OCPP call and describe what came back; never raises."""
        return await run_command(command, self, self._exchange)

    async def _exchange(
        self, command: Command, message: Call, progress: Progress
    ) -> CallResult | CallError:
        # ChargePoint's private call lock and response wait, as call() uses them: call()
        # cannot tell whether the frame left (a Reset not sent may be sent again), loses a
        # non-OCPP CALLERROR code and an invalid result's payload, and has one timeout per
        # session instead of the command's deadline.
        async with self._call_lock:
            progress.sent = True  # from here on the frame may have reached the station
            await self._to_station(message.to_json())
            response: CallResult | CallError = await self._get_specific_response(
                message.unique_id, max(command.remaining(), 0.001)
            )
            return response

    async def _to_station(self, frame: str) -> None:
        # Logged as the library logs the frames it sends itself (its _send is private).
        self.logger.info("%s: send %s", self.id, frame)
        await self._websocket.send(frame)


def _unique_id_of(raw_msg: str) -> str | None:
    try:
        frame = json.loads(raw_msg)
    except ValueError:
        return None
    if isinstance(frame, list) and len(frame) > 1 and isinstance(frame[1], str):
        return frame[1]
    return None
