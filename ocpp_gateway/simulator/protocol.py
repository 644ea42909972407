"""What the firmware answers to each CSMS request, over one websocket session.

A new link is made per connection; everything that must outlive the connection (config,
transaction, history) lives on the station. Follow-up calls to the CSMS happen in `@after`
handlers through station tasks: calling the CSMS from inside an `@on` handler would deadlock.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator, Mapping
from types import MethodType
from typing import TYPE_CHECKING, Any

from ocpp.messages import Call
from ocpp.routing import after, create_route_map, on
from ocpp.v16 import ChargePoint, call_result
from ocpp.v16.datatypes import KeyValue
from ocpp.v16.enums import (
    Action,
    AvailabilityStatus,
    AvailabilityType,
    CertificateStatus,
    CertificateUse,
    ClearCacheStatus,
    ConfigurationStatus,
    DataTransferStatus,
    GetInstalledCertificateStatus,
    MessageTrigger,
    Reason,
    RemoteStartStopStatus,
    TriggerMessageStatus,
    UnlockStatus,
)
from websockets.asyncio.client import ClientConnection

from ocpp_gateway.simulator.config import PROFILE_KEYS, Change

if TYPE_CHECKING:
    from ocpp_gateway.simulator.station import SimulatedStation

# The security extension's messages: a station without it has no route for them, so the
# library answers CALLERROR NotImplemented as for any action the firmware lacks.
_SECURITY_ACTIONS = frozenset({Action.get_installed_certificate_ids, Action.install_certificate})

_TRIGGERABLE = frozenset(
    {
        MessageTrigger.boot_notification,
        MessageTrigger.heartbeat,
        MessageTrigger.status_notification,
        MessageTrigger.meter_values,
    }
)


class _BoundRoutes(Mapping[str, dict[str, Any]]):
    """The class's routes, bound to one link only when a request arrives.

    The library builds a dict of bound methods per connection (~3 KiB); with thousands of
    stations per process one shared table is worth it. `ChargePoint._handle_call` only
    looks routes up by action.
    """

    __slots__ = ("_link",)

    def __init__(self, link: StationLink) -> None:
        self._link = link

    def __getitem__(self, action: str) -> dict[str, Any]:
        if action in _SECURITY_ACTIONS and self._link.station.spec.behaviour.no_security_extension:
            raise KeyError(action)
        routes = _ROUTES[action]
        return {
            option: MethodType(value, self._link) if callable(value) else value
            for option, value in routes.items()
        }

    def __iter__(self) -> Iterator[str]:
        return iter(_ROUTES)

    def __len__(self) -> int:
        return len(_ROUTES)


class StationLink(ChargePoint):
    def __init__(self, station: SimulatedStation, connection: ClientConnection) -> None:
        super().__init__(
            station.identity, connection, response_timeout=station.timing.response_timeout
        )
        self.route_map = _BoundRoutes(self)
        self.station = station
        # The message id of a CALL whose answer is to be lost (a behaviour), if any.
        self._lose_answer_to: str | None = None
        self._own_calls = 0
        self._no_own_calls = asyncio.Event()
        self._no_own_calls.set()

    async def call(self, *args: Any, **kwargs: Any) -> Any:
        self._own_calls += 1
        self._no_own_calls.clear()
        try:
            return await super().call(*args, **kwargs)
        finally:
            self._own_calls -= 1
            if not self._own_calls:
                self._no_own_calls.set()

    async def own_calls_settled(self, within: float) -> None:
        """Wait, at most `within` seconds, for the station's own CALLs to end.

        An answer read just before the connection closed (a Rejected boot, say) is still the
        station's to act on: the CALL waiting for it takes it a few loop turns later.
        """
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                await self._no_own_calls.wait()

    async def _handle_call(self, msg: Call) -> None:
        if msg.action == Action.install_certificate and self.station.lose_install_answer():
            self._lose_answer_to = msg.unique_id
        try:
            await super()._handle_call(msg)
        finally:
            self._lose_answer_to = None

    async def _send(self, message: str) -> None:
        lost = self._lose_answer_to
        if lost is not None and message.startswith("[3,") and json.loads(message)[1] == lost:
            self.station.record("answer_lost", message_id=lost, action="InstallCertificate")
            return
        await super()._send(message)

    # -- configuration -------------------------------------------------------------------

    @on(Action.get_configuration)
    def on_get_configuration(
        self, key: list[str] | None = None, **_: Any
    ) -> call_result.GetConfiguration:
        config = self.station.config
        known, unknown = config.read(key)
        return call_result.GetConfiguration(
            configuration_key=[
                KeyValue(key=spec.name, readonly=spec.readonly, value=config[spec.name])
                for spec in known
            ],
            unknown_key=unknown or None,
        )

    @on(Action.change_configuration)
    def on_change_configuration(
        self, key: str, value: str, **_: Any
    ) -> call_result.ChangeConfiguration:
        station = self.station
        behaviour = station.spec.behaviour
        change = station.config.check(key, value, identity=station.identity)
        if change.applies and key in PROFILE_KEYS and behaviour.reject_url_writes:
            change = Change(ConfigurationStatus.rejected, "reject-url-writes behaviour")
        if change.applies:
            station.config.set(key, value)
        status = change.status
        if status is ConfigurationStatus.reboot_required and (
            behaviour.accept_priority_without_reboot
        ):
            status = ConfigurationStatus.accepted
        station.record(
            "config_changed", key=key, value=value, status=status.value, reason=change.reason
        )
        return call_result.ChangeConfiguration(status=status)

    # -- reset ---------------------------------------------------------------------------

    @on(Action.reset)
    def on_reset(self, type: str, **_: Any) -> call_result.Reset:
        return call_result.Reset(status=self.station.accept_reset(type))

    @after(Action.reset)
    def after_reset(self, **_: Any) -> None:
        if self.station.reset_pending:
            self.station.spawn(self.station.shut_down_for_reset())

    # -- availability and triggers -------------------------------------------------------

    @on(Action.change_availability)
    def on_change_availability(
        self, connector_id: int, type: str, **_: Any
    ) -> call_result.ChangeAvailability:
        station = self.station
        if not 0 <= connector_id <= station.spec.connectors:
            status = AvailabilityStatus.rejected
        else:
            inoperative = type == AvailabilityType.inoperative
            station.set_availability(connector_id, operative=not inoperative)
            busy = station.charging_connector()
            scheduled = inoperative and busy is not None and connector_id in (0, busy)
            status = AvailabilityStatus.scheduled if scheduled else AvailabilityStatus.accepted
        station.record(
            "availability_changed", connector_id=connector_id, type=type, status=status.value
        )
        return call_result.ChangeAvailability(status=status)

    @after(Action.change_availability)
    def after_change_availability(self, connector_id: int, **_: Any) -> None:
        station = self.station
        if 0 <= connector_id <= station.spec.connectors:
            ids = station.connector_ids() if connector_id == 0 else [connector_id]
            station.spawn(station.send_statuses(ids))

    @on(Action.trigger_message)
    def on_trigger_message(
        self, requested_message: str, connector_id: int | None = None, **_: Any
    ) -> call_result.TriggerMessage:
        if requested_message not in _TRIGGERABLE:
            status = TriggerMessageStatus.not_implemented
        elif connector_id is not None and not 0 <= connector_id <= self.station.spec.connectors:
            status = TriggerMessageStatus.rejected
        else:
            status = TriggerMessageStatus.accepted
        return call_result.TriggerMessage(status=status)

    @after(Action.trigger_message)
    def after_trigger_message(
        self, requested_message: str, connector_id: int | None = None, **_: Any
    ) -> None:
        station = self.station
        if requested_message in _TRIGGERABLE and (
            connector_id is None or 0 <= connector_id <= station.spec.connectors
        ):
            station.spawn(station.send_triggered(MessageTrigger(requested_message), connector_id))

    # -- transactions --------------------------------------------------------------------

    @on(Action.remote_start_transaction)
    def on_remote_start_transaction(
        self, id_tag: str, connector_id: int | None = None, **_: Any
    ) -> call_result.RemoteStartTransaction:
        started = self.station.begin_transaction(connector_id or 1, id_tag)
        status = RemoteStartStopStatus.accepted if started else RemoteStartStopStatus.rejected
        return call_result.RemoteStartTransaction(status=status)

    @on(Action.remote_stop_transaction)
    def on_remote_stop_transaction(
        self, transaction_id: int, **_: Any
    ) -> call_result.RemoteStopTransaction:
        tx = self.station.transaction
        if tx is not None and tx.running and tx.transaction_id == transaction_id:
            tx.stop(Reason.remote)
            status = RemoteStartStopStatus.accepted
        else:
            status = RemoteStartStopStatus.rejected
        return call_result.RemoteStopTransaction(status=status)

    @on(Action.unlock_connector)
    def on_unlock_connector(self, connector_id: int, **_: Any) -> call_result.UnlockConnector:
        if not 1 <= connector_id <= self.station.spec.connectors:
            return call_result.UnlockConnector(status=UnlockStatus.not_supported)
        tx = self.station.transaction
        if tx is not None and tx.running and tx.connector_id == connector_id:
            tx.stop(Reason.unlock_command)
        return call_result.UnlockConnector(status=UnlockStatus.unlocked)

    @after(Action.remote_start_transaction)
    def after_remote_start_transaction(self, **_: Any) -> None:
        self.station.spawn(self.station.report_new_session())

    @after(Action.remote_stop_transaction)
    def after_remote_stop_transaction(self, **_: Any) -> None:
        self.station.spawn(self.station.sync_transaction())

    @after(Action.unlock_connector)
    def after_unlock_connector(self, **_: Any) -> None:
        self.station.spawn(self.station.sync_transaction())

    # -- root certificates (security extension) -----------------------------------------

    @on(Action.get_installed_certificate_ids)
    def on_get_installed_certificate_ids(
        self, certificate_type: str, **_: Any
    ) -> call_result.GetInstalledCertificateIds:
        # Only CentralSystemRootCertificates are simulated; no manufacturer roots.
        found = (
            self.station.installed_root_hash_data()
            if certificate_type == CertificateUse.central_system_root_certificate
            else []
        )
        if not found:
            return call_result.GetInstalledCertificateIds(
                status=GetInstalledCertificateStatus.not_found
            )
        return call_result.GetInstalledCertificateIds(
            status=GetInstalledCertificateStatus.accepted,
            certificate_hash_data=[data.as_payload() for data in found],
        )

    @on(Action.install_certificate)
    def on_install_certificate(
        self, certificate_type: str, certificate: str, **_: Any
    ) -> call_result.InstallCertificate:
        station = self.station
        if certificate_type != CertificateUse.central_system_root_certificate:
            accepted, why = False, f"{certificate_type} is not kept by this firmware"
        else:
            accepted, why = station.install_root(certificate)
        status = CertificateStatus.accepted if accepted else CertificateStatus.rejected
        station.record(
            "certificate_installed" if accepted else "certificate_rejected",
            certificate_type=certificate_type,
            reason=why or None,
            root_certificates=[data.as_payload() for data in station.installed_root_hash_data()],
        )
        return call_result.InstallCertificate(status=status)

    # -- the rest ------------------------------------------------------------------------

    @on(Action.clear_cache)
    def on_clear_cache(self, **_: Any) -> call_result.ClearCache:
        return call_result.ClearCache(status=ClearCacheStatus.accepted)

    @on(Action.data_transfer)
    def on_data_transfer(self, vendor_id: str, **_: Any) -> call_result.DataTransfer:
        if vendor_id != self.station.spec.vendor:
            return call_result.DataTransfer(status=DataTransferStatus.unknown_vendor_id)
        return call_result.DataTransfer(status=DataTransferStatus.unknown_message_id)


# Built from the class, so the table holds plain functions that _BoundRoutes binds per call.
_ROUTES: dict[str, dict[str, Any]] = create_route_map(StationLink)
