"""What the brake judges, counted as stations end: O(1) per station and per drive.

The batch drive runs each time a station ends; counting the batch's ended stations there
made every end cost a scan of the batch. Instead each move to done or failed adds to the
batch's counters in the transaction of the move (the batch row serialises the adds), and
the drive reads them from the batch row it holds.

Beside them, by failure kind, what the abort criteria judge; and ``done_total``, the
stations done over the batch's whole life, which the exponential rate steps on.

The counters belong to one resume (``done_total`` excepted): they count from
``progress_since``, a copy of the batch's ``resumed_at``. A resume or a retry (which set
``resumed_at``) thereby zeroes them without touching them, and the next end starts them
again in the same update, so no end between the resume and the next drive is lost.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from django.db import connection
from django.db.models import (
    Case,
    F,
    PositiveIntegerField,
    Q,
    Value,
    When,
)

from fleet.rows import compiled_update, execute
from migrations_app.models import MigrationBatch, StationMigration

State = StationMigration.State
COUNTED = frozenset({State.DONE, State.FAILED})
_COUNT = PositiveIntegerField()
# The counters count from the batch's last resume (both empty: never resumed).
_SAME_RESUME = Q(progress_since=F("resumed_at")) | Q(
    progress_since__isnull=True, resumed_at__isnull=True
)


Kind = StationMigration.FailureKind
# The batch's counter of each failure kind (MigrationBatch.failed_rejected, ...).
_KIND_FIELDS = {kind: f"failed_{kind}" for kind in Kind.values}


@dataclass(frozen=True)
class Ended:
    """Stations ended since the last resume."""

    done: int
    failed: int
    # Failures before the first done station: "the first N all failed" is this >= N.
    failed_before_done: int
    # The failures by StationMigration.FailureKind (a failure with no kind is in none).
    failed_by_kind: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.done + self.failed


def ended_since_resume(batch: MigrationBatch) -> Ended:
    """What the counters say for the batch as read (the drive holds its row lock)."""
    if batch.progress_since != batch.resumed_at:
        return Ended(0, 0, 0)
    by_kind = {kind: getattr(batch, name) for kind, name in _KIND_FIELDS.items()}
    return Ended(
        batch.ended_done,
        batch.ended_failed,
        batch.failed_before_done,
        {kind: n for kind, n in by_kind.items() if n},
    )


def count_move(
    migration_id: int,
    from_state: str,
    to_state: str,
    batch_id: int | None = None,
    failure_kind: str = "",
) -> None:
    """Count one station's move (transitions.transition, in its transaction); ``batch_id``
    when the caller knows it; ``failure_kind``, the kind of a move to failed."""
    if to_state not in COUNTED:
        return
    if batch_id is None:
        batch_id = StationMigration.objects.values_list("batch_id", flat=True).get(id=migration_id)
    # Every station's end runs it: compiling its CASEs each time cost ~2 ms of CPU (4.8 % of
    # the worker, benchmarks/README.md, issue 9).
    statement, params = _one_end_statement(connection.vendor, to_state, failure_kind)
    execute(statement, [*params, batch_id])


def count_moves(
    batch_id: int,
    from_state: str,
    to_state: str,
    moved: Collection[int],
    failure_kind: str = "",
) -> None:
    """Count a bulk move of one batch's stations (the ids that moved), in its transaction."""
    if to_state not in COUNTED or not moved:
        return
    MigrationBatch.objects.filter(id=batch_id).update(
        **_counting(to_state, len(moved), failure_kind)
    )


def _counting(to_state: str, n: int, failure_kind: str) -> dict[str, Any]:
    # One UPDATE: the expressions read the row as it was, so a stale resume's counts are
    # replaced (not added to) by this move's.
    def add(counter: str) -> Case:
        return Case(When(_SAME_RESUME, then=F(counter) + n), default=Value(n), output_field=_COUNT)

    def keep(counter: str) -> Case:
        return Case(When(_SAME_RESUME, then=F(counter)), default=Value(0), output_field=_COUNT)

    kinds = {
        name: add(name) if to_state == State.FAILED and kind == failure_kind else keep(name)
        for kind, name in _KIND_FIELDS.items()
    }
    if to_state == State.DONE:
        changes = {
            "ended_done": add("ended_done"),
            "ended_failed": keep("ended_failed"),
            "failed_before_done": keep("failed_before_done"),
            "done_total": F("done_total") + n,
        }
    else:
        changes = {
            "ended_done": keep("ended_done"),
            "ended_failed": add("ended_failed"),
            "failed_before_done": Case(
                When(_SAME_RESUME & Q(ended_done=0), then=F("failed_before_done") + n),
                When(_SAME_RESUME, then=F("failed_before_done")),
                default=Value(n),
                output_field=_COUNT,
            ),
        }
    return {"progress_since": F("resumed_at"), **changes, **kinds}


# A batch id no batch has: the placeholder of the compiled statement's last parameter.
_ANY_BATCH = -1


@cache
def _one_end_statement(
    vendor: str, to_state: str, failure_kind: str
) -> tuple[str, tuple[Any, ...]]:
    """The UPDATE that counts one end, compiled once; its parameters but the batch's id."""
    batches = MigrationBatch.objects.filter(id=_ANY_BATCH)
    statement, params = compiled_update(batches, _counting(to_state, 1, failure_kind))
    if params[-1] != _ANY_BATCH:
        raise RuntimeError(f"the batch id is not the last parameter of {statement}")
    return statement, tuple(params[:-1])
