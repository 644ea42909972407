"""Run one step of a station migration and say what should run next."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from django.utils import timezone

from migrations_app.models import StationMigration
from migrations_app.services import batches
from migrations_app.services.steps import (
    HANDLERS,
    OFFLINE_RETRY_SECONDS,
    Next,
    Unreachable,
    fail,
)
from migrations_app.services.transitions import touch, transition
from ocpp_gateway.client import StationOffline

State = StationMigration.State

# States whose handler only does bookkeeping: run straight on in the same task.
INLINE_STATES = frozenset({State.WAITING_IDLE, State.OLD_REGISTRATION_MARKED})


@dataclass(frozen=True)
class Followup:
    migration_id: int
    station: str
    state: str
    countdown: float


def run_step(migration_id: int, expected_state: str) -> Followup | None:
    """Run the handler of expected_state if the migration is still there; None when done."""
    migration = _load(migration_id)
    if migration is None or migration.state != expected_state:
        return None  # another run got there first, or it was cancelled
    state = expected_state
    while True:
        try:
            outcome = HANDLERS[state](migration)
        except StationOffline:
            outcome = _wait_for_station(migration, state, "offline: no gateway holds the station")
        except Unreachable as exc:
            outcome = _wait_for_station(migration, state, f"unreachable: {exc}")
        if outcome.state is None:
            touch(migration.id, state, **outcome.fields)
            return Followup(migration.id, migration.station.identity, state, outcome.countdown)
        moved = transition(
            migration.id,
            state,
            outcome.state,
            reason=outcome.reason,
            apply=outcome.apply,
            **outcome.fields,
        )
        if not moved:
            return None
        if outcome.state in StationMigration.TERMINAL:
            batches.batch_drive(batch_id=migration.batch_id)
            return None
        if outcome.state in INLINE_STATES and outcome.countdown == 0:
            migration = _load(migration_id)
            assert migration is not None
            state = outcome.state
            continue
        return Followup(migration.id, migration.station.identity, outcome.state, outcome.countdown)


def _wait_for_station(migration: StationMigration, state: str, reason: str) -> Next:
    """Try again shortly, until the batch's boot timeout has passed since the first try."""
    now = timezone.now()
    wait_until = migration.wait_until or now + timedelta(
        seconds=migration.batch.boot_timeout_seconds
    )
    if now >= wait_until:
        waited = migration.batch.boot_timeout_seconds
        return fail(state, f"{reason} (for {waited}s)")
    return Next(None, countdown=OFFLINE_RETRY_SECONDS, fields={"wait_until": wait_until})


def _load(migration_id: int) -> StationMigration | None:
    return (
        StationMigration.objects.select_related("station", "source", "batch", "batch__target")
        .filter(id=migration_id)
        .first()
    )
