"""Waits are woken by the events they wait for; a wait's own timer is only its deadline.

The first tests run ingestion and the timers against a real Redis (the broker queue is read
back to see which steps were sent); the others run whole migrations on the real stack with
the waits' own timers made far longer than the test: only a wake can move them in time.
"""

from __future__ import annotations

import base64
import json
import time
from datetime import timedelta

import pytest

from fleet.models import ChargingStation, CsmsBackend, StationEvent
from fleet.services.events import events_ingest
from migrations_app.models import MigrationBatch, StateChange, StationMigration
from migrations_app.services import wakes
from migrations_app.services.steps import settle_seconds
from ocpp_gateway.envelopes import Event, EventKind
from ocpp_gateway.simulator.spec import Behaviour
from tests.migrations_app import conftest
from tests.migrations_app.conftest import build_stack, by_identity, migrate

State = StationMigration.State
# Far beyond any wait in these tests: a migration that moves in time was woken.
LONG_TIMERS = {"MIGRATION_WAIT_TIMER_SECONDS": "600", "MIGRATION_STEP_LEASE_SECONDS": "1200"}
# How soon after its event a woken step must have run: ingestion is nudged within 0.25 s,
# the rest is a loaded 2-core machine's queue; the timers are minutes away.
WOKEN_WITHIN = timedelta(seconds=15)


# --- ingestion wakes the waiting migrations ----------------------------------------------


def sent_steps(redis_client) -> list[list]:
    """The step tasks waiting in the broker's queue: [task name, args]."""
    sent = []
    for raw in redis_client.lrange("celery", 0, -1):
        message = json.loads(raw)
        args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        sent.append([message["headers"]["task"], args])
    return sorted(sent)


def publish(redis_client, kind: EventKind, station: str, **data) -> None:
    if kind is EventKind.STATUS:
        data = {"error_code": "NoError", **data}
    event = Event(kind=kind, station=station, csms="csms-2", at=time.time(), data=data)
    redis_client.xadd("ocpp:events", {"e": event.to_json()})


@pytest.fixture
def waiting(db, redis_client):
    """Migrations of CP-BOOT (awaiting its boot), CP-IDLE (waiting for idle, connector 1
    charging), CP-OTHER (reading its configuration)."""
    target = CsmsBackend.objects.create(name="csms-2", url="ws://127.0.0.1:10/ocpp")
    batch = MigrationBatch.objects.create(target=target)
    charging = {
        "1": {"status": "Charging", "error_code": "NoError", "at": "2026-01-01T00:00:00+00:00"}
    }
    for identity, state in [
        ("CP-BOOT", State.AWAITING_BOOT),
        ("CP-IDLE", State.WAITING_IDLE),
        ("CP-OTHER", State.READING_CONFIG),
    ]:
        station = ChargingStation.objects.create(
            identity=identity, csms=target, connector_status=charging
        )
        StationMigration.objects.create(
            batch=batch, station=station, target_url=target.url, state=state
        )
    redis_client.delete("celery")
    return {m.station.identity: m.id for m in StationMigration.objects.select_related("station")}


def ingest(django_capture_on_commit_callbacks) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        events_ingest(consumer="test")


def test_a_boot_wakes_the_migration_awaiting_it_and_no_other(
    waiting, redis_client, django_capture_on_commit_callbacks
):
    for identity in ("CP-BOOT", "CP-IDLE", "CP-OTHER"):
        publish(redis_client, EventKind.BOOT, identity, status="Accepted")
    ingest(django_capture_on_commit_callbacks)
    boot = waiting["CP-BOOT"]
    assert sent_steps(redis_client) == [
        ["migrations.verify_boot", [boot, "CP-BOOT", "awaiting_boot"]]
    ]


def test_only_a_status_that_leaves_no_connector_busy_wakes_the_idle_wait(
    waiting, redis_client, django_capture_on_commit_callbacks
):
    # Connector 2 busy as well: connector 1 going idle leaves the station busy.
    publish(redis_client, EventKind.STATUS, "CP-IDLE", connector_id=2, status="SuspendedEV")
    publish(redis_client, EventKind.STATUS, "CP-IDLE", connector_id=1, status="Available")
    publish(redis_client, EventKind.STATUS, "CP-BOOT", connector_id=1, status="Available")
    ingest(django_capture_on_commit_callbacks)
    assert sent_steps(redis_client) == []

    publish(redis_client, EventKind.STATUS, "CP-IDLE", connector_id=2, status="Finishing")
    ingest(django_capture_on_commit_callbacks)
    idle = waiting["CP-IDLE"]
    assert sent_steps(redis_client) == [["migrations.wait_idle", [idle, "CP-IDLE", "waiting_idle"]]]


def test_a_resume_wakes_the_stations_the_pause_holds(
    waiting, redis_client, django_capture_on_commit_callbacks
):
    batch = MigrationBatch.objects.get()
    with django_capture_on_commit_callbacks(execute=True):
        # reading_config is held; the armed ones went on anyway.
        assert wakes.wake_held(batch.id) == 1
    other = waiting["CP-OTHER"]
    assert sent_steps(redis_client) == [
        ["migrations.read_config", [other, "CP-OTHER", "reading_config"]]
    ]


# --- one timer per waiting migration -------------------------------------------------------


def test_a_step_that_stays_sends_a_timer_only_when_none_is_due_as_early(redis_client):
    assert wakes.timer_needed(1, State.AWAITING_BOOT, 20)
    # Runs woken by events, staying with the same or a later deadline: no more timers.
    assert not wakes.timer_needed(1, State.AWAITING_BOOT, 20)
    assert not wakes.timer_needed(1, State.AWAITING_BOOT, 25)
    # Another state, another migration: their own timers.
    assert wakes.timer_needed(1, State.WAITING_IDLE, 20)
    assert wakes.timer_needed(2, State.AWAITING_BOOT, 20)
    # An earlier deadline (the settle ends before the boot timer): a timer for it.
    assert wakes.timer_needed(1, State.AWAITING_BOOT, 5)
    assert not wakes.timer_needed(1, State.AWAITING_BOOT, 10)
    # Forgotten (taken for lost by a re-drive): the next stay sends a new one.
    wakes.timers_forget([(1, State.AWAITING_BOOT)])
    assert wakes.timer_needed(1, State.AWAITING_BOOT, 10)


def test_the_timer_that_ran_does_not_stop_the_next_one(redis_client):
    assert wakes.timer_needed(1, State.AWAITING_BOOT, 0.2)
    time.sleep(0.3)
    # The run of that timer stays: its due time has passed, so it sends the next timer.
    assert wakes.timer_needed(1, State.AWAITING_BOOT, 20)


# --- whole migrations, with the waits' own timers out of reach -----------------------------


@pytest.fixture
def long_timers(monkeypatch, start_gateway, start_worker, redis_client, settings):
    for key, value in LONG_TIMERS.items():
        monkeypatch.setitem(conftest.WORKER_ENV, key, value)
    return build_stack(start_gateway, start_worker, redis_client)


def state_change(migration: StationMigration, from_state: str, to_state: str) -> StateChange:
    return StateChange.objects.get(migration=migration, from_state=from_state, to_state=to_state)


def test_the_boot_on_the_target_wakes_the_verification(long_timers):
    stack = long_timers
    # A reboot slower than the step's first look (1 s after the Reset): the look finds
    # nothing, and only the boot event can move the step before its timer (the timeout).
    with stack.fleet([stack.station("CP-WAKE")], reboot_delay=5):
        code, report = migrate("--to", "csms-2", "--station", "CP-WAKE", "--boot-timeout", "90")
    assert code == 0, report
    assert by_identity(report)["CP-WAKE"]["state"] == "done"
    m = StationMigration.objects.get()
    boot = StationEvent.objects.get(station=m.station, csms=stack.target, kind=EventKind.BOOT)
    # The run that first saw the boot started the settle.
    seen_at = m.settle_until - timedelta(seconds=settle_seconds(m))
    assert timedelta(0) <= seen_at - boot.at < WOKEN_WITHIN, (boot.at, seen_at)
    verified = state_change(m, State.AWAITING_BOOT, State.VERIFIED)
    assert verified.at >= m.settle_until  # the settle stayed a timer: "verified" as before


def test_the_end_of_the_charging_session_wakes_the_idle_wait(long_timers):
    stack = long_timers
    spec = stack.station("CP-CHARGE", behaviour=Behaviour(charging=True, charging_seconds=10))
    with stack.fleet([spec]) as fleet:
        code, report = migrate("--to", "csms-2", "--station", "CP-CHARGE", "--idle-wait", "120")
        [stopped] = fleet["CP-CHARGE"].events("charging_stopped")
    assert code == 0, report
    m = StationMigration.objects.get()
    entered = state_change(m, State.SETTING_PRIORITY, State.WAITING_IDLE)
    left = state_change(m, State.WAITING_IDLE, State.RESETTING)
    assert entered.at.timestamp() < stopped.t, "the migration did not wait for the session"
    assert 0 <= left.at.timestamp() - stopped.t < WOKEN_WITHIN.total_seconds()


@pytest.mark.parametrize("extra", [{"MIGRATION_SETTLE_SECONDS": "300"}])
def test_a_fall_back_during_the_settle_wakes_it_and_fails_it_at_once(
    monkeypatch, start_gateway, start_worker, redis_client, extra
):
    for key, value in {**LONG_TIMERS, **extra}.items():
        monkeypatch.setitem(conftest.WORKER_ENV, key, value)
    stack = build_stack(start_gateway, start_worker, redis_client)
    # Loses the target 2 s after its boot there, and is back on the source after its
    # profile timeout: long before the 300 s settle ends.
    spec = stack.station("CP-FB", behaviour=Behaviour(fall_back_after=2))
    with stack.fleet([spec]) as fleet:
        code, report = migrate("--to", "csms-2", "--station", "CP-FB", "--boot-timeout", "60")
        assert fleet["CP-FB"].connected_url == stack.source_url
    assert code == 1, report
    entry = by_identity(report)["CP-FB"]
    assert entry["state"] == "failed" and "fell back to csms-1 after booting" in entry["reason"]
    m = StationMigration.objects.get()
    back = StationEvent.objects.filter(
        station=m.station, csms__name="csms-1", kind=EventKind.BOOT
    ).latest("at")
    failed = state_change(m, State.AWAITING_BOOT, State.FAILED)
    assert m.settle_until is not None and failed.at < m.settle_until
    assert timedelta(0) <= failed.at - back.at < WOKEN_WITHIN
