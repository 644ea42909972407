"""Run one step of a station migration and say what should run next."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.db.models import QuerySet
from django.utils import timezone

from fleet.rows import select_value
from migrations_app.models import MigrationBatch, StationMigration
from migrations_app.services import policies, wakes, workflow
from migrations_app.services.dispatch import drive_soon
from migrations_app.services.steps import (
    OFFLINE_RETRY_SECONDS,
    Next,
    Unreachable,
    fail,
    restore,
    wait_timer,
)
from migrations_app.services.transitions import count_attempt, touch, transition
from ocpp_gateway.client import StationOffline

State = StationMigration.State
Kind = StationMigration.FailureKind
BatchState = MigrationBatch.State


@dataclass(frozen=True)
class Followup:
    migration_id: int
    station: str
    state: str
    countdown: float


def run_step(
    migration_id: int, expected_state: str, loaded: StationMigration | None = None
) -> Followup | None:
    """Run the handler of expected_state if the migration is still there; None when done.

    ``loaded``: the migration as load_group read it for the task's group (one query for
    all its stations). It may be a moment old: a step that another run took meanwhile
    still moves only once (transitions are conditional, the Reset is claimed).
    """
    migration = loaded if loaded is not None else _load(migration_id)
    if migration is None or migration.state != expected_state:
        return None  # another run got there first, or it was cancelled
    if loaded is not None:
        # Read when the group's task began, maybe the budget's time ago: a pause or cancel
        # since then must hold or stop this station before it is armed.
        _refresh(migration, expected_state)
    state = expected_state
    while True:
        outcome = _held_by_batch(migration, state) or _run_handler(migration, state)
        if outcome.state is None:
            touch(migration.id, state, **outcome.fields)
            if not wakes.timer_needed(migration.id, state, outcome.countdown):
                return None  # a timer due no later is on its way (a woken run stays)
            return Followup(migration.id, migration.station.identity, state, outcome.countdown)
        if not _move(migration, state, outcome):
            return None
        if outcome.state not in workflow.ACTIVE:
            return None  # ended, or queued until it reconnects: no step runs there
        # Run straight on in the same task (see workflow.StateSpec.inline): a station then
        # costs about six tasks, not nine.
        if outcome.state in workflow.INLINE and outcome.countdown == 0:
            _refresh(migration, outcome.state)
            state = outcome.state
            continue
        return Followup(migration.id, migration.station.identity, outcome.state, outcome.countdown)


def step_raised(migration_id: int, expected_state: str, error: BaseException) -> float | None:
    """A step raised an unexpected error (a bug, a time limit): retry it, a bounded number
    of times, then fail the station with the error as its reason.

    Returns the countdown before the next attempt, or None when there is none to make.
    """
    attempts = count_attempt(migration_id, expected_state)
    if not attempts:
        return None  # it moved on meanwhile
    if attempts < settings.MIGRATION_STEP_MAX_ATTEMPTS:
        return min(2.0 ** (attempts - 1), 30.0)
    migration = _load(migration_id)
    if migration is None or migration.state != expected_state:
        return None
    reason = f"the step raised {type(error).__name__}: {error} ({attempts} attempts)"
    # Past the Reset claim the station may be anywhere: the rollback (through the source
    # only) tells where it is not, and says so when it cannot be done.
    armed = expected_state in workflow.ARMED or migration.reset_sent_at is not None
    try:
        reason += _undo_writes(migration, expected_state, armed=armed)
    except Exception as exc:  # the same bug may be in the rollback path
        reason += f"; ROLLBACK INCOMPLETE: the rollback raised {type(exc).__name__}: {exc}"
    _move(migration, expected_state, fail(expected_state, reason, Kind.ERROR))
    return None


def _move(migration: StationMigration, state: str, outcome: Next) -> bool:
    """Apply a handler's outcome: the one place a step moves a station (and fails one)."""
    assert outcome.state is not None
    moved = transition(
        migration.id,
        state,
        outcome.state,
        reason=outcome.reason,
        apply=outcome.apply,
        instance=migration,
        **outcome.fields,
    )
    if moved and outcome.state not in workflow.ACTIVE:
        # Its in-flight slot is free: the next station starts shortly (stations ending
        # together share one drive), not at the next tick.
        drive_soon(migration.batch_id)
    return moved


def _run_handler(migration: StationMigration, state: str) -> Next:
    try:
        return workflow.handler(state)(migration)
    except StationOffline:
        if state == State.PREFLIGHT and migration.batch.offline_wait_seconds:
            # Queued until it reconnects; it holds no in-flight slot meanwhile.
            wait = timedelta(seconds=migration.batch.offline_wait_seconds)
            return Next(
                State.WAITING_ONLINE,
                "offline when its turn came: queued until it reconnects",
                fields={"wait_until": timezone.now() + wait, "started_at": None},
            )
        return _wait_for_station(
            migration, state, "offline: no gateway holds the station", Kind.OFFLINE
        )
    except Unreachable as exc:
        return _wait_for_station(migration, state, f"unreachable: {exc}", Kind.TIMEOUT)


def _held_by_batch(migration: StationMigration, state: str) -> Next | None:
    """A paused batch holds stations that are not armed yet; a cancelled one stops them, and
    so does the end of its schedule (before the priority step: armed ones finish)."""
    if state not in workflow.STOPPABLE:
        return None
    batch = migration.batch
    if batch.state == BatchState.PAUSED:
        # A resume or a cancel wakes it (wakes.wake_held): its timer is only the safety net.
        return Next(None, countdown=wait_timer(float("inf")))
    if batch.state == BatchState.CANCELLED:
        why = "batch cancelled"
    elif state not in workflow.ARMED and (ended := policies.schedule_ended(batch, timezone.now())):
        why = f"not armed when the schedule ended at {policies.when_text(ended)}"
    else:
        return None
    undone = _undo_writes(migration, state, armed=state in workflow.ARMED)
    return Next(State.CANCELLED, why + undone)


def _undo_writes(migration: StationMigration, state: str, *, armed: bool) -> str:
    """Put back what the station may hold of this migration when it stops in ``state``.

    Armed (past a possible priority write): the priority and the free slot, the priority
    first (one naming a blanked slot would leave the station no working profile). In the
    URL step the free slot: a write whose answer was lost, or a redelivered task, may have
    stored the target URL there, where the station's own fallback could take it later.
    Before that, nothing was written.
    """
    if armed:
        return restore(migration, state, priority=True)
    if state == State.SETTING_URL:
        return restore(migration, state, priority=False)
    return ""


def _wait_for_station(migration: StationMigration, state: str, reason: str, kind: str) -> Next:
    """Try again shortly, until the batch's boot timeout has passed since the first try."""
    now = timezone.now()
    wait_until = migration.wait_until or now + timedelta(
        seconds=migration.batch.boot_timeout_seconds
    )
    if now < wait_until:
        return Next(None, countdown=OFFLINE_RETRY_SECONDS, fields={"wait_until": wait_until})
    waited = f"{reason} (for {migration.batch.boot_timeout_seconds}s)"
    if state == State.CLEANUP:
        # Cleanup is optional and the station is already verified on the target.
        return Next(State.DONE, f"migrated, but the old slot was not blanked: {waited}")
    # What may have been written is put back if the station can still be reached; the
    # reason says how that went either way.
    armed = state in workflow.ARMED
    return fail(state, waited + _undo_writes(migration, state, armed=armed), kind)


def load_group(migration_ids: list[int]) -> dict[int, StationMigration]:
    """The migrations of a step task's group, with what their steps read, in one query.

    Unordered: building the models' default ordering over the joins cost a third of the
    load (~0.7 ms of a task's CPU).
    """
    return {m.id: m for m in _loading().filter(id__in=migration_ids).order_by()}


def _refresh(migration: StationMigration, next_state: str) -> None:
    """Before a step runs on a migration read earlier in the same task: the transition has
    set what it wrote on the migration (transitions.transition's instance), so only the
    batch may have changed under it, and only a stoppable step reads that (an operator's
    pause or cancel)."""
    if next_state in workflow.STOPPABLE:
        migration.batch.state = select_value(MigrationBatch, "state", migration.batch_id)


def _load(migration_id: int) -> StationMigration | None:
    return _loading().filter(id=migration_id).first()


def _loading() -> QuerySet[StationMigration]:
    return StationMigration.objects.select_related("station", "source", "batch", "batch__target")
