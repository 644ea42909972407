"""Reads of migration state for the CLI and the admin."""

from __future__ import annotations

import heapq
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from django.db.models import Count, Exists, F, Max, Min, OuterRef, Q, QuerySet, Subquery
from django.db.models.functions import Coalesce

from fleet.models import ChargingStation, CsmsBackend, Registration
from fleet.selectors import csms_backend_list
from migrations_app.models import (
    BatchAction,
    BatchWebhook,
    MigrationBatch,
    OcppExchange,
    StateChange,
    StationMigration,
    WebhookDelivery,
)
from migrations_app.services import workflow
from migrations_app.services.firmware import firmware_gate
from migrations_app.services.liveness import stack_health
from migrations_app.services.selection import StationFilters


def state_counts(migrations: QuerySet[StationMigration]) -> dict[str, int]:
    """How many of these station migrations are in each state (one aggregate query)."""
    return dict(migrations.values_list("state").annotate(n=Count("id")).order_by())


def batch_counts(batch: MigrationBatch) -> dict[str, int]:
    """Stations of the batch per state."""
    return state_counts(batch.stations.all())


# --- the admin: previews, dashboards, exports -------------------------------------------

_SAMPLE = 10


@dataclass
class Bucket:
    """Stations sharing a fate in a preview: how many, and the first few identities."""

    label: str
    count: int = 0
    sample: list[str] = field(default_factory=list)

    def add(self, identity: str) -> None:
        self.count += 1
        if len(self.sample) < _SAMPLE:
            self.sample.append(identity)

    @property
    def more(self) -> int:
        return self.count - len(self.sample)


@dataclass
class MigrationPreview:
    """What a batch of these stations to ``target`` will do, predicted from the inventory.

    The buckets are exclusive and follow the order of the pre-flight step: no CSMS (fails),
    firmware too old (skipped), offline (queued or fails), already on the target (done
    without a reset), the rest migrate.
    """

    total: int
    by_source: list[tuple[str, int]]
    no_csms: Bucket
    firmware_skips: list[Bucket]
    offline: Bucket
    on_target: Bucket
    ready: Bucket
    # Selected, but not what the filters ask for: not in the batch (not in ``total``).
    filtered_out: Bucket

    @property
    def firmware_skipped(self) -> int:
        return sum(bucket.count for bucket in self.firmware_skips)


def station_migration_preview(
    *,
    stations: QuerySet[ChargingStation],
    target: CsmsBackend | None,
    minimums: dict[str, str],
    filters: StationFilters | None = None,
) -> MigrationPreview:
    gate: dict[str, str | None] = {}
    by_source: Counter[str] = Counter()
    skips: dict[str, Bucket] = {}
    no_csms = Bucket("on no known CSMS: will fail pre-flight")
    offline = Bucket("offline now")
    on_target = Bucket("already on the target: will end as already migrated")
    ready = Bucket("will be migrated")
    filtered_out = Bucket("left out by the filters")
    rows = stations.order_by("identity").values_list(
        "identity", "firmware_version", "connected", "csms_id", "csms__name", "vendor", "model"
    )
    for identity, firmware, connected, csms_id, csms_name, vendor, model in rows.iterator():
        if filters and not filters.matches_values(vendor, model, firmware):
            filtered_out.add(identity)
            continue
        by_source[csms_name or "(none)"] += 1
        if firmware not in gate:
            gate[firmware] = firmware_gate(firmware, minimums)
        if csms_id is None:
            no_csms.add(identity)
        elif skip_label := gate[firmware]:
            skips.setdefault(skip_label, Bucket(skip_label)).add(identity)
        elif not connected:
            offline.add(identity)
        elif target is not None and csms_id == target.id:
            on_target.add(identity)
        else:
            ready.add(identity)
    return MigrationPreview(
        total=sum(by_source.values()),
        by_source=sorted(by_source.items()),
        no_csms=no_csms,
        firmware_skips=sorted(skips.values(), key=lambda bucket: (-bucket.count, bucket.label)),
        offline=offline,
        on_target=on_target,
        ready=ready,
        filtered_out=filtered_out,
    )


def batch_list() -> QuerySet[MigrationBatch]:
    """Batches with their station counts per bar segment but the in-flight one (computed:
    total minus the rest), in one query for the admin list."""
    return MigrationBatch.objects.select_related("target", "source", "created_by").annotate(
        total=Count("stations"),
        **{
            segment.value: Count("stations", filter=Q(stations__state__in=sorted(states)))
            for segment, states in workflow.SEGMENT_STATES.items()
            if segment != workflow.Segment.IN_FLIGHT
        },
        first_source=Min("stations__source__name"),
        last_source=Max("stations__source__name"),
    )


@dataclass(frozen=True)
class Segment:
    key: str
    label: str
    count: int
    percent: float


@dataclass(frozen=True)
class BatchProgress:
    total: int
    counts: list[tuple[str, str, int]]  # (state, label, count) in workflow order, no zeros
    segments: list[Segment]  # for the bar, zeros left out
    ended: int
    in_flight: int

    @property
    def percent_ended(self) -> int:
        return int(100 * self.ended / self.total) if self.total else 100

    def count(self, state: str) -> int:
        return next((n for value, _, n in self.counts if value == state), 0)


def progress_from_counts(counts: dict[str, int]) -> BatchProgress:
    """Progress for a bar from per-state counts (batch_counts)."""
    labels = dict(StationMigration.State.choices)
    segment_counts: Counter[str] = Counter()
    for state, n in counts.items():
        segment_counts[workflow.segment_of(state)] += n
    progress = progress_from_segments(sum(counts.values()), segment_counts)
    return replace(
        progress,
        counts=[(s, labels[s], counts[s]) for s in workflow.STATE_ORDER if counts.get(s)],
    )


def progress_from_segments(total: int, segment_counts: dict[str, int]) -> BatchProgress:
    """Progress for a bar from counts per segment (batch_list's annotations); no per-state
    counts."""
    segments = [
        Segment(segment.value, label, n, 100 * n / total)
        for segment, label in workflow.SEGMENT_LABELS.items()
        if (n := segment_counts.get(segment, 0))
    ]
    return BatchProgress(
        total=total,
        counts=[],
        segments=segments,
        ended=sum(segment_counts.get(segment, 0) for segment in workflow.ENDED_SEGMENTS),
        in_flight=segment_counts.get(workflow.Segment.IN_FLIGHT, 0),
    )


def batch_progress(batch: MigrationBatch) -> BatchProgress:
    return progress_from_counts(batch_counts(batch))


def batch_stations(
    *, batch: MigrationBatch, state: str = "", failed_step: str = "", reason: str = ""
) -> QuerySet[StationMigration]:
    """The batch's stations, filtered as the dashboard asks, by station identity."""
    migrations = batch.stations.select_related("station", "source").order_by("station__identity")
    if state:
        migrations = migrations.filter(state=state)
    if failed_step:
        migrations = migrations.filter(failed_step=failed_step)
    if reason:
        migrations = migrations.filter(reason__icontains=reason)
    return migrations


def batch_failed_steps(batch: MigrationBatch) -> list[tuple[str, int]]:
    """(step, how many stations failed at it), most first."""
    rows = (
        batch.stations.exclude(failed_step="")
        .values_list("failed_step")
        .annotate(n=Count("id"))
        .order_by("-n", "failed_step")
    )
    return list(rows)


def batch_actions(batch: MigrationBatch) -> list[BatchAction]:
    return list(batch.actions.select_related("user").order_by("at", "id"))


def batch_verified_count(batch: MigrationBatch) -> int:
    """Stations that ended done after a verified boot: what 'migrate back' would move."""
    return (
        batch.stations.filter(
            state=StationMigration.State.DONE,
            state_changes__to_state=StationMigration.State.VERIFIED,
        )
        .distinct()
        .count()
    )


def batch_related(batch: MigrationBatch) -> list[MigrationBatch]:
    """The batches that migrated this one's stations back."""
    return list(MigrationBatch.objects.filter(migrated_back_from=batch).order_by("id"))


@dataclass(frozen=True)
class TimelineEntry:
    at: datetime | None
    offset_seconds: float | None  # since the first entry
    state_change: StateChange | None = None
    exchange: OcppExchange | None = None


def station_migration_timeline(migration: StationMigration) -> list[TimelineEntry]:
    """Every state change and OCPP exchange of one station migration, in time order."""
    rows: list[tuple[datetime, int, int, StateChange | OcppExchange]] = [
        (change.at, 0, change.id, change) for change in migration.state_changes.all()
    ]
    rows += [
        (exchange.sent_at or exchange.recorded_at, 1, exchange.id, exchange)
        for exchange in migration.exchanges.all()
    ]
    merged = sorted(rows, key=lambda row: row[:3])
    start = merged[0][0] if merged else None
    return [
        TimelineEntry(
            at=at,
            offset_seconds=(at - start).total_seconds() if start else None,
            state_change=item if isinstance(item, StateChange) else None,
            exchange=item if isinstance(item, OcppExchange) else None,
        )
        for at, _, _, item in merged
    ]


PENDING_REMOVAL_COLUMNS = [
    "identity",
    "serial",
    "vendor",
    "model",
    "old_csms",
    "new_csms",
    "verified_at",
]


def batch_pending_removal_rows(batch: MigrationBatch) -> list[dict[str, Any]]:
    """The batch's stations whose registration on their old CSMS awaits removal (step 6)."""
    pending = Registration.objects.filter(
        station=OuterRef("station"),
        csms=OuterRef("source"),
        state=Registration.State.PENDING_REMOVAL,
    )
    verified_at = StateChange.objects.filter(
        migration=OuterRef("pk"), to_state=StationMigration.State.VERIFIED
    ).order_by("-at")
    rows = (
        batch.stations.filter(Exists(pending))
        .annotate(verified_at=Subquery(verified_at.values("at")[:1]))
        .order_by("station__identity")
        .values_list(
            "station__identity",
            "station__serial",
            "station__vendor",
            "station__model",
            "source__name",
            "verified_at",
        )
    )
    return [
        dict(zip(PENDING_REMOVAL_COLUMNS, (*row[:5], batch.target.name, row[5]), strict=True))
        for row in rows
    ]


AUDIT_COLUMNS = [
    "at",
    "record",
    "station",
    "user",
    "step",
    "action",
    "from_state",
    "to_state",
    "outcome",
    "duration_ms",
    "request",
    "response",
    "error",
    "detail",
]


def batch_audit_trail(batch: MigrationBatch) -> Iterator[dict[str, Any]]:
    """Every batch action, state change and OCPP exchange of the batch, in time order.

    Streams: a large batch has hundreds of thousands of rows.
    """
    actions = (
        {
            "at": action.at,
            "record": "batch_action",
            "user": action.user.get_username() if action.user else "",
            "action": action.kind,
            "detail": action.detail,
        }
        for action in batch.actions.select_related("user").order_by("at", "id").iterator()
    )
    changes = (
        {
            "at": at,
            "record": "state_change",
            "station": identity,
            "from_state": from_state,
            "to_state": to_state,
            "detail": reason,
        }
        for at, identity, from_state, to_state, reason in StateChange.objects.filter(
            migration__batch=batch
        )
        .order_by("at", "id")
        .values_list("at", "migration__station__identity", "from_state", "to_state", "reason")
        .iterator()
    )
    exchanges = (
        {
            "at": exchange.at,
            "record": "ocpp_exchange",
            "station": exchange.identity,
            "step": exchange.step,
            "action": exchange.action,
            "outcome": exchange.outcome,
            "duration_ms": (
                round(exchange.duration_ms, 1) if exchange.duration_ms is not None else ""
            ),
            "request": json.dumps(exchange.request, sort_keys=True),
            "response": json.dumps(exchange.response, sort_keys=True)
            if exchange.response is not None
            else "",
            "error": " ".join(filter(None, [exchange.error_code, exchange.error_description])),
            "detail": _exchange_detail(exchange),
        }
        for exchange in OcppExchange.objects.filter(migration__batch=batch)
        .annotate(at=Coalesce("sent_at", "recorded_at"), identity=F("migration__station__identity"))
        .order_by("at", "id")
        .iterator()
    )
    for row in heapq.merge(actions, changes, exchanges, key=lambda row: row["at"]):
        yield {column: row.get(column, "") for column in AUDIT_COLUMNS}


def _exchange_detail(exchange: OcppExchange) -> str:
    if exchange.sent:
        return f"via {exchange.csms}" if exchange.csms else ""
    return f"not sent (refused by {exchange.csms})" if exchange.csms else "not sent"


def batch_source_names(batch: MigrationBatch) -> list[str]:
    """The CSMS the batch's stations came from (its source, else each station's own)."""
    if batch.source is not None:
        return [batch.source.name]
    names = batch.stations.exclude(source=None).values_list("source__name", flat=True)
    return sorted(set(names.distinct()))


def batch_stack_warnings(batch: MigrationBatch) -> list[str]:
    """What the stack lacks to carry this batch on (broker, worker, beat); [] when ended."""
    if batch.state == MigrationBatch.State.FINISHED:
        return []
    return stack_health().missing()


# The latest deliveries the batch page lists.
DELIVERIES_SHOWN = 50


def batch_webhooks(batch: MigrationBatch) -> list[BatchWebhook]:
    return list(batch.webhooks.all())


def batch_webhook_deliveries(batch: MigrationBatch) -> list[WebhookDelivery]:
    """The batch's latest webhook deliveries, newest first."""
    return list(
        WebhookDelivery.objects.filter(webhook__batch=batch)
        .select_related("webhook")
        .order_by("-created_at", "-id")[:DELIVERIES_SHOWN]
    )


def list_segment_counts(batch: Any) -> dict[str, int]:
    """Stations per bar segment from batch_list's annotations (all but the in-flight one,
    which is the rest of the total)."""
    counts: dict[str, int] = {
        segment: getattr(batch, segment)
        for segment in workflow.Segment
        if segment != workflow.Segment.IN_FLIGHT
    }
    counts[workflow.Segment.IN_FLIGHT] = batch.total - sum(counts.values())
    return counts


# What the admin's front page lists at most.
OVERVIEW_BATCHES = 20
OVERVIEW_FAILURES = 10


@dataclass
class FleetOverview:
    """The admin's front page: where the stations are, what runs, what failed last."""

    backends: list[CsmsBackend]
    batches: list[tuple[MigrationBatch, BatchProgress]]
    failures: list[StationMigration]


def fleet_overview() -> FleetOverview:
    active = (
        batch_list()
        .filter(state__in=[MigrationBatch.State.RUNNING, MigrationBatch.State.PAUSED])
        .order_by("-created_at")[:OVERVIEW_BATCHES]
    )
    failures = (
        StationMigration.objects.filter(state=StationMigration.State.FAILED)
        .select_related("station", "batch")
        .order_by("-updated_at")[:OVERVIEW_FAILURES]
    )
    batches = []
    for batch in active:
        total = batch.total  # type: ignore[attr-defined]  # annotated by batch_list
        batches.append((batch, progress_from_segments(total, list_segment_counts(batch))))
    return FleetOverview(
        backends=list(csms_backend_list()),
        batches=batches,
        failures=list(failures),
    )
