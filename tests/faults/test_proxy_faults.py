"""Faults of proxy mode: the upstream CSMS 2 behind the target's gateway rejects the boot,
is down when the station arrives, keeps it Pending, accepts a station that then falls back,
or accepts other hardware under the station's identity.

Each gateway is a proxy in front of its own upstream CSMS (tests/upstream_csms.py); each
test judges the batch by the stations' own state (tests/faults/ground_truth.py): no report
that differs from where a station is, no station reset twice.
"""

from __future__ import annotations

import pytest
from django.core.management import call_command
from ocpp.v16.enums import RegistrationStatus

from devstack.processes import wait_until
from fleet.models import StationEvent
from fleet.services.registrations import RegistrationRow, registrations_import
from migrations_app.models import MigrationBatch, StateChange, StationMigration
from migrations_app.services.batches import batch_report
from ocpp_gateway.envelopes import EventKind, registry_key
from ocpp_gateway.simulator.fleet import Fleet
from ocpp_gateway.simulator.spec import Behaviour, StationSpec, Timing
from tests.faults.ground_truth import judge
from tests.migrations_app.conftest import by_identity, migrate, wait_batch
from tests.migrations_app.conftest import proxied_stack as proxied_stack  # the fixture
from tests.migrations_app.conftest import upstream_options as upstream_options  # the fixture
from tests.migrations_app.conftest import upstreams as upstreams  # the fixture
from tests.migrations_app.test_proxy_migration import boot_answers, leaks

P1 = "NetworkConnectionProfile1"
P2 = "NetworkConnectionProfile2"
PRIORITY = "NetworkConfigurationPriority"
State = StationMigration.State


def run_batch(*args: str, within: float = 90) -> dict:
    """Start a batch (not --wait) and wait, bounded, for it to end; its report."""
    call_command("migrate_fleet", "--to", "csms-2", "--from", "csms-1", *args)
    batch = MigrationBatch.objects.get()
    wait_batch(batch, MigrationBatch.State.FINISHED, timeout=within)
    return batch_report(batch)


def verified() -> list[str]:
    return list(
        StateChange.objects.filter(to_state=State.VERIFIED).values_list(
            "migration__station__identity", flat=True
        )
    )


def test_upstream_csms_2_rejecting_the_boot_fails_the_migration_at_once(proxied_stack):
    """Upstream CSMS 2 answers Rejected: the proxy gives the station that answer, closes it
    and holds it off, so its own fallback takes it back to csms-1, where the priority is
    restored. The batch's boot timeout is far longer than its wait: it fails on the
    upstream's verdict, not on a timeout."""
    stack = proxied_stack
    stack.upstream_target.set_boot_status("CP-UREJ", "Rejected")
    specs = [stack.station("CP-UREJ"), stack.station("CP-UOK")]
    with stack.fleet(specs) as fleet:
        report = run_batch("--rate-per-minute", "0", "--boot-timeout", "600", within=90)
        entries = by_identity(report)
        assert entries["CP-UOK"]["state"] == "done", entries["CP-UOK"]
        entry = entries["CP-UREJ"]
        assert entry["state"] == "failed", entry
        assert "the target rejected the BootNotification" in entry["reason"], entry
        assert entry["reason"].endswith("restored"), entry
        station = fleet["CP-UREJ"]
        assert station.reset_count == 1
        # The Rejected came from the upstream: it saw the boot and answered it.
        assert RegistrationStatus.rejected in boot_answers(stack.upstream_target, "CP-UREJ")
        assert any(e["status"] == "Rejected" for e in station.events("boot_not_accepted"))
        boot = StationEvent.objects.filter(
            kind=EventKind.BOOT, station__identity="CP-UREJ", csms__name="csms-2"
        ).first()
        assert boot is not None and boot.data.get("status") == "Rejected"
        judge(report, fleet, stack)
    assert verified() == ["CP-UOK"]
    for identity in ("CP-UREJ", "CP-UOK"):
        assert leaks(stack.upstream_source, identity) == []
        assert leaks(stack.upstream_target, identity) == []


def test_upstream_csms_2_down_when_the_station_connects_it_falls_back_by_itself(proxied_stack):
    """The target's gateway is up, its upstream is not: the proxy refuses the station's
    handshake (HTTP 502), the station's profile fallback takes it back to csms-1, and the
    report says failed with the priority restored."""
    stack = proxied_stack
    with stack.fleet([stack.station("CP-UDOWN")]) as fleet:
        stack.upstream_target.stop()
        report = run_batch("--rate-per-minute", "0", "--boot-timeout", "60", within=90)
        entry = by_identity(report)["CP-UDOWN"]
        assert entry["state"] == "failed", entry
        assert "fell back to csms-1" in entry["reason"], entry
        assert entry["reason"].endswith("restored"), entry
        station = fleet["CP-UDOWN"]
        assert station.reset_count == 1
        refused = [e for e in station.events("connect_failed") if e["url"] == stack.target_url]
        assert refused and all("502" in e["error"] for e in refused), refused
        assert not any(e["url"] == stack.target_url for e in station.events("connected"))
        assert station.connected_url == stack.source_url
        assert station.config[PRIORITY] == f"{P1},{P2}"
        judge(report, fleet, stack)
    assert stack.upstream_target.boots("CP-UDOWN") == []
    assert verified() == []
    assert leaks(stack.upstream_source, "CP-UDOWN") == []


# The upstream's Pending carries its heartbeat interval as the retry interval: short, so
# the station asks again within the test.
@pytest.mark.slow
@pytest.mark.parametrize("upstream_options", [{"heartbeat_interval": 3}])
def test_upstream_csms_2_answering_pending_until_the_boot_timeout_never_verifies(proxied_stack):
    """Upstream CSMS 2 answers Pending to every boot: the station stays on the target,
    waiting for its verdict, and the migration fails at the boot timeout. Nothing can be
    restored through the source while the station is on the target, and the report says
    so; once the upstream accepts it later, the station is on the target."""
    stack = proxied_stack
    stack.upstream_target.set_boot_status("CP-UPEND", "Pending")
    with stack.fleet([stack.station("CP-UPEND")]) as fleet:
        station = fleet["CP-UPEND"]
        report = run_batch("--rate-per-minute", "0", "--boot-timeout", "15", within=120)
        entry = by_identity(report)["CP-UPEND"]
        assert entry["state"] == "failed", entry
        assert "the target still answered the BootNotification Pending" in entry["reason"]
        # The station is on the target, waiting: the source cannot reach it to restore.
        assert "ROLLBACK INCOMPLETE" in entry["reason"], entry
        assert len(boot_answers(stack.upstream_target, "CP-UPEND")) >= 2
        assert set(boot_answers(stack.upstream_target, "CP-UPEND")) == {"Pending"}
        assert station.reset_count == 1
        # The upstream accepts it at last: it is on the target, which the report admits
        # (the rollback through the source could not reach it).
        stack.upstream_target.set_boot_status("CP-UPEND", "Accepted")
        wait_until(lambda: station.online, 30, "the station accepted by upstream CSMS 2")
        assert station.connected_url == stack.target_url
        judge(report, fleet, stack)
    assert verified() == []


@pytest.mark.slow
def test_a_station_that_falls_back_after_upstream_csms_2_accepted_it_is_not_verified(
    proxied_stack,
):
    stack = proxied_stack
    specs = [
        stack.station("CP-UFB", behaviour=Behaviour(fall_back_after=2)),
        stack.station("CP-USTAYS"),
    ]
    with stack.fleet(specs) as fleet:
        code, report = migrate("--to", "csms-2", "--from", "csms-1", "--rate-per-minute", "0")
        entries = by_identity(report)
        assert code == 1
        assert entries["CP-USTAYS"]["state"] == "done", entries["CP-USTAYS"]
        entry = entries["CP-UFB"]
        assert entry["state"] == "failed", entry
        assert "fell back to csms-1 after booting on csms-2" in entry["reason"], entry
        assert entry["reason"].endswith("restored"), entry
        # Upstream CSMS 2 really accepted it before it fell back.
        assert boot_answers(stack.upstream_target, "CP-UFB") == [RegistrationStatus.accepted]
        assert len(fleet["CP-UFB"].events("lost_url")) == 1
        judge(report, fleet, stack)
    assert verified() == ["CP-USTAYS"]


@pytest.mark.slow
def test_other_hardware_accepted_by_upstream_csms_2_never_verifies(proxied_stack):
    """csms-2 has the station registered without a serial number, so its proxy forwards any
    hardware's boot, and the upstream accepts it: an impostor with the station's identity
    and another serial boots there while the real station reboots. The upstream's Accepted
    is not enough: other hardware is a security event and never verifies."""
    stack = proxied_stack
    real_spec = stack.station("CP-UHW")
    registrations_import(csms=stack.target, rows=[RegistrationRow(2, "CP-UHW", "", "")])
    wait_until(lambda: stack.redis.hget(registry_key("csms-2"), "CP-UHW"), 10, "csms-2's registry")
    with stack.fleet([real_spec], reboot_delay=8, register_on_target=False) as fleet:
        real = fleet["CP-UHW"]
        call_command(
            "migrate_fleet", "--to", "csms-2", "--station", "CP-UHW", "--boot-timeout", "45"
        )
        batch = MigrationBatch.objects.get()
        wait_until(lambda: real.reset_count == 1, 30, "the real station's Reset")
        impostor = StationSpec(
            "CP-UHW", url=stack.target_url, serial_number="SN-IMPOSTOR", profile_timeout=3
        )
        with Fleet([impostor], timing=Timing(retry_interval=0.2, reconnect_delay=0.3)):
            wait_batch(batch, MigrationBatch.State.FINISHED, timeout=90)
        report = batch_report(batch)
        entry = by_identity(report)["CP-UHW"]
        assert entry["state"] == "failed", entry
        serials = [b["charge_point_serial_number"] for b in stack.upstream_target.boots("CP-UHW")]
        assert "SN-IMPOSTOR" in serials
        assert StationEvent.objects.filter(
            kind=EventKind.SECURITY, station__identity="CP-UHW"
        ).exists()
        wait_until(lambda: real.connected_url == stack.source_url, 30, "the real one on csms-1")
        assert real.reset_count == 1
        judge(report, fleet, stack)
    assert verified() == []
