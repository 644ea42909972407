"""Batches: create, start stations within their limits, finish, report."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import datetime, time, timedelta
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import URLValidator
from django.db import IntegrityError, transaction
from django.db.models import QuerySet
from django.utils import timezone

from fleet.models import ChargingStation, CsmsBackend
from fleet.services.registry import registry_republish_missing
from fleet.validators import csms_url_problems
from migrations_app.models import BatchAction, MigrationBatch, StationMigration
from migrations_app.services import (
    liveness,
    notifications,
    policies,
    progress,
    wakes,
    workflow,
)
from migrations_app.services.dispatch import (
    drive_ran,
    enqueue_drive,
    enqueue_step,
    enqueue_steps,
    schedule_drive,
)
from migrations_app.services.selection import selection_summary
from migrations_app.services.transitions import transition_many

State = StationMigration.State
# Started and not ended: what counts against max in flight (see workflow.StateSpec).
ACTIVE_STATES = workflow.ACTIVE
# While a batch has stations in flight it drives itself at least this often (lost steps,
# reconnected offline stations), so the beat is a safety net and not a requirement.
DRIVE_SAFETY_SECONDS = 15.0
OFFLINE_POLL_SECONDS = 5.0


# On a recovery, a station untouched this long (and not running on a live worker) may have
# lost its step task with the dead worker. A waiting step's timer may be longer (up to
# MIGRATION_WAIT_TIMER_SECONDS): such a station is re-driven too, which is harmless (its
# run stays, and its timers are one again at the next due time), and the second pass of a
# recovery, this long after the first, finds every station whose timer died.
RECOVER_GRACE_SECONDS = 10.0


def dt_combine(now: datetime, at: time) -> datetime:
    """Today's `at` (UTC) in now's timezone."""
    return now.replace(hour=at.hour, minute=at.minute, second=at.second, microsecond=0)


class BatchError(ValueError):
    """The batch cannot be created as asked; the message says why."""


@dataclass(frozen=True)
class Webhooks:
    """Where a new batch's notifications go (services.notifications)."""

    urls: tuple[str, ...] = ()
    secret: str = ""
    station_failures: bool = False

    def problems(self) -> list[str]:
        problems = []
        for url in self.urls:
            try:
                _HTTP_URL(url)
            except ValidationError:
                problems.append(
                    f"webhook URL {url!r} must be an http:// or https:// URL without spaces"
                )
        return problems


_HTTP_URL = URLValidator(schemes=["http", "https"])


@dataclass(frozen=True)
class BatchOptions:
    # Cautious defaults for a real fleet; the CLI and the admin form start from these.
    max_in_flight: int = 20
    rate_per_minute: int = 60
    boot_timeout_seconds: int = 300
    idle_wait_seconds: int = 1800
    cleanup: bool = False
    dry_run: bool = False
    allow_downgrade: bool = False
    canary_size: int = 0
    # On by default: a target that is down must not get every station in flight reset
    # into it. Pause when the first few ended stations all failed, or when more than half
    # of a sample failed.
    brake_failure_ratio: float | None = 0.5
    brake_min_sample: int = 10
    brake_first_failed: int = 5
    window_start: time | None = None
    window_end: time | None = None
    offline_wait_seconds: int = 0
    # The root CA pre-flight of a wss:// target with a root CA (see steps.check_root_ca).
    install_root_ca: bool = False
    security_extension: str = MigrationBatch.SecurityExtension.REQUIRE.value
    # Rollout policies (services.policies): the exponential rate, the abort criteria.
    rate_increase_factor: float | None = None
    rate_increase_every: int = 0
    rate_max_per_minute: int = 0
    abort_criteria: tuple[policies.AbortCriterion, ...] = ()
    # The schedule: no station starts before starts_at nor after ends_at.
    starts_at: datetime | None = None
    ends_at: datetime | None = None
    # Approvals: a second person approves the start; an operator promotes after the canary.
    approval_required: bool = False
    promote_after_canary: bool = False

    def problems(self) -> list[str]:
        problems = policies.rate_problems(self)
        for criterion in self.abort_criteria:
            problems += criterion.problems()
        if self.starts_at and self.ends_at and self.ends_at <= self.starts_at:
            problems.append("the schedule's end must come after its start")
        if self.ends_at and self.ends_at <= timezone.now():
            problems.append(
                f"the schedule's end ({policies.when_text(self.ends_at)}) is already past"
            )
        if self.promote_after_canary and not self.canary_size:
            problems.append("promoting after the canary needs a canary (its size over 0)")
        if self.security_extension not in MigrationBatch.SecurityExtension.values:
            choices = ", ".join(MigrationBatch.SecurityExtension.values)
            problems.append(f"security extension must be one of {choices}")
        if self.max_in_flight < 1:
            problems.append("max in flight must be at least 1")
        if self.brake_first_failed < 0:
            problems.append("the brake's first-failures count must not be negative")
        if self.brake_failure_ratio is not None and not 0 <= self.brake_failure_ratio < 1:
            problems.append("the brake's failure ratio must be from 0 up to (not including) 1")
        if (self.window_start is None) != (self.window_end is None):
            problems.append("a maintenance window needs both a start and an end")
        if self.window_start is not None and self.window_start == self.window_end:
            problems.append("the maintenance window is empty (start equals end)")
        return problems


def batch_create(
    *,
    target: CsmsBackend,
    stations: Iterable[ChargingStation],
    options: BatchOptions,
    source: CsmsBackend | None = None,
    created_by: Any = None,
    selection: dict[str, Any] | None = None,
    webhooks: Webhooks | None = None,
) -> MigrationBatch:
    """Create a running batch and start its first stations after commit. ``selection``
    records how the stations were chosen (services.selection.Selection.record);
    ``webhooks`` are notified of what happens to it (and the settings' default webhook)."""
    problems = csms_url_problems(target.url)
    if problems:
        raise BatchError(f"CSMS {target.name} has an unusable URL: " + " ".join(problems))
    option_problems = options.problems() + (webhooks or Webhooks()).problems()
    if option_problems:
        raise BatchError("; ".join(option_problems))
    stations = sorted(stations, key=lambda station: station.identity)
    if not stations:
        raise BatchError("no stations to migrate")
    try:
        return _batch_create(
            target, stations, options, source, created_by, selection or {}, webhooks or Webhooks()
        )
    except IntegrityError as exc:  # another batch took one of them at the same moment
        raise BatchError(f"a station is already being migrated ({exc})") from exc


def _batch_create(
    target: CsmsBackend,
    stations: list[ChargingStation],
    options: BatchOptions,
    source: CsmsBackend | None,
    created_by: Any,
    selection: dict[str, Any],
    webhooks: Webhooks,
) -> MigrationBatch:
    with transaction.atomic():
        busy = list(
            StationMigration.objects.filter(station__in=stations)
            .exclude(state__in=workflow.TERMINAL)
            .values_list("station__identity", "batch_id")
        )
        if busy:
            listed = ", ".join(f"{identity} (batch {batch_id})" for identity, batch_id in busy[:10])
            more = f" and {len(busy) - 10} more" if len(busy) > 10 else ""
            raise BatchError(f"already being migrated: {listed}{more}")
        batch = MigrationBatch.objects.create(
            target=target,
            source=source,
            created_by=created_by,
            selection=selection,
            **{
                **asdict(options),
                "abort_criteria": policies.criteria_record(options.abort_criteria),
            },
        )
        StationMigration.objects.bulk_create(
            StationMigration(
                batch=batch,
                station=station,
                source_id=station.csms_id,
                target_url=target.url,
                canary=index < options.canary_size,
            )
            for index, station in enumerate(stations)
        )
        BatchAction.objects.create(
            batch=batch,
            user=created_by,
            kind=BatchAction.Kind.START,
            detail=f"{len(stations)} stations to {target.name}" + selection_summary(selection),
        )
        notifications.webhooks_add(
            batch,
            list(webhooks.urls),
            secret=webhooks.secret,
            station_failures=webhooks.station_failures,
        )
        notifications.notify(batch, notifications.Event.STARTED, by=created_by)
        enqueue_drive(batch.id)
    return batch


def batch_drive(*, batch_id: int, scheduled: bool = False) -> int:
    """Start as many pending stations as the batch's controls allow; finish it when all end.

    Runs under the batch's row lock (on SQLite: the database write lock), so the limits,
    the canary and the brake hold across every worker process. Then the batch schedules
    its own next drive (the next free rate slot, the window opening, an offline deadline,
    or the safety interval), so workers alone carry a batch to its end. A scheduled drive
    (``scheduled``) also re-drives the batch's stations whose step was lost. Returns how
    many stations it started.
    """
    if scheduled:
        drive_ran(batch_id)
    with transaction.atomic():
        batch = MigrationBatch.objects.select_for_update().filter(id=batch_id).first()
        if batch is None:
            return 0
        started, wait = _drive_locked(batch)
        if wait is not None:
            transaction.on_commit(lambda: schedule_drive(batch_id, wait))
    if scheduled:
        # After the batch lock: a station's end waits for that lock (its counters) while
        # holding its own row, which this claims.
        redrive_stale(batch.stations.all())
    return started


def _drive_locked(batch: MigrationBatch) -> tuple[int, float | None]:
    """(stations started, seconds until the next drive is needed or None).

    Every read here is bounded by a limit of the batch (max in flight, the rate, the
    canary size) and never by its size: it runs each time a station ends.
    """
    if batch.state == MigrationBatch.State.FINISHED:
        return 0, None
    if batch.state != MigrationBatch.State.RUNNING:
        if batch.state == MigrationBatch.State.CANCELLED:
            # A step that read the batch just before its cancel can still queue a station
            # (found offline: waiting_online): nothing else would ever move it.
            cancel_queued(batch, reason="batch cancelled")
        # Paused or cancelled: armed stations still finish, and need their safety net.
        active = batch.stations.filter(state__in=ACTIVE_STATES).exists()
        return 0, DRIVE_SAFETY_SECONDS if active else None
    _requeue_reconnected(batch, timezone.now())
    _end_of_schedule(batch, timezone.now())
    in_flight = batch.stations.filter(state__in=ACTIVE_STATES).count()  # <= max in flight
    # Counted up to one more than could start: more than that changes nothing below.
    pending = _count_up_to(batch, State.PENDING, batch.max_in_flight + 1)
    offline = _count_up_to(batch, State.WAITING_ONLINE, 1)
    # Read the clock after counting: a start stamped earlier could predate the end of a
    # station that committed meanwhile and that this count saw as ended.
    now = timezone.now()
    if pending == 0 and in_flight == 0 and offline == 0:
        batch.state = MigrationBatch.State.FINISHED
        batch.finished_at = now
        batch.save(update_fields=["state", "finished_at"])
        notifications.notify(batch, notifications.Event.FINISHED)
        return 0, None
    waits = [DRIVE_SAFETY_SECONDS]
    if offline:
        waits.append(OFFLINE_POLL_SECONDS)
    halt = (
        _canary_verdict(batch)
        or _brake_verdict(batch)
        or policies.abort_verdict(batch, progress.ended_since_resume(batch))
    )
    if halt:
        _auto_pause(batch, halt)
        return 0, min(waits) if in_flight else None
    if not pending:
        return 0, min(waits)
    # Its next drive cancels the rest (the end may have passed since the cancel above).
    until_end = None if batch.ends_at is None else max((batch.ends_at - now).total_seconds(), 0.0)
    if awaiting_approval(batch):
        return 0, until_end  # the approval drives the batch; without one, its end does
    if batch.starts_at is not None and now < batch.starts_at:
        waits.append((batch.starts_at - now).total_seconds())
        return 0, min(waits)
    if until_end is not None:
        waits.append(until_end)
        if policies.schedule_ended(batch, now):
            return 0, min(waits)
    if not in_window(batch, now.time()):
        waits.append(_until_window_opens(batch, now))
        return 0, min(waits)
    started = _start_pending(batch, pending, in_flight, now)
    if batch.rate_per_minute and pending > started:
        rate_wait = _rate_wait(batch, now)
        if rate_wait is not None:
            waits.append(rate_wait)
    return started, min(waits)


def cancel_queued(batch: MigrationBatch, *, reason: str) -> int:
    """Cancel the batch's stations that hold no in-flight slot and have not ended; how many.

    Later states first: a station that moves on meanwhile (back online: pending) is met
    again by the next pass instead of left behind."""
    queued = [state for state in workflow.STATE_ORDER if state in workflow.QUEUED]
    return sum(
        len(
            transition_many(
                batch.id,
                batch.stations.filter(state=state).values_list("id", flat=True),
                state,
                State.CANCELLED,
                reason=reason,
            )
        )
        for state in reversed(queued)
    )


def _count_up_to(batch: MigrationBatch, state: str, limit: int) -> int:
    """How many of the batch's stations are in `state`, counted up to `limit`."""
    return batch.stations.filter(state=state).order_by()[:limit].count()


def _start_pending(batch: MigrationBatch, pending: int, in_flight: int, now: datetime) -> int:
    room = min(pending, batch.max_in_flight - in_flight)
    if batch.rate_per_minute:
        room = min(room, _rate_room(batch, now))
    if room <= 0:
        return 0
    candidates = batch.stations.filter(state=State.PENDING)
    if batch.canary_size and candidates.filter(canary=True).exists():
        candidates = candidates.filter(canary=True)
    elif batch.stations.filter(
        canary=True, state__in=[*ACTIVE_STATES, State.WAITING_ONLINE]
    ).exists():
        # The rest wait until every canary station has ended (none is pending). Named
        # states, not "not ended": SQLite would read the whole batch for a NOT IN.
        return 0
    elif batch.canary_size and batch.canary_ended_at is None:
        _canary_ended(batch, now)
    if awaiting_promotion(batch):
        return 0  # the promotion drives the batch
    chosen = dict(candidates.order_by("id").values_list("id", "station__identity")[:room])
    started = transition_many(batch.id, chosen, State.PENDING, State.PREFLIGHT, started_at=now)
    enqueue_steps(
        State.PREFLIGHT, [(migration_id, chosen[migration_id]) for migration_id in started]
    )
    return len(started)


def _canary_ended(batch: MigrationBatch, now: datetime) -> None:
    """The canary wave ended and the rest start (or wait to be promoted): it passed, unless
    a canary station failed and the operator resumed the batch despite it."""
    batch.canary_ended_at = now
    batch.save(update_fields=["canary_ended_at"])
    if not batch.stations.filter(canary=True, state=State.FAILED).exists():
        notifications.notify(
            batch,
            notifications.Event.CANARY_PASSED,
            reason="waiting to be promoted" if awaiting_promotion(batch) else "",
        )


def awaiting_approval(batch: MigrationBatch) -> bool:
    """No station starts until a second person approves the batch."""
    return batch.approval_required and batch.approved_at is None


def awaiting_promotion(batch: MigrationBatch) -> bool:
    """The canary wave ended and the rest wait for an operator's promotion."""
    return (
        batch.promote_after_canary
        and batch.canary_ended_at is not None
        and batch.promoted_at is None
    )


def held_for(batch: MigrationBatch, now: datetime | None = None) -> str:
    """What keeps a running batch from starting stations, in words; "" when nothing does
    (besides its limits and window)."""
    if batch.state != MigrationBatch.State.RUNNING:
        return ""
    if awaiting_approval(batch):
        return "awaiting approval by a second person"
    if awaiting_promotion(batch):
        return "the canary wave ended: awaiting promotion"
    if batch.starts_at is not None and (now or timezone.now()) < batch.starts_at:
        return f"scheduled to start at {policies.when_text(batch.starts_at)}"
    return ""


def _end_of_schedule(batch: MigrationBatch, now: datetime) -> None:
    """Past the schedule's end no station starts: those not started are cancelled (the
    armed ones finish), so that the batch ends."""
    ended = policies.schedule_ended(batch, now)
    if ended is None:
        return
    cancelled = cancel_queued(
        batch, reason=f"not started: the schedule ended at {policies.when_text(ended)}"
    )
    if cancelled:
        BatchAction.objects.create(
            batch=batch,
            kind=BatchAction.Kind.SCHEDULE_END,
            detail=f"{cancelled} stations not started were cancelled",
        )


def in_window(batch: MigrationBatch, now: time) -> bool:
    """Whether the maintenance window (UTC, may span midnight) is open at `now`."""
    start, end = batch.window_start, batch.window_end
    if start is None or end is None:
        return True
    if start < end:
        return start <= now < end
    return now >= start or now < end


def _canary_verdict(batch: MigrationBatch) -> str:
    if not batch.canary_size:
        return ""
    # Ended since the operator last resumed: a resume means "go on despite what paused
    # it", so the same failure must not pause again.
    failed = batch.stations.filter(canary=True, state=State.FAILED)
    if batch.resumed_at is not None:
        failed = failed.filter(finished_at__gt=batch.resumed_at)
    first = failed.select_related("station").order_by("id").first()
    if first is None:
        return ""
    return f"canary failed: {first.station.identity}: {first.reason}"


def _brake_verdict(batch: MigrationBatch) -> str:
    ended = progress.ended_since_resume(batch)
    first = batch.brake_first_failed
    if first and ended.failed_before_done >= first:
        return f"brake: the first {first} ended stations all failed"
    if batch.brake_failure_ratio is None:
        return ""
    if ended.total < max(batch.brake_min_sample, 1):
        return ""
    ratio = ended.failed / ended.total
    if ratio <= batch.brake_failure_ratio:
        return ""
    return (
        f"brake: {ended.failed} of {ended.total} ended stations failed "
        f"({ratio:.0%} > {batch.brake_failure_ratio:.0%})"
    )


def _auto_pause(batch: MigrationBatch, reason: str) -> None:
    batch.state = MigrationBatch.State.PAUSED
    batch.pause_reason = reason
    batch.save(update_fields=["state", "pause_reason"])
    BatchAction.objects.create(batch=batch, kind=BatchAction.Kind.AUTO_PAUSE, detail=reason)
    notifications.notify(batch, notifications.Event.AUTO_PAUSED, reason=reason)


def _requeue_reconnected(batch: MigrationBatch, now: datetime) -> None:
    """Offline stations queued for their reconnection: back in line, or failed when late."""
    waiting = batch.stations.filter(state=State.WAITING_ONLINE).values_list("id", flat=True)
    transition_many(
        batch.id,
        waiting.filter(station__connected=True),
        State.WAITING_ONLINE,
        State.PENDING,
        reason="back online",
    )
    transition_many(
        batch.id,
        waiting.filter(wait_until__lte=now),
        State.WAITING_ONLINE,
        State.FAILED,
        reason=f"offline: did not reconnect within {batch.offline_wait_seconds}s",
        failed_step=State.PREFLIGHT,
        failure_kind=StationMigration.FailureKind.OFFLINE,
    )


def rate_now(batch: MigrationBatch) -> int:
    """The batch's starts per minute now: its rate, grown by its exponential rate."""
    return policies.rate_now(batch, batch.done_total)


def _rate_room(batch: MigrationBatch, now: datetime) -> int:
    """Starts allowed now: R per sliding minute, spread so a minute does not start at once."""
    rate = rate_now(batch)
    last_minute = _started_since(batch, now - timedelta(seconds=60)).count()
    last_tenth = _started_since(batch, now - timedelta(seconds=10)).count()
    per_tenth = math.ceil(rate / 6)
    return min(rate - last_minute, per_tenth - last_tenth)


def _rate_wait(batch: MigrationBatch, now: datetime) -> float | None:
    """Seconds until the rate limit lets one more station start; None if it does now."""
    rate = rate_now(batch)
    per_tenth = math.ceil(rate / 6)
    frees: list[float] = []
    for span, limit in ((60, rate), (10, per_tenth)):
        recent = list(
            _started_since(batch, now - timedelta(seconds=span))
            .order_by("started_at")
            .values_list("started_at", flat=True)
        )
        if len(recent) >= limit:
            # The start that leaves the window first frees a slot.
            first_out = recent[len(recent) - limit]
            assert first_out is not None  # _started_since filters on started_at
            frees.append((first_out - now).total_seconds() + span)
    return max(frees) + 0.05 if frees else None


def _started_since(batch: MigrationBatch, since: datetime) -> QuerySet[StationMigration]:
    """The batch's starts after `since` (the rate keeps them to about one minute's)."""
    return batch.stations.filter(started_at__gt=since)


def _until_window_opens(batch: MigrationBatch, now: datetime) -> float:
    assert batch.window_start is not None  # only asked when in_window found it closed
    start = dt_combine(now, batch.window_start)
    if start <= now:
        start += timedelta(days=1)
    return (start - now).total_seconds()


def redrive_stale(
    migrations: QuerySet[StationMigration], stale_seconds: float | None = None
) -> int:
    """Re-send the step of stations whose state has not moved for longer than the lease.

    A step task can vanish with a worker killed outright; the database is the source of
    truth, so its step is sent again (every step is safe to run twice). A step a live
    worker is running (its commands may take a while) is left alone. The re-drive is
    claimed (updated_at) so that the next look does not send it again at once.
    """
    lease = settings.MIGRATION_STEP_LEASE_SECONDS if stale_seconds is None else stale_seconds
    stale_before = timezone.now() - timedelta(seconds=lease)
    stale = (
        migrations.filter(state__in=ACTIVE_STATES, updated_at__lt=stale_before)
        .exclude(id__in=liveness.held_by_live_workers())
        .values_list("id", "station__identity", "state")[:1000]
    )
    sent = 0
    for migration_id, identity, state in stale:
        with transaction.atomic():
            claimed = StationMigration.objects.filter(
                id=migration_id, state=state, updated_at__lt=stale_before
            ).update(updated_at=timezone.now())
            if claimed:
                # Its wait's timer, if any, is taken for lost: the re-driven step sets a new
                # one when it stays (forgotten first: the step runs once this commits).
                wakes.timers_forget([(migration_id, state)])
                enqueue_step(migration_id, identity, state)
                sent += 1
    return sent


def batches_recover(*, running_on_dead_workers: list[int]) -> None:
    """After Redis lost its data, or a worker died with the tasks it held: republish the
    registries Redis lost, and re-drive.

    The steps the dead worker was running are sent again at once; every other station that
    went quiet for longer than a waiting step's poll (its next poll died with the worker's
    prefetched tasks) too, without waiting for the lease; and every live batch is driven
    (which reschedules its own next drive). Steps running on live workers are left alone.
    """
    # Before any step is re-sent: a Reset must find its target's registry in Redis.
    registry_republish_missing(CsmsBackend.objects.values_list("name", flat=True))
    live = MigrationBatch.objects.exclude(state=MigrationBatch.State.FINISHED)
    stations = StationMigration.objects.filter(batch__in=live)
    redrive_stale(stations.filter(id__in=running_on_dead_workers), stale_seconds=0)
    redrive_stale(stations, stale_seconds=RECOVER_GRACE_SECONDS)
    for batch_id in live.values_list("id", flat=True):
        batch_drive(batch_id=batch_id)


def batches_tick() -> None:
    """The beat's safety net: start due stations, and re-send steps whose task was lost.

    The batches drive themselves (batch_drive schedules its next run); this also covers a
    batch whose scheduled drive was lost with the broker's data.
    """
    for batch_id in MigrationBatch.objects.filter(state=MigrationBatch.State.RUNNING).values_list(
        "id", flat=True
    ):
        batch_drive(batch_id=batch_id)
    # Whatever the batch's state: a paused or cancelled batch still has armed stations to
    # finish, and the step handlers know how to hold or stop the others.
    redrive_stale(StationMigration.objects.all())


def batch_report(batch: MigrationBatch) -> dict[str, Any]:
    """The final report: one entry per station, counts by state."""
    rows = batch.stations.select_related("station", "source").order_by("station__identity")
    stations = [
        {
            "identity": m.station.identity,
            "state": m.state,
            "step": m.failed_step or m.state,
            "failure_kind": m.failure_kind,
            "reason": m.reason,
            "warnings": list(m.warnings or []),
        }
        for m in rows
    ]
    counts = Counter(entry["state"] for entry in stations)
    return {
        "batch": batch.id,
        "target": csms_summary(batch.target),
        # Each station's own source (a batch may gather stations from several CSMS).
        "sources": [
            csms_summary(source)
            for source in sorted({m.source for m in rows if m.source}, key=lambda c: c.name)
        ],
        "stations": stations,
        "counts": dict(sorted(counts.items())),
        "selection": batch.selection,
    }


def csms_summary(csms: CsmsBackend) -> dict[str, Any]:
    """Where a report's CSMS is: its stations' URL and, in proxy mode, the real CSMS behind."""
    return {
        "name": csms.name,
        "url": csms.url,
        "mode": csms.mode,
        "upstream": csms.upstream_shown or None,
    }
