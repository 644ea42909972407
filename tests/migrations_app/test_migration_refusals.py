"""Stations that must not be migrated, or refuse a step: skipped or failed, never worse off."""

from __future__ import annotations

import time

from devstack.processes import wait_until
from fleet.models import ChargingStation
from migrations_app.models import OcppExchange
from ocpp_gateway.simulator.spec import Behaviour
from tests.migrations_app.conftest import by_identity, migrate

P1 = "NetworkConnectionProfile1"
P2 = "NetworkConnectionProfile2"
PRIORITY = "NetworkConfigurationPriority"
ORIGINAL = f"{P1},{P2}"


def untouched(station) -> bool:
    return station.events("config_changed") == [] and station.events("reset") == []


def test_old_firmware_is_skipped_untouched(stack):
    specs = [
        stack.station("CP-429", firmware="4.2.9"),
        stack.station("CP-359", firmware="3.5.9"),
        stack.station("CP-4284", firmware="4.2.84"),
    ]
    with stack.fleet(specs) as fleet:
        code, report = migrate("--to", "csms-2", "--from", "csms-1")
        assert code == 0, report  # skipped is not failed
        for identity, entry in by_identity(report).items():
            assert entry["state"] == "skipped"
            assert "older than" in entry["reason"]
            assert untouched(fleet[identity])
    assert not OcppExchange.objects.exists()  # the gate sends nothing at all


def test_a_station_without_the_network_keys_is_skipped_untouched(stack):
    with stack.fleet([stack.station("CP-NOKEYS", firmware="4.2.9")]) as fleet:
        # The inventory does not know its firmware, so step 1 is what finds out.
        ChargingStation.objects.filter(identity="CP-NOKEYS").update(firmware_version="")
        code, report = migrate("--to", "csms-2", "--station", "CP-NOKEYS")
        assert code == 0
        entry = by_identity(report)["CP-NOKEYS"]
        assert entry["state"] == "skipped"
        assert entry["reason"].startswith("firmware lacks network profile keys")
        assert untouched(fleet["CP-NOKEYS"])


def test_a_rejected_reset_fails_with_the_priority_restored(stack):
    specs = [stack.station("CP-NORESET", behaviour=Behaviour(reject_reset=True))]
    with stack.fleet(specs) as fleet:
        code, report = migrate("--to", "csms-2", "--station", "CP-NORESET")
        entry = by_identity(report)["CP-NORESET"]
        station = fleet["CP-NORESET"]
        assert code == 1
        assert entry["state"] == "failed" and entry["step"] == "resetting"
        assert entry["failure_kind"] == "rejected"
        assert "refused the Reset" in entry["reason"] and "restored" in entry["reason"]
        assert station.config[PRIORITY] == ORIGINAL
        assert station.config[P2] == ""
        assert station.events("rebooted") == []


def test_an_unreachable_target_fails_fast_on_fallback_and_restores_the_priority(stack):
    specs = [
        stack.station(
            "CP-FALLBACK", profile_timeout=2, behaviour=Behaviour(target_unreachable=True)
        )
    ]
    with stack.fleet(specs) as fleet:
        started = time.monotonic()
        code, report = migrate(
            "--to", "csms-2", "--station", "CP-FALLBACK", "--boot-timeout", "120"
        )
        took = time.monotonic() - started
        entry = by_identity(report)["CP-FALLBACK"]
        station = fleet["CP-FALLBACK"]
        assert code == 1
        assert entry["state"] == "failed" and "fell back to csms-1" in entry["reason"]
        assert took < 60, "the fallback must fail the station long before the boot timeout"
        assert station.connected_url == stack.source_url
        assert station.config[PRIORITY] == ORIGINAL  # source first again
        assert len(station.events("rebooted")) == 1


def test_a_charging_station_waits_and_resets_once_idle(stack):
    specs = [stack.station("CP-CHARGING", behaviour=Behaviour(charging=True, charging_seconds=6))]
    with stack.fleet(specs) as fleet:
        station = fleet["CP-CHARGING"]
        code, report = migrate("--to", "csms-2", "--station", "CP-CHARGING")
        assert code == 0, report
        stopped = [e.t for e in station.events("charging_stopped")]
        resets = [e.t for e in station.events("reset")]
        assert len(resets) == 1 and stopped and stopped[0] < resets[0]
        assert station.connected_url == stack.target_url


def test_a_charging_station_past_the_idle_limit_fails_busy_and_is_rolled_back(stack):
    specs = [stack.station("CP-BUSY", behaviour=Behaviour(charging=True))]
    with stack.fleet(specs) as fleet:
        code, report = migrate("--to", "csms-2", "--station", "CP-BUSY", "--idle-wait", "2")
        assert code == 1
        entry = by_identity(report)["CP-BUSY"]
        station = fleet["CP-BUSY"]
        assert entry["state"] == "failed" and entry["reason"].startswith("busy")
        assert station.events("reset") == []
        assert station.config[PRIORITY] == ORIGINAL
        assert station.config[P2] == ""


def test_an_offline_station_fails_offline_within_the_boot_timeout(stack):
    specs = [
        stack.station("CP-GONE", behaviour=Behaviour(drop_offline=True, drop_offline_after=0.5))
    ]
    with stack.fleet(specs):
        wait_until(
            lambda: not ChargingStation.objects.get(identity="CP-GONE").connected,
            15,
            "the station to drop offline",
        )
        started = time.monotonic()
        code, report = migrate("--to", "csms-2", "--station", "CP-GONE", "--boot-timeout", "4")
        took = time.monotonic() - started
    entry = by_identity(report)["CP-GONE"]
    assert code == 1
    assert entry["state"] == "failed" and entry["reason"].startswith("offline")
    assert took < 4 + 5


def test_a_station_running_on_its_second_profile_is_not_overwritten(stack):
    # Profile 1 (first in the priority) is dead, so the station fell back to profile 2,
    # which holds the source URL: writing the target there would leave no way back.
    dead = "ws://127.0.0.1:9/ocpp"
    specs = [stack.station("CP-FELLBACK", url=dead, url2=stack.source_url, profile_timeout=1)]
    with stack.fleet(specs) as fleet:
        code, report = migrate("--to", "csms-2", "--station", "CP-FELLBACK")
        entry = by_identity(report)["CP-FELLBACK"]
        station = fleet["CP-FELLBACK"]
        assert code == 1
        assert (entry["state"], entry["step"]) == ("failed", "reading_config")
        assert "refusing to overwrite" in entry["reason"]
        assert untouched(station)
        assert station.connected_url == stack.source_url
