"""The seed's procedure end to end: real gateways, a real worker, simulated stations."""

from __future__ import annotations

from django_celery_results.models import TaskResult

from fleet.models import ChargingStation, Registration
from migrations_app.models import OcppExchange
from ocpp_gateway.simulator.spec import Behaviour
from tests.migrations_app.conftest import by_identity, migrate

P1 = "NetworkConnectionProfile1"
P2 = "NetworkConnectionProfile2"
PRIORITY = "NetworkConfigurationPriority"


def test_happy_path_with_profile_1_or_2_active(stack):
    specs = [
        stack.station("CP-P1"),
        # Installed with CSMS 1 in slot 2, which is the active one.
        stack.station(
            "CP-P2",
            url="ws://127.0.0.1:9/unused",
            url2=stack.source_url,
            priority=f"{P2},{P1}",
        ),
    ]
    with stack.fleet(specs) as fleet:
        code, report = migrate("--to", "csms-2", "--from", "csms-1", "--rate-per-minute", "0")
        assert code == 0, report
        assert {e["state"] for e in report["stations"]} == {"done"}

        p1, p2 = fleet["CP-P1"], fleet["CP-P2"]
        assert p1.connected_url == stack.target_url and p1.reset_count == 1
        assert p1.config[P2] == stack.target_url
        assert p1.config[PRIORITY] == f"{P2},{P1}"
        assert p2.connected_url == stack.target_url and p2.reset_count == 1
        assert p2.config[P1] == stack.target_url
        assert p2.config[PRIORITY] == f"{P1},{P2}"

    for identity in ("CP-P1", "CP-P2"):
        station = ChargingStation.objects.get(identity=identity)
        assert station.csms.name == "csms-2"
        states = dict(station.registrations.values_list("csms__name", "state"))
        assert states == {
            "csms-1": Registration.State.PENDING_REMOVAL,
            "csms-2": Registration.State.ACTIVE,
        }
    actions = list(
        OcppExchange.objects.filter(migration__station__identity="CP-P1").values_list(
            "action", "outcome", "csms"
        )
    )
    assert actions == [
        ("GetConfiguration", "result", "csms-1"),
        ("ChangeConfiguration", "result", "csms-1"),
        ("ChangeConfiguration", "result", "csms-1"),
        ("Reset", "result", "csms-1"),
        # Verified only once it answered through the target, after the settle time.
        ("GetConfiguration", "result", "csms-2"),
    ]
    # Every task of a migration ignores its result: none wrote a row (a failure would).
    assert list(TaskResult.objects.values_list("task_name", "status")) == []


def test_a_url_write_rejected_fails_without_touching_priority_or_resetting(stack):
    specs = [stack.station("CP-REJ", behaviour=Behaviour(reject_url_writes=True))]
    with stack.fleet(specs) as fleet:
        code, report = migrate("--to", "csms-2", "--station", "CP-REJ")
        station = fleet["CP-REJ"]
        assert code == 1
        entry = by_identity(report)["CP-REJ"]
        assert entry["state"] == "failed" and entry["step"] == "setting_url"
        assert entry["failure_kind"] == "rejected"
        assert "did not accept the new URL" in entry["reason"]
        assert station.reset_count == 0
        assert station.config[PRIORITY] == f"{P1},{P2}"
        assert station.connected_url == stack.source_url


def test_a_station_answering_accepted_instead_of_reboot_required_still_migrates(stack):
    specs = [stack.station("CP-ACC", behaviour=Behaviour(accept_priority_without_reboot=True))]
    with stack.fleet(specs) as fleet:
        code, report = migrate("--to", "csms-2", "--station", "CP-ACC")
        assert code == 0, report
        assert fleet["CP-ACC"].connected_url == stack.target_url


def test_a_slow_reboot_is_waited_for(stack):
    with stack.fleet([stack.station("CP-SLOW")], reboot_delay=4) as fleet:
        code, report = migrate("--to", "csms-2", "--station", "CP-SLOW", "--boot-timeout", "30")
        assert code == 0, report
        assert fleet["CP-SLOW"].connected_url == stack.target_url
        assert len(fleet["CP-SLOW"].events("rebooted")) == 1


def test_an_already_migrated_station_is_done_without_a_reset(stack):
    # Installed pointing at CSMS 2 already (say, migrated by hand).
    specs = [stack.station("CP-THERE", url=stack.target_url)]
    with stack.fleet(specs) as fleet:
        code, report = migrate("--to", "csms-2", "--station", "CP-THERE")
        entry = by_identity(report)["CP-THERE"]
        assert code == 0 and entry["state"] == "done"
        assert "already migrated" in entry["reason"]
        assert fleet["CP-THERE"].events("reset") == []
        assert fleet["CP-THERE"].events("config_changed") == []


def test_a_dry_run_reads_and_reports_but_changes_nothing(stack):
    with stack.fleet([stack.station("CP-DRY")]) as fleet:
        code, report = migrate("--to", "csms-2", "--station", "CP-DRY", "--dry-run")
        entry = by_identity(report)["CP-DRY"]
        assert code == 0 and entry["state"] == "done"
        assert f"would write {P2}={stack.target_url}" in entry["reason"]
        assert fleet["CP-DRY"].events("config_changed") == []
        assert fleet["CP-DRY"].events("reset") == []
    assert ChargingStation.objects.get(identity="CP-DRY").csms.name == "csms-1"


def test_cleanup_blanks_the_old_profile_through_the_target(stack):
    with stack.fleet([stack.station("CP-CLEAN")]) as fleet:
        code, report = migrate("--to", "csms-2", "--station", "CP-CLEAN", "--cleanup")
        entry = by_identity(report)["CP-CLEAN"]
        assert code == 0 and entry["state"] == "done"
        assert f"old profile {P1} blanked" in entry["reason"]
        station = fleet["CP-CLEAN"]
        assert station.config[P1] == ""
        assert station.connected_url == stack.target_url
    cleanup = OcppExchange.objects.get(step="cleanup")
    assert cleanup.csms == "csms-2"
    assert cleanup.request == {"key": P1, "value": ""}
