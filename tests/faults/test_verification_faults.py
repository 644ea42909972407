"""Faults against "verified": a station that falls back after booting on the target, an
impostor with the station's identity, Redis losing the boot records mid-batch.

Each test judges the batch by the stations' own state (tests/faults/ground_truth.py).
"""

from __future__ import annotations

import contextlib
import os
import signal

import pytest
import redis
from django.core.management import call_command

from devstack.processes import port_open, redis_server, wait_until
from fleet.models import StationEvent
from migrations_app.models import MigrationBatch, OcppExchange, StateChange, StationMigration
from migrations_app.services.batches import batch_report
from ocpp_gateway.envelopes import EventKind
from ocpp_gateway.simulator.fleet import Fleet
from ocpp_gateway.simulator.spec import Behaviour, StationSpec, Timing
from tests.faults.ground_truth import judge
from tests.migrations_app.conftest import by_identity, migrate, wait_batch
from tests.migrations_app.conftest import stack as stack  # the fixture: the migration stack

P1 = "NetworkConnectionProfile1"
P2 = "NetworkConnectionProfile2"
PRIORITY = "NetworkConfigurationPriority"
State = StationMigration.State


def test_stations_that_fall_back_two_seconds_after_booting_on_the_target_are_not_done(stack):
    specs = [
        *(stack.station(f"CP-FB{i}", behaviour=Behaviour(fall_back_after=2)) for i in range(3)),
        stack.station("CP-STAYS"),
    ]
    with stack.fleet(specs) as fleet:
        code, report = migrate("--to", "csms-2", "--from", "csms-1", "--rate-per-minute", "0")
        entries = by_identity(report)
        assert code == 1
        assert entries["CP-STAYS"]["state"] == "done"
        for i in range(3):
            entry, station = entries[f"CP-FB{i}"], fleet[f"CP-FB{i}"]
            assert entry["state"] == "failed", entry
            assert "fell back to csms-1 after booting on csms-2" in entry["reason"]
            assert entry["reason"].endswith("restored")
            assert len(station.events("lost_url")) == 1  # it really was on the target first
        judge(report, fleet, stack)
    # Only the station that stayed had its old registration marked for removal.
    assert list(
        StateChange.objects.filter(to_state=State.VERIFIED).values_list(
            "migration__station__identity", flat=True
        )
    ) == ["CP-STAYS"]


@pytest.mark.slow
def test_an_impostor_on_the_target_while_the_station_reboots_never_verifies(stack):
    """Needs the admission gateway (after the merge): the impostor holding the identity on
    the target (409) or refused there (Rejected, identity held off) keeps the real station
    out, so its profile fallback takes it back to the source."""
    with stack.fleet([stack.station("CP-REAL")], reboot_delay=8) as fleet:
        real = fleet["CP-REAL"]
        call_command(
            "migrate_fleet", "--to", "csms-2", "--station", "CP-REAL", "--boot-timeout", "45"
        )
        batch = MigrationBatch.objects.get()
        wait_until(lambda: real.reset_count == 1, 30, "the real station's Reset")
        impostor = StationSpec(
            "CP-REAL", url=stack.target_url, serial_number="SN-IMPOSTOR", profile_timeout=3
        )
        timing = Timing(retry_interval=0.2, reconnect_delay=0.3)
        with Fleet([impostor], timing=timing):
            wait_batch(batch, MigrationBatch.State.FINISHED, timeout=90)
        report = batch_report(batch)
        entry = by_identity(report)["CP-REAL"]
        assert entry["state"] == "failed", entry
        assert not StateChange.objects.filter(to_state=State.VERIFIED).exists()
        # Recorded by the target's gateway (boot rejected) or by the verification.
        assert StationEvent.objects.filter(
            kind=EventKind.SECURITY, station__identity="CP-REAL"
        ).exists()
        wait_until(lambda: real.connected_url == stack.source_url, 30, "the real one on csms-1")
        assert real.config[PRIORITY] == f"{P1},{P2}"
        assert "ROLLBACK INCOMPLETE" not in entry["reason"]
        judge(report, fleet, stack)


@pytest.mark.slow
def test_redis_killed_and_restarted_empty_after_the_reset_wave(stack, redis_client, request):
    """Needs a worker that survives a broker restart and gateways that ride out a Redis
    outage (after the merge)."""
    specs = [stack.station(f"CP-R{i:02}") for i in range(8)]
    with stack.fleet(specs, reboot_delay=1.0) as fleet:
        call_command(
            "migrate_fleet", "--to", "csms-2", "--from", "csms-1",
            "--rate-per-minute", "0", "--boot-timeout", "90",
        )  # fmt: skip
        batch = MigrationBatch.objects.get()
        wait_until(
            lambda: all(s.online and s.connected_url == stack.target_url for s in fleet),
            60,
            "every station to boot on the target",
        )
        restart_empty(redis_client, request)
        wait_batch(batch, MigrationBatch.State.FINISHED, timeout=150)
        report = batch_report(batch)
        assert {entry["state"] for entry in report["stations"]} == {"done"}, report
        for station in fleet:
            confirm = OcppExchange.objects.filter(
                migration__station__identity=station.identity,
                step=State.AWAITING_BOOT,
                action="GetConfiguration",
                csms="csms-2",
                outcome="result",
            )
            assert confirm.exists(), station.identity
        judge(report, fleet, stack)


def restart_empty(client: redis.Redis, request: pytest.FixtureRequest) -> None:
    """SIGKILL the session's redis-server and start an empty one on its port.

    The new server lives until the end of the session: the other tests share that URL.
    """
    pid = client.info("server")["process_id"]
    port = client.get_connection_kwargs()["port"]
    workdir = request.getfixturevalue("tmp_path_factory").mktemp("redis-restarted")
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not port_open(port), 10, "the killed redis-server to be gone")
    server = contextlib.ExitStack()
    server.enter_context(redis_server(port, workdir, log=workdir / "redis.log"))
    request.config.add_cleanup(server.close)
