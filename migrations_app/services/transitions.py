"""The one way a station migration changes state: conditional, atomic, recorded."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.db import transaction
from django.db.models import F
from django.utils import timezone

from migrations_app.models import StateChange, StationMigration
from migrations_app.services import progress

State = StationMigration.State


def transition(
    migration_id: int,
    from_state: str,
    to_state: str,
    *,
    reason: str = "",
    apply: Callable[[], None] | None = None,
    **fields: Any,
) -> bool:
    """Move the migration from from_state to to_state; False if it was no longer there.

    A conditional update instead of read-then-write: when two workers run the same step (a
    redelivered task), exactly one of them moves the station on. ``apply`` runs in the same
    transaction, only for the one that moved it.
    """
    now = timezone.now()
    # Each waiting state sets its own deadline; leaving a state ends its wait.
    changes: dict[str, Any] = {
        "state": to_state,
        "updated_at": now,
        "wait_until": None,
        "attempts": 0,
    }
    changes.update(fields)
    if to_state in StationMigration.TERMINAL:
        changes.setdefault("finished_at", now)
        changes.setdefault("reason", reason)
    with transaction.atomic():
        moved = StationMigration.objects.filter(id=migration_id, state=from_state).update(**changes)
        if moved:
            StateChange.objects.create(
                migration_id=migration_id,
                from_state=from_state,
                to_state=to_state,
                reason=reason,
                at=now,
            )
            if apply is not None:
                apply()
            progress.count_move(migration_id, from_state, to_state)
    return bool(moved)


def touch(migration_id: int, state: str, **fields: Any) -> bool:
    """Record that a waiting step is alive (the tick re-drives only stale stations)."""
    return bool(
        StationMigration.objects.filter(id=migration_id, state=state).update(
            updated_at=timezone.now(), **fields
        )
    )


def count_attempt(migration_id: int, state: str) -> int:
    """Count one more failed attempt at the current step; 0 if it is no longer in state."""
    with transaction.atomic():
        moved = StationMigration.objects.filter(id=migration_id, state=state).update(
            attempts=F("attempts") + 1, updated_at=timezone.now()
        )
        if not moved:
            return 0
        return StationMigration.objects.values_list("attempts", flat=True).get(id=migration_id)
