"""The one way a station migration changes state: conditional, atomic, recorded.

Nothing else writes a migration's state or its attempt count: a step's outcome, a batch
moving stations in bulk, an operator's cancel or retry all come through here, so every
change has its StateChange row.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

from django.db import connection, transaction
from django.db.models import F, QuerySet
from django.utils import timezone

from fleet.rows import insert_row, update_where
from migrations_app.models import StateChange, StationMigration
from migrations_app.services import notifications, progress
from migrations_app.services.workflow import TERMINAL

# Ids per UPDATE: under SQLite's oldest limit on query parameters (999).
_UPDATE_CHUNK = 900


def transition(
    migration_id: int,
    from_state: str,
    to_state: str,
    *,
    reason: str = "",
    apply: Callable[[], None] | None = None,
    instance: StationMigration | None = None,
    **fields: Any,
) -> bool:
    """Move the migration from from_state to to_state; False if it was no longer there.

    A conditional update instead of read-then-write: when two workers run the same step (a
    redelivered task), exactly one of them moves the station on. ``apply`` runs in the same
    transaction, only for the one that moved it. ``instance``, the migration as the caller
    holds it, gets what was written, so a step run straight on need not read it again.
    """
    now = timezone.now()
    changes = _changes(from_state, to_state, reason, now, fields)
    with transaction.atomic():
        moved = update_where(StationMigration, {"id": migration_id, "state": from_state}, changes)
        if moved:
            insert_row(
                StateChange,
                migration_id=migration_id,
                from_state=from_state,
                to_state=to_state,
                reason=reason,
                at=now,
            )
            if apply is not None:
                apply()
            batch_id = instance.batch_id if instance is not None else None
            progress.count_move(
                migration_id, from_state, to_state, batch_id, fields.get("failure_kind", "")
            )
            if to_state == StationMigration.State.FAILED:
                notifications.stations_failed([migration_id], batch_id)
    if moved and instance is not None:
        for name, value in changes.items():
            setattr(instance, name, value)
    return bool(moved)


def transition_many(
    batch_id: int,
    migration_ids: Iterable[int],
    from_state: str,
    to_state: str,
    *,
    reason: str = "",
    **fields: Any,
) -> list[int]:
    """Move those of the batch's migrations still in from_state to to_state; the ids that
    moved.

    One transaction, one StateChange row per moved station. ``migration_ids`` may be a
    ``values_list("id", flat=True)`` queryset: it is then read as a subquery, so a batch
    of any size is never spelled out as one list of parameters. The batch narrows every
    query to its stations (SQLite would otherwise search every batch's stations in the
    state) and gets its progress counted.
    """
    if not isinstance(migration_ids, QuerySet):
        migration_ids = list(migration_ids)
        if not migration_ids:
            return []
    now = timezone.now()
    changes = _changes(from_state, to_state, reason, now, fields)
    with transaction.atomic():
        in_batch = StationMigration.objects.filter(batch_id=batch_id)
        candidates = in_batch.filter(id__in=migration_ids, state=from_state)
        if connection.features.has_select_for_update:
            # Locked (in id order, as every bulk move) so that the rows updated are exactly
            # the rows read: the history then matches what moved. SQLite needs no lock here:
            # its IMMEDIATE transactions hold the database's write lock from the start.
            candidates = candidates.select_for_update()
        moved = list(candidates.order_by("id").values_list("id", flat=True))
        for start in range(0, len(moved), _UPDATE_CHUNK):
            chunk = moved[start : start + _UPDATE_CHUNK]
            in_batch.filter(id__in=chunk, state=from_state).update(**changes)
        StateChange.objects.bulk_create(
            StateChange(
                migration_id=migration_id,
                from_state=from_state,
                to_state=to_state,
                reason=reason,
                at=now,
            )
            for migration_id in moved
        )
        progress.count_moves(batch_id, from_state, to_state, moved, fields.get("failure_kind", ""))
        if to_state == StationMigration.State.FAILED:
            notifications.stations_failed(moved, batch_id)
    return moved


def _changes(
    from_state: str, to_state: str, reason: str, now: datetime, fields: dict[str, Any]
) -> dict[str, Any]:
    # Each waiting state sets its own deadline; leaving a state ends its wait.
    changes: dict[str, Any] = {
        "state": to_state,
        "updated_at": now,
        "wait_until": None,
        "attempts": 0,
    }
    changes.update(fields)
    # A terminal state's reason is the station's outcome: set on entering one, cleared on
    # leaving one (a retried station starts again).
    if to_state in TERMINAL:
        changes.setdefault("finished_at", now)
        changes.setdefault("reason", reason)
    elif from_state in TERMINAL:
        changes.setdefault("finished_at", None)
        changes.setdefault("reason", "")
    return changes


def touch(migration_id: int, state: str, **fields: Any) -> bool:
    """Record that a waiting step is alive (the tick re-drives only stale stations)."""
    changes = {"updated_at": timezone.now(), **fields}
    return bool(update_where(StationMigration, {"id": migration_id, "state": state}, changes))


def count_attempt(migration_id: int, state: str) -> int:
    """Count one more failed attempt at the current step; 0 if it is no longer in state."""
    with transaction.atomic():
        moved = StationMigration.objects.filter(id=migration_id, state=state).update(
            attempts=F("attempts") + 1, updated_at=timezone.now()
        )
        if not moved:
            return 0
        return StationMigration.objects.values_list("attempts", flat=True).get(id=migration_id)
