"""What an operator does to a running batch: approve, promote, pause, resume, cancel,
retry, migrate back.

Each refuses a batch in the wrong state (ControlError), changes it under its row lock and
records who did it (BatchAction).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.db import transaction
from django.utils import timezone

from fleet.models import CsmsBackend
from migrations_app.models import BatchAction, MigrationBatch, StationMigration
from migrations_app.services import notifications, policies, wakes, workflow
from migrations_app.services.batches import BatchOptions, batch_create, cancel_queued
from migrations_app.services.dispatch import enqueue_drive
from migrations_app.services.notifications import Event
from migrations_app.services.transitions import transition_many

State = StationMigration.State
BatchState = MigrationBatch.State
RUN_PERMISSION = "migrations_app.run_migration"
APPROVE_PERMISSION = "migrations_app.approve_migration"


class ControlError(ValueError):
    """The batch is not in a state that allows this; the message says why."""


def _locked(batch_id: int, allowed: set[str], action: str) -> MigrationBatch:
    batch = MigrationBatch.objects.select_for_update().get(id=batch_id)
    if batch.state not in allowed:
        raise ControlError(f"cannot {action} batch {batch_id}: it is {batch.state}")
    return batch


def batch_pause(*, batch_id: int, user: Any, reason: str = "") -> MigrationBatch:
    with transaction.atomic():
        batch = _locked(batch_id, {BatchState.RUNNING}, "pause")
        batch.state = BatchState.PAUSED
        batch.pause_reason = reason or f"paused by {user}"
        batch.save(update_fields=["state", "pause_reason"])
        BatchAction.objects.create(
            batch=batch, user=user, kind=BatchAction.Kind.PAUSE, detail=reason
        )
        notifications.notify(batch, Event.PAUSED, reason=reason, by=user)
    return batch


def batch_resume(*, batch_id: int, user: Any) -> MigrationBatch:
    with transaction.atomic():
        batch = _locked(batch_id, {BatchState.PAUSED}, "resume")
        detail = batch.pause_reason
        batch.state = BatchState.RUNNING
        batch.pause_reason = ""
        batch.resumed_at = timezone.now()
        batch.save(update_fields=["state", "pause_reason", "resumed_at"])
        BatchAction.objects.create(
            batch=batch, user=user, kind=BatchAction.Kind.RESUME, detail=f"was: {detail}"
        )
        enqueue_drive(batch.id)
        wakes.wake_held(batch.id)  # the stations the pause held go on now
        notifications.notify(batch, Event.RESUMED, reason=f"was: {detail}", by=user)
    return batch


def batch_cancel(*, batch_id: int, user: Any) -> MigrationBatch:
    """Stations not started are cancelled; started ones stop at their next safe point."""
    with transaction.atomic():
        batch = _locked(batch_id, {BatchState.RUNNING, BatchState.PAUSED}, "cancel")
        if batch.state == BatchState.PAUSED:
            # The stations the pause holds stop now (a running batch's stations are
            # mid-step: they stop at their next one, without a second run of this one).
            wakes.wake_held(batch.id)
        cancelled = cancel_queued(batch, reason=f"batch cancelled by {user}")
        detail = f"{cancelled} stations cancelled before starting"
        batch.state = BatchState.CANCELLED
        batch.save(update_fields=["state"])
        BatchAction.objects.create(
            batch=batch,
            user=user,
            kind=BatchAction.Kind.CANCEL,
            detail=detail,
        )
        notifications.notify(batch, Event.CANCELLED, reason=detail, by=user)
    return batch


def _refuse_past_its_end(batch: MigrationBatch, now: datetime) -> None:
    """Approving or retrying past the schedule's end would start nothing."""
    if ended := policies.schedule_ended(batch, now):
        raise ControlError(
            f"batch {batch.id}'s schedule ended at {policies.when_text(ended)}: "
            "no station would start"
        )


def batch_approve(*, batch_id: int, user: Any) -> MigrationBatch:
    """A second person with the approve permission lets a batch that requires it start."""
    if user is None or not user.has_perm(APPROVE_PERMISSION):
        raise ControlError(f"{user} may not approve batches (the approve permission)")
    with transaction.atomic():
        batch = _locked(batch_id, {BatchState.RUNNING, BatchState.PAUSED}, "approve")
        if not batch.approval_required:
            raise ControlError(f"batch {batch_id} does not require approval")
        if batch.approved_at is not None:
            raise ControlError(f"batch {batch_id} was approved by {batch.approved_by}")
        _refuse_past_its_end(batch, timezone.now())
        if batch.created_by_id is not None and batch.created_by_id == user.pk:
            raise ControlError(f"{user} created batch {batch_id}: a second person must approve it")
        batch.approved_by, batch.approved_at = user, timezone.now()
        batch.save(update_fields=["approved_by", "approved_at"])
        BatchAction.objects.create(batch=batch, user=user, kind=BatchAction.Kind.APPROVE)
        enqueue_drive(batch.id)
        notifications.notify(batch, Event.APPROVED, by=user)
    return batch


def batch_promote(*, batch_id: int, user: Any) -> MigrationBatch:
    """After a canary wave that waits for it, let the rest of the batch start."""
    with transaction.atomic():
        batch = _locked(batch_id, {BatchState.RUNNING, BatchState.PAUSED}, "promote")
        if not batch.promote_after_canary:
            raise ControlError(f"batch {batch_id} does not wait for a promotion")
        if batch.promoted_at is not None:
            raise ControlError(f"batch {batch_id} was promoted by {batch.promoted_by}")
        if batch.canary_ended_at is None:
            raise ControlError(f"batch {batch_id}: its canary wave has not ended yet")
        batch.promoted_by, batch.promoted_at = user, timezone.now()
        batch.save(update_fields=["promoted_by", "promoted_at"])
        BatchAction.objects.create(batch=batch, user=user, kind=BatchAction.Kind.PROMOTE)
        enqueue_drive(batch.id)
        notifications.notify(batch, Event.PROMOTED, by=user)
    return batch


def batch_retry_failed(*, batch_id: int, user: Any) -> int:
    """Put the batch's failed stations back in line; returns how many."""
    now = timezone.now()
    with transaction.atomic():
        batch = _locked(
            batch_id, {BatchState.RUNNING, BatchState.PAUSED, BatchState.FINISHED}, "retry"
        )
        _refuse_past_its_end(batch, now)
        # A station that another batch is migrating now stays failed here.
        live_elsewhere = StationMigration.objects.exclude(state__in=workflow.TERMINAL).values(
            "station_id"
        )
        failed = batch.stations.filter(state=State.FAILED).exclude(station_id__in=live_elsewhere)
        ids = transition_many(
            batch.id,
            failed.values_list("id", flat=True),
            State.FAILED,
            State.PENDING,
            reason=f"retry by {user}",
            failed_step="",
            failure_kind="",
            reset_sent_at=None,
            reset_command_id="",
            reset_accepted=False,
            started_at=None,
            warnings=[],
        )
        if not ids:
            raise ControlError(
                f"batch {batch_id} has no failed stations that are not in another live batch"
            )
        if batch.state != BatchState.PAUSED:
            batch.state = BatchState.RUNNING
            batch.finished_at = None
        batch.resumed_at = now
        batch.save(update_fields=["state", "finished_at", "resumed_at"])
        BatchAction.objects.create(
            batch=batch, user=user, kind=BatchAction.Kind.RETRY, detail=f"{len(ids)} stations"
        )
        enqueue_drive(batch.id)
    return len(ids)


def batch_migrate_back(*, batch_id: int, user: Any) -> MigrationBatch:
    """A new batch moving this batch's verified stations back to where they came from."""
    batch = MigrationBatch.objects.get(id=batch_id)
    if batch.source is None:
        sources = set(batch.stations.values_list("source", flat=True))
        if len(sources) != 1 or None in sources:
            raise ControlError("its stations came from several CSMS: migrate them back by hand")
        source_id = sources.pop()
    else:
        source_id = batch.source.id
    verified = batch.stations.filter(
        state=State.DONE, state_changes__to_state=State.VERIFIED
    ).select_related("station")
    stations = [migration.station for migration in verified]
    if not stations:
        raise ControlError(f"batch {batch_id} has no verified stations to migrate back")
    options = BatchOptions(
        max_in_flight=batch.max_in_flight,
        rate_per_minute=batch.rate_per_minute,
        boot_timeout_seconds=batch.boot_timeout_seconds,
        idle_wait_seconds=batch.idle_wait_seconds,
        allow_downgrade=batch.allow_downgrade,
        install_root_ca=batch.install_root_ca,
        security_extension=batch.security_extension,
    )
    with transaction.atomic():
        back = batch_create(
            target=CsmsBackend.objects.get(id=source_id),
            stations=stations,
            options=options,
            source=batch.target,
            created_by=user,
        )
        back.migrated_back_from = batch
        back.save(update_fields=["migrated_back_from"])
        BatchAction.objects.create(
            batch=batch,
            user=user,
            kind=BatchAction.Kind.MIGRATE_BACK,
            detail=f"batch {back.id}: {len(stations)} stations",
        )
    return back
