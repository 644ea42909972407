"""Proxy mode: one station's session relayed to its link with the upstream CSMS.

Frames go both ways unchanged. The gateway only watches them (boots, connector states,
transactions: the events the Django side needs), answers a boot itself when its own
admission says no, and shares the station with the upstream for CALLs: OCPP-J allows one
CALL outstanding towards a station, so the upstream's CALLs and the commands injected
from the Redis bridge take turns in one call slot, each with a deadline. A station's
answer is routed by the id of the call outstanding: an injected command's answer goes to
the bridge only, never to the upstream; an answer that comes after its deadline finds no
outstanding call with its id and is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ocpp.charge_point import camel_to_snake_case
from ocpp.exceptions import FormationViolationError, GenericError, OCPPError
from ocpp.messages import Call, CallError, CallResult, MessageType, unpack
from ocpp.v16.enums import Action, ChargePointErrorCode, ChargePointStatus
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from ocpp_gateway.boot import admit_boot, answer_boot, boot_hardware, close_rejected, settle_boot
from ocpp_gateway.commands import Progress, run_command
from ocpp_gateway.connections import answers_ping, close_quietly
from ocpp_gateway.envelopes import Command, EventKind, Reply
from ocpp_gateway.events import EventReporter
from ocpp_gateway.registry import BootStatus, Registry

logger = logging.getLogger(__name__)

# Service restart: a station reconnects (and its new connection opens a new upstream link).
CLOSE_UPSTREAM_GONE = 1012
# Wire ids of injected commands: 6 + 30 hex = 36 characters, OCPP-J's limit for a message id.
INJECTED_ID_PREFIX = "csmsm-"
# OCPP-J lets a CSMS keep one CALL outstanding; a few more under way (waiting in line for
# the slot) are tolerated, beyond that the upstream is answered at once, never queued
# without a bound.
MAX_UPSTREAM_CALLS = 8
# Station CALLs whose upstream answer the gateway reads (boot, transaction start). The
# station keeps one outstanding, so this only ever holds more when the upstream is silent.
MAX_WATCHED = 8
# Open transactions per station (one per connector, in practice).
MAX_TRANSACTIONS = 64


def injected_id() -> str:
    return INJECTED_ID_PREFIX + secrets.token_hex(15)


@dataclass
class _Outstanding:
    """The one CALL towards the station that awaits its answer."""

    unique_id: str
    # The station's answer: the raw frame for an upstream CALL, the parsed message for an
    # injected one. Cancelled when the call's deadline passes, so a late answer finds it
    # done and is dropped.
    answer: asyncio.Future[Any]
    from_upstream: bool


@dataclass
class _Watched:
    """A station CALL whose upstream answer the gateway reads on its way back."""

    action: str
    payload: dict[str, Any] = field(default_factory=dict)


class ProxySession:
    """A station connection relayed to the upstream; the interface of StationSession."""

    def __init__(
        self,
        identity: str,
        station: ServerConnection,
        upstream: ClientConnection,
        *,
        csms: str,
        reporter: EventReporter,
        registry: Registry,
        on_rejected: Callable[[str], None],
        heartbeat_interval: int,
        call_timeout: float,
        address: str = "",
        authenticated: bool = False,
        on_malformed: Callable[[], None] | None = None,
    ) -> None:
        self.id = identity
        self.csms = csms
        self._station = station
        self._upstream = upstream
        self._reporter = reporter
        self._registry = registry
        self._on_rejected = on_rejected
        self._heartbeat_interval = heartbeat_interval
        self._call_timeout = call_timeout
        self._address = address
        self._authenticated = authenticated
        # Counts a station frame refused as malformed (the gateway's metrics).
        self._on_malformed = on_malformed
        # As on StationSession: the answer to the last boot on this connection (Pending
        # while the upstream has not answered it yet); None: no boot on this connection.
        self.boot_status: BootStatus | None = None
        self.boot_hardware: dict[str, str] | None = None
        # Cleared while a forwarded boot awaits the upstream's answer: its status decides
        # whether a command may go, so a command arriving meanwhile waits for it.
        self._boot_answered = asyncio.Event()
        self._boot_answered.set()
        self._slot = asyncio.Lock()  # the one CALL towards the station
        self._outstanding: _Outstanding | None = None
        self._upstream_calls: set[asyncio.Task[None]] = set()
        self._watched: OrderedDict[str, _Watched] = OrderedDict()
        self._transactions: OrderedDict[int, int] = OrderedDict()  # transaction -> connector
        self._closing: asyncio.Task[None] | None = None
        self._gone = False  # the station's connection is closed

    # --- the interface the server uses -----------------------------------------------------

    async def start(self) -> None:
        """Relay until the station's connection is closed; then close the upstream link."""
        from_upstream = asyncio.create_task(self._from_upstream())
        try:
            await self._from_station()
        finally:
            from_upstream.cancel()
            for task in list(self._upstream_calls):
                task.cancel()
            self._gone = True
            self._boot_answered.set()  # no answer will come: nobody waits for it
            outstanding = self._outstanding
            if outstanding is not None and not outstanding.answer.done():
                if outstanding.from_upstream:
                    outstanding.answer.cancel()  # its task is cancelled too
                else:
                    # An injected command learns at once that the station left (DISCONNECTED),
                    # instead of waiting for its deadline.
                    outstanding.answer.set_exception(ConnectionError("station disconnected"))
            code = self._station.close_code
            # Normal closure passed on as such; anything else is the station going away.
            await close_quietly(
                self._upstream, 1000 if code == 1000 else 1001, "station disconnected"
            )
            pending = [from_upstream, *self._upstream_calls]
            if self._closing is not None:
                pending.append(self._closing)
            await asyncio.gather(*pending, return_exceptions=True)

    async def close(self, reason: str) -> None:
        await close_quietly(self._station, 1000, reason)

    async def answers_ping(self, within: float) -> bool:
        return await answers_ping(self._station, within)

    async def run_command(self, command: Command) -> Reply:
        """An injected command, in turn with the upstream's CALLs; never raises."""
        if not self._boot_answered.is_set():
            # A re-boot (after the upstream's TriggerMessage, say) makes the status Pending
            # until the upstream answers; refusing the command in that window would fail a
            # station the upstream is about to accept again. Waiting is bounded by the
            # command's deadline; past it, run_command refuses it as not accepted.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(command.remaining(), 0)):
                    await self._boot_answered.wait()
        return await run_command(command, self, self._exchange, unique_id=injected_id())

    # --- station -> upstream ------------------------------------------------------------------

    async def _from_station(self) -> None:
        while True:
            try:
                raw = await self._station.recv()
            except ConnectionClosed:
                return
            frame = _ocpp_frame(raw)
            if frame is None:
                await self._to_upstream(raw)  # not ours to judge: the upstream answers it
            elif not isinstance(frame[1], str):
                # Relayed, a boot with a numeric id would pass the gateway's admission
                # unseen, and an answer with one matches no call of ours or relayed.
                await self._refuse_misidentified(frame, raw, self._station)
            elif frame[0] == MessageType.Call:
                if await self._station_call(frame):
                    await self._to_upstream(raw)
            else:  # a CALLRESULT or CALLERROR
                await self._station_answer(frame[1], raw)

    async def _station_call(self, frame: list[Any]) -> bool:
        """Watch a station CALL; False when the gateway answered it itself."""
        unique_id, action = frame[1], frame[2] if len(frame) > 2 else None
        payload = frame[3] if len(frame) > 3 and isinstance(frame[3], dict) else {}
        if action == Action.boot_notification:
            return await self._station_boot(unique_id, payload)
        if action == Action.status_notification:
            self._report_status(
                payload.get("connectorId"), payload.get("status"), payload.get("errorCode")
            )
        elif action == Action.start_transaction:
            self._watch(unique_id, _Watched(action, payload))
        elif action == Action.stop_transaction:
            transaction = payload.get("transactionId")
            connector = (
                self._transactions.pop(transaction, None) if isinstance(transaction, int) else None
            )
            if connector is not None:
                self._report_status(
                    connector, ChargePointStatus.finishing, ChargePointErrorCode.no_error
                )
            else:
                logger.info("%s: stop of transaction %r not seen starting", self.id, transaction)
        return True

    async def _station_boot(self, unique_id: str, payload: dict[str, Any]) -> bool:
        request = camel_to_snake_case(payload)
        self.boot_hardware = boot_hardware(request)
        verdict = admit_boot(
            self._registry,
            self._reporter,
            self.id,
            self.boot_hardware,
            authenticated=self._authenticated,
            address=self._address,
        )
        if verdict.status is BootStatus.ACCEPTED:
            # The upstream has the last word; until it answers, no command counts as
            # reaching an accepted station (commands wait for that answer: run_command).
            self.boot_status = BootStatus.PENDING
            self._boot_answered.clear()
            self._watch(unique_id, _Watched(Action.boot_notification, request))
            return True
        # The gateway's own admission says no: the upstream never sees this boot.
        self.boot_status = verdict.status
        answer = answer_boot(
            self._reporter,
            self.id,
            self.boot_hardware,
            request,
            verdict,
            heartbeat_interval=self._heartbeat_interval,
        )
        with contextlib.suppress(ConnectionClosed):
            await self._station.send(CallResult(unique_id, answer.payload()).to_json())
        if verdict.status is BootStatus.REJECTED:
            self._reject(verdict.reason)
        return False

    async def _station_answer(self, unique_id: str, raw: str | bytes) -> None:
        outstanding = self._outstanding
        if outstanding is None or outstanding.unique_id != unique_id or outstanding.answer.done():
            logger.warning(
                "%s: dropped an answer to no outstanding call (late?): %.200s", self.id, raw
            )
            return
        if outstanding.from_upstream:
            # Settled before the send: a deadline passing meanwhile cannot error it too.
            outstanding.answer.set_result(raw)
            await self._to_upstream(raw)
            return
        try:
            message = unpack(raw)
        except OCPPError as exc:
            # As in endpoint mode: a malformed answer is no answer; the command times out.
            logger.warning("%s sent a malformed answer (%s): %.200s", self.id, exc, raw)
            self._malformed()
            return
        outstanding.answer.set_result(message)

    async def _to_upstream(self, raw: str | bytes) -> None:
        # A lost upstream link is noticed by _from_upstream, which closes the station.
        with contextlib.suppress(ConnectionClosed):
            await self._upstream.send(raw)

    # --- upstream -> station ------------------------------------------------------------------

    async def _from_upstream(self) -> None:
        try:
            await self._relay_from_upstream()
        except Exception:
            # A station left connected with nobody reading its upstream would look alive
            # and be deaf: close it so that it reconnects.
            logger.exception("%s: relaying from the upstream CSMS failed", self.id)
            await close_quietly(self._station, 1011, "gateway error")

    async def _relay_from_upstream(self) -> None:
        while True:
            try:
                raw = await self._upstream.recv()
            except ConnectionClosed as exc:
                logger.warning("%s: the upstream CSMS closed the link (%s)", self.id, exc)
                if self._closing is None:
                    await close_quietly(
                        self._station, CLOSE_UPSTREAM_GONE, "upstream CSMS closed the connection"
                    )
                return
            frame = _ocpp_frame(raw)
            if frame is not None and not isinstance(frame[1], str):
                # Relayed, a CALL with a numeric id would bypass the call slot and its
                # deadline (a second CALL outstanding towards the station).
                await self._refuse_misidentified(frame, raw, self._upstream)
                continue
            if frame is not None and frame[0] == MessageType.Call:
                await self._upstream_call(frame[1], raw)
                continue
            rejected, watched = "", None
            if frame is not None and frame[0] in (MessageType.CallResult, MessageType.CallError):
                watched = self._watched.pop(frame[1], None)
                if watched is not None:
                    rejected = self._upstream_answer(frame, watched)
            try:
                await self._station.send(raw)
            except ConnectionClosed:
                return
            finally:
                if watched is not None and watched.action == Action.boot_notification:
                    # Only once the answer is on its way: a command that waited for it
                    # must not reach the station before its BootNotification.conf.
                    self._boot_answered.set()
            if rejected:
                self._reject(rejected)

    async def _upstream_call(self, unique_id: str, raw: str | bytes) -> None:
        if len(self._upstream_calls) >= MAX_UPSTREAM_CALLS:
            await self._to_upstream(
                CallError(
                    unique_id,
                    GenericError.code,
                    f"not delivered: {len(self._upstream_calls)} CALLs of yours are already "
                    "under way to this station (OCPP-J allows one outstanding)",
                    {},
                ).to_json()
            )
            return
        task = asyncio.create_task(self._relay_upstream_call(unique_id, raw))
        self._upstream_calls.add(task)
        task.add_done_callback(self._upstream_calls.discard)

    async def _relay_upstream_call(self, unique_id: str, raw: str | bytes) -> None:
        outstanding: _Outstanding | None = None
        try:
            async with asyncio.timeout(self._call_timeout):
                async with self._slot:
                    outstanding = _Outstanding(
                        unique_id, asyncio.get_running_loop().create_future(), True
                    )
                    self._outstanding = outstanding
                    try:
                        await self._station.send(raw)
                        await outstanding.answer  # relayed to the upstream as it came
                    finally:
                        if self._outstanding is outstanding:
                            self._outstanding = None
        except TimeoutError:
            answer = outstanding.answer if outstanding is not None else None
            if answer is not None and answer.done() and not answer.cancelled():
                return  # answered just in time: already relayed
            if outstanding is None:
                why = (
                    f"not delivered: the station was busy with another call for "
                    f"{self._call_timeout:g}s"
                )
            else:
                why = f"the station did not answer within {self._call_timeout:g}s"
            logger.warning("%s: upstream CALL %s: %s", self.id, unique_id, why)
            await self._to_upstream(CallError(unique_id, GenericError.code, why, {}).to_json())
        except ConnectionClosed:
            return  # the station is gone; start() closes the upstream link

    def _upstream_answer(self, frame: list[Any], watched: _Watched) -> str:
        """Read the upstream's answer to a watched station CALL; the rejection, if any."""
        result = frame[2] if frame[0] == MessageType.CallResult and len(frame) > 2 else None
        if watched.action == Action.start_transaction:
            transaction = result.get("transactionId") if isinstance(result, dict) else None
            connector = watched.payload.get("connectorId")
            if isinstance(transaction, int) and isinstance(connector, int):
                self._transactions[transaction] = connector
                while len(self._transactions) > MAX_TRANSACTIONS:
                    self._transactions.popitem(last=False)
                self._report_status(
                    connector, ChargePointStatus.charging, ChargePointErrorCode.no_error
                )
            return ""
        # BootNotification: the upstream's status is what the station gets and the event says.
        status_text = result.get("status") if isinstance(result, dict) else None
        try:
            status = BootStatus(str(status_text))
            reason = "" if status is BootStatus.ACCEPTED else f"upstream CSMS answered {status}"
        except ValueError:
            status = BootStatus.PENDING
            reason = (
                f"upstream CSMS answered the boot with a CALLERROR ({frame[2]})"
                if frame[0] == MessageType.CallError and len(frame) > 2
                else f"upstream CSMS answered the boot with status {status_text!r}"
            )
        self.boot_status = status
        settle_boot(
            self._reporter, self.id, self.boot_hardware or {}, watched.payload, status, reason
        )
        return reason if status is BootStatus.REJECTED else ""

    async def _refuse_misidentified(self, frame: list[Any], raw: str | bytes, sender: Any) -> None:
        """A frame whose message id is not a string (OCPP-J: a string of up to 36
        characters): a CALL is answered with a CALLERROR, anything else is dropped; logged
        as endpoint mode logs a malformed frame."""
        side = "the upstream CSMS" if sender is self._upstream else "the station"
        logger.warning(
            "%s: %s sent a frame whose message id is not a string: %.200s", self.id, side, raw
        )
        if sender is self._station:
            self._malformed()
        if frame[0] != MessageType.Call:
            return
        error = CallError(
            frame[1], FormationViolationError.code, "the message id must be a string", {}
        )
        with contextlib.suppress(ConnectionClosed):  # the relay notices a closed side
            await sender.send(error.to_json())

    # --- injected commands ----------------------------------------------------------------------

    async def _exchange(self, command: Command, message: Call, progress: Progress) -> Any:
        # Bounded by run_command's deadline, the wait for the slot included.
        async with self._slot:
            if self._gone:  # waited for the slot while the station left
                raise ConnectionError("station disconnected")
            outstanding = _Outstanding(
                message.unique_id, asyncio.get_running_loop().create_future(), False
            )
            self._outstanding = outstanding
            try:
                progress.sent = True  # from here on the frame may have reached the station
                await self._station.send(message.to_json())
                return await outstanding.answer
            finally:
                if self._outstanding is outstanding:
                    self._outstanding = None

    # --- helpers ----------------------------------------------------------------------------------

    def _watch(self, unique_id: str, watched: _Watched) -> None:
        self._watched[unique_id] = watched
        while len(self._watched) > MAX_WATCHED:
            self._watched.popitem(last=False)

    def _report_status(self, connector: Any, status: Any, error_code: Any) -> None:
        self._reporter.report(
            EventKind.STATUS,
            self.id,
            {"connector_id": connector, "status": status, "error_code": error_code or ""},
        )

    def _malformed(self) -> None:
        if self._on_malformed is not None:
            self._on_malformed()

    def _reject(self, reason: str) -> None:
        if self._closing is None:
            self._closing = close_rejected(self._station, self.id, reason, self._on_rejected)


def _ocpp_frame(raw: str | bytes) -> list[Any] | None:
    """An OCPP-J frame [type, id, ...] (its id not checked), or None for anything else."""
    if not isinstance(raw, str):
        return None
    try:
        frame = json.loads(raw)
    except ValueError:
        return None
    if (
        isinstance(frame, list)
        and len(frame) > 1
        and frame[0] in (MessageType.Call, MessageType.CallResult, MessageType.CallError)
    ):
        return frame
    return None
