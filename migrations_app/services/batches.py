"""Batches: create, start stations within their limits, finish, report."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from fleet.models import ChargingStation, CsmsBackend
from fleet.validators import csms_url_problems
from migrations_app.models import MigrationBatch, StateChange, StationMigration
from migrations_app.selectors import batch_counts
from migrations_app.services.dispatch import enqueue_drive, enqueue_step

State = StationMigration.State
ACTIVE_STATES = [
    s for s in State.values if s not in StationMigration.TERMINAL and s != State.PENDING
]


class BatchError(ValueError):
    """The batch cannot be created as asked; the message says why."""


@dataclass(frozen=True)
class BatchOptions:
    max_in_flight: int = 50
    rate_per_minute: int = 0
    boot_timeout_seconds: int = 300
    idle_wait_seconds: int = 1800
    cleanup: bool = False
    dry_run: bool = False
    allow_downgrade: bool = False


def batch_create(
    *,
    target: CsmsBackend,
    stations: Iterable[ChargingStation],
    options: BatchOptions,
    source: CsmsBackend | None = None,
    created_by: Any = None,
) -> MigrationBatch:
    """Create a running batch and start its first stations after commit."""
    problems = csms_url_problems(target.url)
    if problems:
        raise BatchError(f"CSMS {target.name} has an unusable URL: " + " ".join(problems))
    if options.max_in_flight < 1:
        raise BatchError("max in flight must be at least 1")
    stations = list(stations)
    if not stations:
        raise BatchError("no stations to migrate")
    with transaction.atomic():
        batch = MigrationBatch.objects.create(
            target=target,
            source=source,
            created_by=created_by,
            max_in_flight=options.max_in_flight,
            rate_per_minute=options.rate_per_minute,
            boot_timeout_seconds=options.boot_timeout_seconds,
            idle_wait_seconds=options.idle_wait_seconds,
            cleanup=options.cleanup,
            dry_run=options.dry_run,
            allow_downgrade=options.allow_downgrade,
        )
        StationMigration.objects.bulk_create(
            StationMigration(
                batch=batch, station=station, source_id=station.csms_id, target_url=target.url
            )
            for station in stations
        )
        enqueue_drive(batch.id)
    return batch


def batch_drive(*, batch_id: int) -> int:
    """Start as many pending stations as the batch's limits allow; finish it when all are.

    Runs under the batch's row lock (on SQLite: the database write lock), so limits hold
    across every worker process. Returns how many stations it started.
    """
    now = timezone.now()
    with transaction.atomic():
        batch = MigrationBatch.objects.select_for_update().filter(id=batch_id).first()
        if batch is None or batch.state != MigrationBatch.State.RUNNING:
            return 0
        counts = Counter(batch_counts(batch))
        pending = counts[State.PENDING]
        in_flight = sum(counts[s] for s in ACTIVE_STATES)
        if pending == 0 and in_flight == 0:
            batch.state = MigrationBatch.State.FINISHED
            batch.finished_at = now
            batch.save(update_fields=["state", "finished_at"])
            return 0
        room = min(pending, batch.max_in_flight - in_flight)
        if batch.rate_per_minute:
            room = min(room, _rate_room(batch, now))
        if room <= 0:
            return 0
        chosen = list(
            batch.stations.filter(state=State.PENDING)
            .order_by("id")
            .values_list("id", "station__identity")[:room]
        )
        ids = [migration_id for migration_id, _ in chosen]
        StationMigration.objects.filter(id__in=ids, state=State.PENDING).update(
            state=State.PREFLIGHT, started_at=now, updated_at=now
        )
        StateChange.objects.bulk_create(
            StateChange(migration_id=i, from_state=State.PENDING, to_state=State.PREFLIGHT, at=now)
            for i in ids
        )
        for migration_id, identity in chosen:
            enqueue_step(migration_id, identity, State.PREFLIGHT)
    return len(chosen)


def _rate_room(batch: MigrationBatch, now) -> int:
    """Starts allowed now: R per sliding minute, spread so a minute does not start at once."""
    started = batch.stations.exclude(started_at=None)
    last_minute = started.filter(started_at__gt=now - timedelta(seconds=60)).count()
    last_tenth = started.filter(started_at__gt=now - timedelta(seconds=10)).count()
    per_tenth = math.ceil(batch.rate_per_minute / 6)
    return min(batch.rate_per_minute - last_minute, per_tenth - last_tenth)


def batches_tick() -> None:
    """The periodic re-drive: start due stations, and re-send steps whose task was lost.

    A step task can vanish with a worker killed outright; the database is the source of
    truth, so a station whose state has not moved for longer than the lease gets its step
    sent again (every step is safe to run twice).
    """
    for batch_id in MigrationBatch.objects.filter(state=MigrationBatch.State.RUNNING).values_list(
        "id", flat=True
    ):
        batch_drive(batch_id=batch_id)
    stale_before = timezone.now() - timedelta(seconds=settings.MIGRATION_STEP_LEASE_SECONDS)
    stale = StationMigration.objects.filter(
        batch__state=MigrationBatch.State.RUNNING,
        state__in=ACTIVE_STATES,
        updated_at__lt=stale_before,
    ).values_list("id", "station__identity", "state")[:1000]
    for migration_id, identity, state in stale:
        with transaction.atomic():
            # Claim the re-drive so that the next tick does not send it again at once.
            claimed = StationMigration.objects.filter(
                id=migration_id, state=state, updated_at__lt=stale_before
            ).update(updated_at=timezone.now())
            if claimed:
                enqueue_step(migration_id, identity, state)


def batch_report(batch: MigrationBatch) -> dict[str, Any]:
    """The final report: one entry per station, counts by state."""
    rows = batch.stations.select_related("station").order_by("station__identity")
    stations = [
        {
            "identity": m.station.identity,
            "state": m.state,
            "step": m.failed_step or m.state,
            "reason": m.reason,
        }
        for m in rows
    ]
    counts = Counter(entry["state"] for entry in stations)
    return {"batch": batch.id, "stations": stations, "counts": dict(sorted(counts.items()))}
