"""Faults at the target's door: a target that rejects the boot, an impostor that knows the
station's password. Judged by the stations' own state (tests/faults/ground_truth.py)."""

from __future__ import annotations

import dataclasses

import pytest
from django.core.management import call_command

from devstack.processes import wait_until
from fleet.models import StationEvent
from migrations_app.models import MigrationBatch, StateChange, StationMigration
from migrations_app.services.batches import batch_report
from ocpp_gateway.envelopes import EventKind
from ocpp_gateway.simulator.fleet import Fleet
from ocpp_gateway.simulator.spec import StationSpec, Timing
from tests.faults.ground_truth import judge
from tests.migrations_app.conftest import by_identity, migrate, wait_batch
from tests.migrations_app.conftest import stack as stack  # the fixture: the migration stack

PRIORITY = "NetworkConfigurationPriority"
State = StationMigration.State


def test_a_target_that_rejects_the_boot_fails_the_migration_and_the_station_returns(stack):
    """csms-2 has the station registered with another serial number (an operator's typo):
    its gateway answers the boot Rejected, closes and holds the identity off, the station's
    own fallback takes it back to csms-1, where its priority is restored."""
    spec = stack.station("CP-TYPO")
    stack.register_on_target([dataclasses.replace(spec, serial_number="SN-TYPO")])
    with stack.fleet([spec, stack.station("CP-FINE")], register_on_target=False) as fleet:
        stack.register_on_target([stack.station("CP-FINE")])
        code, report = migrate("--to", "csms-2", "--from", "csms-1", "--rate-per-minute", "0")
        entries = by_identity(report)
        assert code == 1
        assert entries["CP-FINE"]["state"] == "done"
        entry = entries["CP-TYPO"]
        assert entry["state"] == "failed", entry
        assert "the target rejected the BootNotification" in entry["reason"]
        assert entry["reason"].endswith("restored"), entry
        station = fleet["CP-TYPO"]
        assert station.reset_count == 1
        # It really reached the target before it came back.
        assert any(e["url"] == stack.target_url for e in station.events("connected"))
        judge(report, fleet, stack)


@pytest.mark.slow
def test_an_impostor_with_the_station_password_never_verifies(stack):
    """The impostor knows the password (it passes authentication, so it may take the
    identity over) and boots with another serial while the real station reboots: a security
    event, never done, and no report that differs from where the real station is."""
    real_spec = stack.station("CP-PW", password="s3cret-station-key")
    with stack.fleet([real_spec], reboot_delay=6) as fleet:
        real = fleet["CP-PW"]
        call_command(
            "migrate_fleet", "--to", "csms-2", "--station", "CP-PW", "--boot-timeout", "40"
        )
        batch = MigrationBatch.objects.get()
        wait_until(lambda: real.reset_count == 1, 30, "the real station's Reset")
        impostor = StationSpec(
            "CP-PW",
            url=stack.target_url,
            serial_number="SN-IMPOSTOR",
            password="s3cret-station-key",
            profile_timeout=3,
        )
        with Fleet([impostor], timing=Timing(retry_interval=0.2, reconnect_delay=0.3)):
            wait_batch(batch, MigrationBatch.State.FINISHED, timeout=90)
        report = batch_report(batch)
        entry = by_identity(report)["CP-PW"]
        assert entry["state"] == "failed", entry
        assert not StateChange.objects.filter(to_state=State.VERIFIED).exists()
        assert StationEvent.objects.filter(
            kind=EventKind.SECURITY, station__identity="CP-PW"
        ).exists()
        assert real.reset_count == 1
        judge(report, fleet, stack)
