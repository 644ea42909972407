"""Behaviours that test what "verified" means: falling back after a boot, boot loops,
reconnecting without a boot, and impostors (same identity, another serial number)."""

from __future__ import annotations

import pytest
from ocpp.v16 import call
from ocpp.v16.enums import ConfigurationStatus, ResetType

from devstack.processes import wait_until_async
from ocpp_gateway.simulator import Behaviour, Fleet, StationSpec
from ocpp_gateway.simulator.cli import build_parser
from ocpp_gateway.simulator.spec import behaviour_from_json
from tests.simulator.csms import FAST, CentralSystem, run
from tests.simulator.test_cli import specs_for

ID = "SIM-0001"
PROFILE_2 = "NetworkConnectionProfile2"
PRIORITY = "NetworkConfigurationPriority"


async def move_to(csms: CentralSystem, url: str) -> None:
    result = await csms.call(ID, call.ChangeConfiguration(key=PROFILE_2, value=url))
    assert result.status == ConfigurationStatus.accepted
    await csms.call(
        ID, call.ChangeConfiguration(key=PRIORITY, value=f"{PROFILE_2},NetworkConnectionProfile1")
    )
    await csms.call(ID, call.Reset(type=ResetType.hard))


def test_it_falls_back_some_seconds_after_booting_on_a_new_url():
    async def scenario():
        async with CentralSystem() as a, CentralSystem() as b:
            spec = StationSpec(
                ID, url=a.url, profile_timeout=1, behaviour=Behaviour(fall_back_after=0.3)
            )
            async with Fleet([spec], timing=FAST) as fleet:
                station = fleet[ID]
                await wait_until_async(lambda: station.online, 10, "boot on A")
                await wait_until_async(
                    lambda: a.seen(ID, "StatusNotification"), 10, "statuses on A"
                )
                # Booted on an installed URL: nothing happens there.
                await move_to(a, b.url)
                await wait_until_async(lambda: b.seen(ID, "BootNotification"), 10, "boot on B")
                await wait_until_async(
                    lambda: len(a.seen(ID, "BootNotification")) == 2, 10, "back on A"
                )
                await wait_until_async(lambda: station.online, 10, "online on A")

                assert station.connected_url == a.url
                assert station.reset_count == 1
                assert b.seen(ID, "disconnect")[0]["code"] == 1006  # no closing handshake
                assert len(b.seen(ID, "connect")) == 1  # B stays unreachable
                assert [e["url"] for e in station.events("lost_url")] == [b.url]
                assert station.events("fell_back")[-1]["to_url"] == a.url

    run(scenario())


def test_it_reboots_in_a_loop_without_a_reset():
    async def scenario():
        async with CentralSystem() as a:
            spec = StationSpec(ID, url=a.url, behaviour=Behaviour(boot_loop=0.2))
            async with Fleet([spec], timing=FAST) as fleet:
                station = fleet[ID]
                await wait_until_async(
                    lambda: len(a.seen(ID, "BootNotification")) >= 3, 10, "3 boots"
                )
                assert station.reset_count == 0
                assert {e["type"] for e in station.events("rebooted")} == {"BootLoop"}

    run(scenario())


def test_it_reconnects_without_a_boot_but_boots_after_a_reset():
    async def scenario():
        async with CentralSystem() as a:
            spec = StationSpec(ID, url=a.url, behaviour=Behaviour(reconnect_without_boot=True))
            async with Fleet([spec], timing=FAST) as fleet:
                station = fleet[ID]
                await wait_until_async(lambda: station.online, 10, "boot")
                await a.stations[ID]._connection.close()  # the CSMS drops the connection
                await wait_until_async(lambda: len(a.seen(ID, "connect")) == 2, 10, "a reconnect")
                await wait_until_async(lambda: station.online, 10, "online again")
                assert len(a.seen(ID, "BootNotification")) == 1
                assert station.events("reconnected_without_boot")

                await a.call(ID, call.Reset(type=ResetType.hard))
                await wait_until_async(lambda: len(a.seen(ID, "BootNotification")) == 2, 10, "boot")

    run(scenario())


def test_an_impostor_has_the_identity_and_another_serial_number():
    async def scenario():
        async with CentralSystem() as a:
            real = StationSpec(ID, url=a.url)
            impostor = StationSpec(ID, url=a.url, serial_number="SN-FAKE")
            async with Fleet([real], timing=FAST):
                await wait_until_async(lambda: a.seen(ID, "BootNotification"), 10, "the real boot")
                async with Fleet([impostor], timing=FAST):
                    await wait_until_async(
                        lambda: len(a.seen(ID, "BootNotification")) >= 2, 10, "boot"
                    )
            serials = [b["charge_point_serial_number"] for b in a.seen(ID, "BootNotification")]
            assert serials[:2] == [f"SN-{ID}", "SN-FAKE"]

    run(scenario())


def test_the_new_behaviours_from_options_and_spec_files():
    specs = specs_for(
        "--count", "3", "--fall-back-after", "1:2", "--boot-loop", "2-3:30",
        "--reconnect-without-boot", "3",
    )  # fmt: skip
    assert [s.behaviour.fall_back_after for s in specs] == [2.0, None, None]
    assert [s.behaviour.boot_loop for s in specs] == [None, 30.0, 30.0]
    assert [s.behaviour.reconnect_without_boot for s in specs] == [False, False, True]
    with pytest.raises(ValueError, match="IDS:SECONDS"):
        specs_for("--count", "1", "--boot-loop", "1")
    assert behaviour_from_json({"fall-back-after": 2}).fall_back_after == 2
    with pytest.raises(ValueError, match="seconds"):
        behaviour_from_json({"boot_loop": "soon"})
    with pytest.raises(ValueError, match="> 0"):
        Behaviour(boot_loop=0)
    text = build_parser().format_help()
    for option in ("--fall-back-after", "--boot-loop", "--reconnect-without-boot"):
        assert option in text
