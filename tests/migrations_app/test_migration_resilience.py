"""A worker killed mid-batch, and a mixed fleet through the real CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess

from django.db.models import Q

from devstack.processes import ROOT, python, wait_until
from migrations_app.models import MigrationBatch, StateChange, StationMigration
from migrations_app.services import workflow
from ocpp_gateway.simulator.spec import Behaviour
from tests.conftest import process_env
from tests.migrations_app.conftest import WORKER_ENV, by_identity

P1 = "NetworkConnectionProfile1"
P2 = "NetworkConnectionProfile2"
PRIORITY = "NetworkConfigurationPriority"
State = StationMigration.State


def test_a_worker_killed_mid_batch_loses_no_station_and_resets_none_twice(stack, redis_url):
    specs = [stack.station(f"CP-K{i:02}") for i in range(30)]
    with stack.fleet(specs, reboot_delay=1.5) as fleet:
        from django.core.management import call_command

        call_command(
            "migrate_fleet", "--to", "csms-2", "--from", "csms-1",
            "--max-in-flight", "10", "--rate-per-minute", "0", "--boot-timeout", "60",
        )  # fmt: skip
        batch = MigrationBatch.objects.get()
        wait_until(
            lambda: (
                batch.stations.filter(state__in=[State.RESETTING, State.AWAITING_BOOT]).count() >= 3
            ),
            30,
            "stations in the middle of their reset",
        )
        os.killpg(stack.worker.pid, signal.SIGKILL)
        stack.worker.wait(10)
        stack.start_worker("w2", beat=True, **WORKER_ENV)
        wait_until(
            lambda: MigrationBatch.objects.get(id=batch.id).state == MigrationBatch.State.FINISHED,
            120,
            "the batch to finish on the new worker",
        )
        not_done = {
            row.station.identity: (row.state, row.failed_step, row.reason)
            for row in batch.stations.exclude(state=State.DONE).select_related("station")
        }
        assert not not_done, not_done
        for station in fleet:
            assert len(station.events("reset")) == 1, station.identity
            assert station.connected_url == stack.target_url


def test_migrate_fleet_over_a_mixed_fleet_reports_what_each_station_did(stack, redis_url):
    behaviours = {
        range(0, 5): {"firmware": "4.2.9"},
        range(5, 8): {"behaviour": Behaviour(reject_url_writes=True)},
        range(8, 11): {"behaviour": Behaviour(reject_reset=True)},
        range(11, 14): {"behaviour": Behaviour(target_unreachable=True), "profile_timeout": 2},
        range(14, 17): {"behaviour": Behaviour(charging=True, charging_seconds=3)},
        range(17, 20): {"firmware": "3.5.54"},
    }
    # Each kind of station at least three times, and plain ones enough for several rounds
    # of the in-flight limit (the load itself is the benchmarks' business).
    specs = []
    for i in range(80):
        extra = next((v for r, v in behaviours.items() if i in r), {})
        specs.append(stack.station(f"CP-M{i:03}", **extra))
    max_in_flight = 20
    with stack.fleet(specs, reboot_delay=1.0) as fleet:
        result = subprocess.run(
            python(
                "manage.py", "migrate_fleet", "--to", "csms-2", "--from", "csms-1",
                "--max-in-flight", str(max_in_flight), "--rate-per-minute", "0",
                "--boot-timeout", "60", "--no-brake", "--wait", "--json",
            ),
            cwd=ROOT, env={**os.environ, **process_env(redis_url)},
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert result.returncode == 1, result.stderr  # some stations failed
        report = json.loads(result.stdout)
        entries = by_identity(report)
        assert len(entries) == 80
        for spec in specs:
            entry, station = entries[spec.identity], fleet[spec.identity]
            resets = station.events("reset")
            if entry["state"] != "done":
                assert entry["reason"], entry
            if spec.firmware == "4.2.9":
                assert entry["state"] == "skipped"
                assert station.events("config_changed") == [] and resets == []
            elif spec.behaviour.reject_url_writes:
                assert (entry["state"], entry["step"]) == ("failed", "setting_url")
                assert resets == [] and station.config[PRIORITY] == f"{P1},{P2}"
            elif spec.behaviour.reject_reset:
                assert (entry["state"], entry["step"]) == ("failed", "resetting")
                assert station.events("rebooted") == []
                assert station.config[PRIORITY] == f"{P1},{P2}"
            elif spec.behaviour.target_unreachable:
                assert (entry["state"], entry["step"]) == ("failed", "awaiting_boot")
                assert entry["failure_kind"] in {"fallback", "timeout"}, entry
                assert station.connected_url == stack.source_url
                assert station.config[PRIORITY] == f"{P1},{P2}"
            else:
                assert entry["state"] == "done", entry
                assert len(resets) == 1 and station.connected_url == stack.target_url
        assert report["counts"] == {"done": 66, "failed": 9, "skipped": 5}

    assert most_in_flight_at_once() <= max_in_flight


def most_in_flight_at_once() -> int:
    """From the recorded history: starts (pending -> preflight) and ends (terminal)."""
    terminal = list(workflow.TERMINAL)
    changes = StateChange.objects.filter(
        Q(from_state=State.PENDING) | Q(to_state__in=terminal)
    ).exclude(from_state=State.PENDING, to_state__in=terminal)
    timeline = sorted((c.at, c.id, 1 if c.from_state == State.PENDING else -1) for c in changes)
    most = current = 0
    for _, _, delta in timeline:
        current += delta
        most = max(most, current)
    return most


def test_every_step_task_has_time_limits_that_fit_four_commands_and_a_rollback_after():
    from django.conf import settings

    import migrations_app.tasks  # noqa: F401  (registers the tasks)
    from fleet.celery import app

    command = settings.OCPP_COMMAND_TIMEOUT + 1
    for name in workflow.TASK_NAMES:
        task = app.tasks[name]
        assert 4 * command < task.soft_time_limit, name
        assert task.soft_time_limit + 2 * command < task.time_limit, name
