"""transitions: the one writer of a migration's state, bulk moves included."""

from __future__ import annotations

import threading

import pytest
from django.contrib.auth.models import User
from django.db import connection, connections, transaction

from devstack.processes import wait_until
from fleet.models import ChargingStation, CsmsBackend
from migrations_app.models import BatchAction, MigrationBatch, StateChange, StationMigration
from migrations_app.services.controls import batch_cancel, batch_retry_failed
from migrations_app.services.transitions import transition, transition_many

State = StationMigration.State


def make_batch(*states: str) -> list[StationMigration]:
    """A running batch with one station per given state (no task is sent)."""
    source = CsmsBackend.objects.create(name="csms-1", url="ws://csms-1.example.com/ocpp")
    target = CsmsBackend.objects.create(name="csms-2", url="ws://csms-2.example.com/ocpp")
    batch = MigrationBatch.objects.create(target=target)
    return [
        StationMigration.objects.create(
            batch=batch,
            station=ChargingStation.objects.create(identity=f"CP-{i}", csms=source),
            source=source,
            target_url=target.url,
            state=state,
        )
        for i, state in enumerate(states)
    ]


def history(migration: StationMigration) -> list[tuple[str, str, str]]:
    return list(migration.state_changes.values_list("from_state", "to_state", "reason"))


@pytest.mark.django_db
class TestTransitionMany:
    def test_it_moves_only_those_still_in_the_state_with_one_row_each(self):
        a, b, c = make_batch(State.PENDING, State.PREFLIGHT, State.PENDING)

        moved = transition_many(
            a.batch_id, [c.id, b.id, a.id], State.PENDING, State.PREFLIGHT, reason="go"
        )

        assert moved == [a.id, c.id]
        assert [m.state for m in StationMigration.objects.order_by("id")] == [State.PREFLIGHT] * 3
        assert history(a) == history(c) == [(State.PENDING, State.PREFLIGHT, "go")]
        assert history(b) == []

    def test_it_writes_the_fields_and_an_ending_reason(self):
        (a,) = make_batch(State.WAITING_ONLINE)

        transition_many(
            a.batch_id,
            StationMigration.objects.values_list("id", flat=True),
            State.WAITING_ONLINE,
            State.FAILED,
            reason="offline",
            failed_step=State.PREFLIGHT,
        )

        a.refresh_from_db()
        assert (a.state, a.failed_step, a.reason) == (State.FAILED, State.PREFLIGHT, "offline")
        assert a.finished_at is not None

    def test_leaving_an_end_clears_its_reason_and_end_time(self):
        (a,) = make_batch(State.PENDING)
        transition(a.id, State.PENDING, State.FAILED, reason="broken")

        assert transition_many(a.batch_id, [a.id], State.FAILED, State.PENDING, reason="retry") == [
            a.id
        ]

        a.refresh_from_db()
        assert (a.state, a.reason, a.finished_at) == (State.PENDING, "", None)

    def test_no_ids_move_nothing(self):
        assert transition_many(1, [], State.PENDING, State.PREFLIGHT) == []
        assert not StateChange.objects.exists()


@pytest.mark.django_db
class TestControls:
    def test_cancel_records_each_station_it_cancels(self):
        operator = User.objects.create_user("operator")
        pending, offline, running = make_batch(State.PENDING, State.WAITING_ONLINE, State.RESETTING)

        batch_cancel(batch_id=pending.batch_id, user=operator)

        cancelled = f"batch cancelled by {operator}"
        assert history(pending) == [(State.PENDING, State.CANCELLED, cancelled)]
        assert history(offline) == [(State.WAITING_ONLINE, State.CANCELLED, cancelled)]
        running.refresh_from_db()
        assert running.state == State.RESETTING  # it stops at its next safe point
        action = BatchAction.objects.get(kind=BatchAction.Kind.CANCEL)
        assert action.detail == "2 stations cancelled before starting"

    def test_retry_puts_failed_stations_back_as_new(self):
        operator = User.objects.create_user("operator")
        (failed, done) = make_batch(State.PENDING, State.DONE)
        transition(
            failed.id,
            State.PENDING,
            State.FAILED,
            reason="no answer",
            failed_step=State.RESETTING,
            reset_sent_at=1.0,
            warnings=["w"],
        )

        assert batch_retry_failed(batch_id=failed.batch_id, user=operator) == 1

        failed.refresh_from_db()
        assert (failed.state, failed.reason, failed.failed_step) == (State.PENDING, "", "")
        assert (failed.reset_sent_at, failed.finished_at, failed.warnings) == (None, None, [])
        assert history(failed)[-1] == (State.FAILED, State.PENDING, f"retry by {operator}")
        assert history(done) == []


@pytest.mark.django_db(transaction=True)
def test_cancel_while_a_station_moves_records_exactly_what_it_cancelled():
    """A station that moves (back online: pending) while the cancel runs is cancelled from
    where it really is, and its history says so: the cancel locks what it reads."""
    operator = User.objects.create_user("operator")
    pending, offline = make_batch(State.PENDING, State.WAITING_ONLINE)
    moved, release = threading.Event(), threading.Event()

    def worker() -> None:
        try:
            with transaction.atomic():
                transition(offline.id, State.WAITING_ONLINE, State.PENDING, reason="back online")
                moved.set()
                release.wait(30)
        finally:
            connections.close_all()

    def cancel() -> None:
        try:
            batch_cancel(batch_id=pending.batch_id, user=operator)
        finally:
            connections.close_all()

    mover = threading.Thread(target=worker)
    mover.start()
    assert moved.wait(30)
    canceller = threading.Thread(target=cancel)
    canceller.start()
    if connection.vendor == "postgresql":
        # The cancel has read the station as offline and waits on its row lock.
        wait_until(lambda: _lock_waits() >= 1, 30, "the cancel to wait on the moving station")
    release.set()
    mover.join(30)
    canceller.join(30)

    cancelled = f"batch cancelled by {operator}"
    for migration in (pending, offline):
        migration.refresh_from_db()
        assert migration.state == State.CANCELLED
    assert history(offline) == [
        (State.WAITING_ONLINE, State.PENDING, "back online"),
        (State.PENDING, State.CANCELLED, cancelled),
    ]
    assert history(pending) == [(State.PENDING, State.CANCELLED, cancelled)]


def _lock_waits() -> int:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE wait_event_type = 'Lock' AND datname = current_database()"
        )
        return cursor.fetchone()[0]
