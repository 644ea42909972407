"""Station behaviour beyond the migration: sessions, triggers, going offline, boot retries."""

from __future__ import annotations

import base64

import pytest
from ocpp import exceptions as ocpp_errors
from ocpp.v16 import call
from ocpp.v16.enums import (
    AvailabilityStatus,
    AvailabilityType,
    MessageTrigger,
    RegistrationStatus,
    RemoteStartStopStatus,
    ResetType,
    TriggerMessageStatus,
)

from devstack.processes import wait_until_async
from ocpp_gateway.simulator import Behaviour, Fleet, StationSpec, StationState
from tests.simulator.csms import FAST, CentralSystem, run

ID = "SIM-0001"


def statuses(csms: CentralSystem, connector_id: int = 1) -> list[str]:
    return [
        s["status"]
        for s in csms.seen(ID, "StatusNotification")
        if s["connector_id"] == connector_id
    ]


def test_it_charges_from_boot_and_stops_after_the_given_seconds():
    async def scenario():
        async with CentralSystem() as csms:
            behaviour = Behaviour(charging=True, charging_seconds=0.3)
            async with Fleet(
                [StationSpec(ID, url=csms.url, behaviour=behaviour)], timing=FAST
            ) as fleet:
                station = fleet[ID]
                await wait_until_async(
                    lambda: csms.seen(ID, "StopTransaction"), 10, "the session to end"
                )
                await wait_until_async(
                    lambda: statuses(csms)[-1:] == ["Available"], 10, "Available"
                )

                start = csms.seen(ID, "StartTransaction")[0]
                stop = csms.seen(ID, "StopTransaction")[0]
                assert start["connector_id"] == 1
                assert stop["reason"] == "Local"
                assert (
                    stop["transaction_id"]
                    == station.events("charging_started")[0]["transaction_id"]
                )
                assert stop["meter_stop"] >= start["meter_start"]
                assert statuses(csms) == ["Charging", "Available"]
                assert [e["reason"] for e in station.events("charging_stopped")] == ["Local"]
                assert station.transaction is None

    run(scenario())


def test_it_reports_a_session_stopped_by_a_hard_reset_after_rebooting():
    async def scenario():
        async with CentralSystem() as a, CentralSystem() as b:
            spec = StationSpec(
                ID,
                url=a.url,
                url2=b.url,
                priority="NetworkConnectionProfile2,NetworkConnectionProfile1",
                behaviour=Behaviour(charging=True),
            )
            async with Fleet([spec], timing=FAST) as fleet:
                station = fleet[ID]
                # Installed with B first: it boots there.
                await wait_until_async(
                    lambda: b.seen(ID, "StartTransaction"), 10, "session start on B"
                )
                assert not a.seen(ID, "connect")
                await b.call(ID, call.Reset(type=ResetType.hard))
                await wait_until_async(
                    lambda: len(b.seen(ID, "BootNotification")) == 2, 10, "reboot"
                )
                await wait_until_async(lambda: b.seen(ID, "StopTransaction"), 10, "the queued stop")

                stop = b.seen(ID, "StopTransaction")[0]
                assert stop["reason"] == "HardReset"
                # Sent after the new BootNotification, not before the reset.
                boots = [i for i, m in enumerate(b.messages) if m.action == "BootNotification"]
                stops = [i for i, m in enumerate(b.messages) if m.action == "StopTransaction"]
                assert stops[0] > boots[1]
                await wait_until_async(lambda: statuses(b)[-1:] == ["Available"], 10, "Available")
                assert len(b.seen(ID, "StartTransaction")) == 1
                assert station.events("charging_stopped")[0]["reason"] == "HardReset"

    run(scenario())


def test_it_stops_a_session_before_a_soft_reset():
    async def scenario():
        async with CentralSystem() as csms:
            spec = StationSpec(ID, url=csms.url, behaviour=Behaviour(charging=True))
            async with Fleet([spec], timing=FAST) as fleet:
                await wait_until_async(
                    lambda: csms.seen(ID, "StartTransaction"), 10, "session start"
                )
                await csms.call(ID, call.Reset(type=ResetType.soft))
                await wait_until_async(
                    lambda: len(csms.seen(ID, "BootNotification")) == 2, 10, "reboot"
                )

                actions = [m.action for m in csms.messages]
                assert actions.index("StopTransaction") < actions.index("disconnect")
                assert csms.seen(ID, "StopTransaction")[0]["reason"] == "SoftReset"
                assert fleet[ID].reset_count == 1

    run(scenario())


def test_it_starts_and_stops_remote_sessions():
    async def scenario():
        async with (
            CentralSystem() as csms,
            Fleet([StationSpec(ID, url=csms.url)], timing=FAST) as fleet,
        ):
            station = fleet[ID]
            await wait_until_async(lambda: station.online, 10, "boot")
            started = await csms.call(ID, call.RemoteStartTransaction(id_tag="TAG1"))
            assert started.status == RemoteStartStopStatus.accepted
            again = await csms.call(ID, call.RemoteStartTransaction(id_tag="TAG2"))
            assert again.status == RemoteStartStopStatus.rejected
            await wait_until_async(
                lambda: csms.seen(ID, "StartTransaction"), 10, "StartTransaction"
            )
            assert csms.seen(ID, "StartTransaction")[0]["id_tag"] == "TAG1"

            tx_id = station.events("charging_started")[0]["transaction_id"]
            wrong = await csms.call(ID, call.RemoteStopTransaction(transaction_id=tx_id + 1))
            assert wrong.status == RemoteStartStopStatus.rejected
            stopped = await csms.call(ID, call.RemoteStopTransaction(transaction_id=tx_id))
            assert stopped.status == RemoteStartStopStatus.accepted
            await wait_until_async(lambda: csms.seen(ID, "StopTransaction"), 10, "StopTransaction")
            assert csms.seen(ID, "StopTransaction")[0]["reason"] == "Remote"

    run(scenario())


def test_it_answers_triggers_and_availability():
    async def scenario():
        async with (
            CentralSystem() as csms,
            Fleet([StationSpec(ID, url=csms.url)], timing=FAST) as fleet,
        ):
            await wait_until_async(lambda: fleet[ID].online, 10, "boot")
            heartbeat = await csms.call(
                ID, call.TriggerMessage(requested_message=MessageTrigger.heartbeat)
            )
            assert heartbeat.status == TriggerMessageStatus.accepted
            await wait_until_async(lambda: csms.seen(ID, "Heartbeat"), 10, "triggered Heartbeat")

            boot = await csms.call(
                ID, call.TriggerMessage(requested_message=MessageTrigger.boot_notification)
            )
            assert boot.status == TriggerMessageStatus.accepted
            await wait_until_async(lambda: len(csms.seen(ID, "BootNotification")) == 2, 10, "boot")

            diagnostics = await csms.call(
                ID,
                call.TriggerMessage(
                    requested_message=MessageTrigger.diagnostics_status_notification
                ),
            )
            assert diagnostics.status == TriggerMessageStatus.not_implemented
            # An action the firmware does not handle is a CALLERROR, not a silent success.
            with pytest.raises(ocpp_errors.NotImplementedError):
                await csms.call(ID, call.GetLocalListVersion())

            unavailable = await csms.call(
                ID, call.ChangeAvailability(connector_id=0, type=AvailabilityType.inoperative)
            )
            assert unavailable.status == AvailabilityStatus.accepted
            await wait_until_async(
                lambda: statuses(csms)[-1:] == ["Unavailable"], 10, "Unavailable"
            )
            refused = await csms.call(ID, call.RemoteStartTransaction(id_tag="TAG1"))
            assert refused.status == RemoteStartStopStatus.rejected
            bad = await csms.call(
                ID, call.ChangeAvailability(connector_id=5, type=AvailabilityType.operative)
            )
            assert bad.status == AvailabilityStatus.rejected

    run(scenario())


def test_it_goes_offline_for_good():
    async def scenario():
        async with CentralSystem() as csms:
            behaviour = Behaviour(drop_offline=True, drop_offline_after=0.2)
            async with Fleet(
                [StationSpec(ID, url=csms.url, behaviour=behaviour)], timing=FAST
            ) as fleet:
                station = fleet[ID]
                await wait_until_async(
                    lambda: csms.seen(ID, "disconnect"), 10, "the station to drop"
                )
                # OFFLINE is set when the station's task has ended: nothing reconnects it.
                await wait_until_async(lambda: station.state is StationState.OFFLINE, 10, "offline")
                assert len(csms.seen(ID, "connect")) == 1
                assert station.events("went_offline")[0]["url"] == csms.url
                assert csms.seen(ID, "disconnect")[0]["code"] == 1006

    run(scenario())


def test_it_retries_a_pending_boot_and_authenticates_with_basic_auth():
    async def scenario():
        async with CentralSystem(heartbeat_interval=1) as csms:
            csms.boot_status = RegistrationStatus.pending
            spec = StationSpec(ID, url=csms.url + "/", password="s3cret")
            async with Fleet([spec], timing=FAST) as fleet:
                station = fleet[ID]
                await wait_until_async(lambda: csms.seen(ID, "BootNotification"), 10, "first boot")
                assert station.state is StationState.BOOTING
                csms.boot_status = RegistrationStatus.accepted
                await wait_until_async(lambda: station.online, 5, "accepted boot")
                assert station.events("boot_not_accepted")[0]["status"] == "Pending"
                await wait_until_async(lambda: csms.seen(ID, "Heartbeat"), 5, "a heartbeat")

                connect = csms.seen(ID, "connect")[0]
                assert connect["path"] == f"/ocpp/{ID}"
                token = base64.b64encode(f"{ID}:s3cret".encode()).decode()
                assert connect["authorization"] == f"Basic {token}"
                boot = csms.seen(ID, "BootNotification")[-1]
                assert boot["firmware_version"] == "4.2.85"
                assert boot["charge_point_vendor"] == "SimVendor"
                assert boot["charge_point_serial_number"] == f"SN-{ID}"

    run(scenario())


def test_it_journals_a_rejected_boot_whose_connection_closes_right_after_the_answer():
    async def scenario():
        async with CentralSystem() as csms:
            csms.boot_status = RegistrationStatus.rejected
            csms.close_after_rejecting = True
            async with Fleet([StationSpec(ID, url=csms.url)], timing=FAST) as fleet:
                station = fleet[ID]
                await wait_until_async(
                    lambda: len(csms.seen(ID, "disconnect")) >= 3, 10, "three rejected boots"
                )
                rejected = [
                    e for e in station.events("boot_not_accepted") if e["status"] == "Rejected"
                ]
                assert len(rejected) >= 2, station.events("boot_not_accepted")
                assert rejected[0]["url"] == csms.url

    run(scenario())
