"""The vendor's migration procedure against simulated stations over real sockets."""

from __future__ import annotations

from ocpp.v16 import call
from ocpp.v16.enums import ConfigurationStatus, ResetStatus, ResetType

from devstack.processes import wait_until_async
from ocpp_gateway.simulator import Behaviour, Fleet, StationSpec, StationState, read_journal
from tests.simulator.csms import FAST, CentralSystem, closed_port_url, run

ID = "SIM-0001"
PROFILE_2 = "NetworkConnectionProfile2"
PRIORITY = "NetworkConfigurationPriority"
NEW_PRIORITY = "NetworkConnectionProfile2,NetworkConnectionProfile1"


async def point_at(csms: CentralSystem, url: str) -> None:
    """Steps 2-4 of the procedure, asserting each answer the procedure expects."""
    result = await csms.call(ID, call.ChangeConfiguration(key=PROFILE_2, value=url))
    assert result.status == ConfigurationStatus.accepted
    result = await csms.call(ID, call.ChangeConfiguration(key=PRIORITY, value=NEW_PRIORITY))
    assert result.status == ConfigurationStatus.reboot_required
    result = await csms.call(ID, call.Reset(type=ResetType.hard))
    assert result.status == ResetStatus.accepted


def test_it_boots_on_the_new_csms_after_reset(tmp_path):
    journal = tmp_path / "journal.jsonl"

    async def scenario():
        async with CentralSystem() as a, CentralSystem() as b:
            fleet = Fleet([StationSpec(ID, url=a.url)], timing=FAST, journal=journal)
            async with fleet:
                station = fleet[ID]
                await wait_until_async(lambda: station.online, 10, "boot on A")
                await point_at(a, b.url)

                await wait_until_async(lambda: b.seen(ID, "BootNotification"), 10, "boot on B")
                await wait_until_async(lambda: station.online, 10, "online on B")
                assert a.seen(ID, "disconnect")
                assert b.seen(ID, "connect")[0]["path"] == f"/ocpp/{ID}"
                assert b.seen(ID, "connect")[0]["subprotocol"] == "ocpp1.6"
                assert station.connected_url == b.url
                assert station.connected_profile == PROFILE_2
                assert station.reset_count == 1
                assert len(a.seen(ID, "BootNotification")) == 1
                await wait_until_async(
                    lambda: {s["connector_id"] for s in b.seen(ID, "StatusNotification")} == {0, 1},
                    10,
                    "a status for connector 0 and connector 1 on B",
                )

                events = [e.event for e in station.history]
                order = ["reset", "disconnected", "rebooted", "connected", "boot_accepted"]
                tail = events[events.index("reset") :]
                assert [e for e in tail if e in order] == order

    run(scenario())
    lines = read_journal(journal)
    assert {line["station"] for line in lines} == {ID}
    changes = [line for line in lines if line["event"] == "config_changed"]
    assert [(c["key"], c["status"]) for c in changes] == [
        (PROFILE_2, "Accepted"),
        (PRIORITY, "RebootRequired"),
    ]
    assert [line["url"] for line in lines if line["event"] == "boot_accepted"][-1].endswith("/ocpp")
    assert all(isinstance(line["t"], float) for line in lines)


def test_it_falls_back_when_the_new_csms_is_unreachable(tmp_path):
    journal = tmp_path / "journal.jsonl"
    nowhere = closed_port_url()

    async def scenario():
        async with CentralSystem() as a:
            spec = StationSpec(ID, url=a.url, profile_timeout=1)
            async with Fleet([spec], timing=FAST, journal=journal) as fleet:
                station = fleet[ID]
                await wait_until_async(lambda: station.online, 10, "boot on A")
                await point_at(a, nowhere)

                await wait_until_async(
                    lambda: len(a.seen(ID, "BootNotification")) == 2, 10, "boot on A"
                )
                await wait_until_async(lambda: station.online, 10, "online again")
                assert station.connected_url == a.url
                assert station.connected_profile == "NetworkConnectionProfile1"
                fell_back = station.events("fell_back")
                assert [(e["from_url"], e["to_url"]) for e in fell_back] == [(nowhere, a.url)]
                failures = station.events("connect_failed")
                assert failures and all(e["url"] == nowhere for e in failures)
                # Retried for the whole profile timeout, not just once.
                assert len(failures) >= 3
                assert failures[-1].t - failures[0].t >= 0.5

    run(scenario())
    events = [line["event"] for line in read_journal(journal)]
    assert events.index("fell_back") > events.index("rebooted")


def test_it_cannot_reach_a_url_it_was_not_installed_with_when_target_unreachable():
    async def scenario():
        async with CentralSystem() as a, CentralSystem() as b:
            behaviour = Behaviour(target_unreachable=True)
            spec = StationSpec(ID, url=a.url, profile_timeout=1, behaviour=behaviour)
            async with Fleet([spec], timing=FAST) as fleet:
                station = fleet[ID]
                await wait_until_async(lambda: station.online, 10, "boot on A")
                await point_at(a, b.url)

                await wait_until_async(
                    lambda: len(a.seen(ID, "BootNotification")) == 2, 10, "fallback"
                )
                assert not b.seen(ID, "connect")
                assert station.events("fell_back")[0]["from_url"] == b.url
                assert "target-unreachable" in station.events("connect_failed")[0]["error"]

    run(scenario())


def test_it_applies_nothing_until_the_reset():
    async def scenario():
        async with (
            CentralSystem() as a,
            CentralSystem() as b,
            Fleet([StationSpec(ID, url=a.url)], timing=FAST) as fleet,
        ):
            station = fleet[ID]
            await wait_until_async(lambda: station.online, 10, "boot on A")
            result = await a.call(ID, call.ChangeConfiguration(key=PROFILE_2, value=b.url))
            assert result.status == ConfigurationStatus.accepted
            result = await a.call(ID, call.ChangeConfiguration(key=PRIORITY, value=NEW_PRIORITY))
            assert result.status == ConfigurationStatus.reboot_required
            # A drop that is not a Reset reconnects with the settings of the last boot.
            await a.stations[ID]._connection.close()
            await wait_until_async(
                lambda: len(a.seen(ID, "BootNotification")) == 2, 10, "reconnect"
            )
            assert not b.seen(ID, "connect")
            assert station.reset_count == 0
            assert station.config[PRIORITY] == NEW_PRIORITY

    run(scenario())


def test_it_keeps_its_csms_when_reset_is_rejected():
    async def scenario():
        async with CentralSystem() as a, CentralSystem() as b:
            spec = StationSpec(ID, url=a.url, behaviour=Behaviour(reject_reset=True))
            async with Fleet([spec], timing=FAST) as fleet:
                station = fleet[ID]
                await wait_until_async(lambda: station.online, 10, "boot on A")
                await a.call(ID, call.ChangeConfiguration(key=PROFILE_2, value=b.url))
                result = await a.call(ID, call.Reset(type=ResetType.hard))
                assert result.status == ResetStatus.rejected
                # Still answering on the same connection.
                await a.call(ID, call.GetConfiguration(key=[PRIORITY]))
                assert station.reset_count == 0
                assert station.state is StationState.ONLINE
                assert [e["status"] for e in station.events("reset")] == ["Rejected"]
                assert not a.seen(ID, "disconnect")

    run(scenario())


def test_it_rejects_url_writes_when_told_to():
    async def scenario():
        async with CentralSystem() as a, CentralSystem() as b:
            spec = StationSpec(ID, url=a.url, behaviour=Behaviour(reject_url_writes=True))
            async with Fleet([spec], timing=FAST) as fleet:
                station = fleet[ID]
                await wait_until_async(lambda: station.online, 10, "boot on A")
                result = await a.call(ID, call.ChangeConfiguration(key=PROFILE_2, value=b.url))
                assert result.status == ConfigurationStatus.rejected
                result = await a.call(
                    ID, call.ChangeConfiguration(key=PRIORITY, value=NEW_PRIORITY)
                )
                assert result.status == ConfigurationStatus.reboot_required
                conf = await a.call(ID, call.GetConfiguration(key=[PROFILE_2]))
                assert conf.configuration_key[0]["value"] == ""

    run(scenario())


def test_it_answers_accepted_for_priority_but_switches_at_reboot_when_told_to():
    async def scenario():
        async with CentralSystem() as a, CentralSystem() as b:
            behaviour = Behaviour(accept_priority_without_reboot=True)
            spec = StationSpec(ID, url=a.url, url2=b.url, behaviour=behaviour)
            async with Fleet([spec], timing=FAST) as fleet:
                station = fleet[ID]
                await wait_until_async(lambda: station.online, 10, "boot on A")
                result = await a.call(
                    ID, call.ChangeConfiguration(key=PRIORITY, value=NEW_PRIORITY)
                )
                assert result.status == ConfigurationStatus.accepted
                assert station.connected_url == a.url
                await a.call(ID, call.Reset(type=ResetType.soft))
                await wait_until_async(lambda: b.seen(ID, "BootNotification"), 10, "boot on B")

    run(scenario())
