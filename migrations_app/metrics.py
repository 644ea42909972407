"""The web process's Prometheus metrics (prometheus-client): batches and the fleet.

Computed from the database when scraped, not counted in the workers: the database already
holds every fact (each station's state, failed step and failure kind, the state history,
the automatic pauses), so the figures are exact whatever number of worker processes or
hosts ran the steps, survive a worker's restart, and agree with the admin's pages. The
library's multiprocess mode would need a shared directory per host, lose nothing only
while that directory lives, and still not add up across hosts.

Scraped batches are the unfinished ones and those finished in the last
MIGRATION_METRICS_FINISHED_HOURS, so a long-lived installation does not grow a series per
batch forever.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from datetime import timedelta

from django.conf import settings
from django.db import connection
from django.db.models import Count, Q, QuerySet
from django.utils import timezone
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from fleet.models import CsmsBackend
from migrations_app.models import BatchAction, MigrationBatch, StateChange, StationMigration

# Seconds in one step: a GetConfiguration's second to an idle wait's half hour.
STEP_SECONDS_BUCKETS = (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
BATCH_LABELS = ["batch", "target"]


def scraped_batches() -> QuerySet[MigrationBatch]:
    since = timezone.now() - timedelta(hours=settings.MIGRATION_METRICS_FINISHED_HOURS)
    return MigrationBatch.objects.filter(
        Q(finished_at__isnull=True) | Q(finished_at__gte=since)
    ).select_related("target")


class MigrationCollector(Collector):
    def collect(self) -> Iterator[Metric]:
        batches = {batch.id: batch for batch in scraped_batches()}
        yield from _fleet()
        yield _batch_info(batches)
        ids = list(batches)
        labels = {batch_id: [str(batch_id), b.target.name] for batch_id, b in batches.items()}
        yield from _batch_stations(ids, labels)
        yield _auto_pauses(ids, labels)
        yield _step_durations(ids, labels)


def _fleet() -> Iterator[Metric]:
    stations = GaugeMetricFamily(
        "csms_migrate_stations", "Stations whose last boot was on this CSMS.", labels=["csms"]
    )
    connected = GaugeMetricFamily(
        "csms_migrate_stations_connected", "Of those, connected now.", labels=["csms"]
    )
    for backend in CsmsBackend.objects.annotate(
        total=Count("stations"), online=Count("stations", filter=Q(stations__connected=True))
    ).order_by("name"):
        stations.add_metric([backend.name], backend.total)
        connected.add_metric([backend.name], backend.online)
    yield stations
    yield connected


def _batch_info(batches: dict[int, MigrationBatch]) -> Metric:
    info = GaugeMetricFamily(
        "csms_migrate_batch_info",
        "1 per scraped batch, with its state (running, paused, cancelled, finished).",
        labels=[*BATCH_LABELS, "state", "dry_run"],
    )
    for batch_id, batch in batches.items():
        dry_run = "true" if batch.dry_run else "false"
        info.add_metric([str(batch_id), batch.target.name, batch.state, dry_run], 1)
    return info


def _batch_stations(ids: list[int], labels: dict[int, list[str]]) -> Iterator[Metric]:
    by_state = GaugeMetricFamily(
        "csms_migrate_batch_stations",
        "The batch's stations by state.",
        labels=[*BATCH_LABELS, "state"],
    )
    started = CounterMetricFamily(
        "csms_migrate_batch_started", "Stations the batch started.", labels=BATCH_LABELS
    )
    failures = CounterMetricFamily(
        "csms_migrate_batch_failures",
        "Failed stations by the step they failed at and the kind of failure (rejected, "
        "timeout, fallback, offline, busy, refused, error).",
        labels=[*BATCH_LABELS, "step", "kind"],
    )
    rows = (
        StationMigration.objects.filter(batch_id__in=ids)
        .values_list("batch_id", "state", "failed_step", "failure_kind")
        .annotate(n=Count("id"), started=Count("id", filter=Q(started_at__isnull=False)))
        .order_by()
    )
    started_per_batch: dict[int, int] = defaultdict(int)
    states: dict[tuple[int, str], int] = defaultdict(int)
    for batch_id, state, failed_step, kind, n, n_started in rows:
        states[batch_id, state] += n
        started_per_batch[batch_id] += n_started
        if state == StationMigration.State.FAILED:
            failures.add_metric([*labels[batch_id], failed_step, kind or "unknown"], n)
    for (batch_id, state), n in sorted(states.items()):
        by_state.add_metric([*labels[batch_id], state], n)
    for batch_id in ids:
        started.add_metric(labels[batch_id], started_per_batch[batch_id])
    yield by_state
    yield started
    yield failures


def _auto_pauses(ids: list[int], labels: dict[int, list[str]]) -> Metric:
    pauses = CounterMetricFamily(
        "csms_migrate_batch_auto_pauses",
        "Times the workers paused the batch (canary failure, failure brake).",
        labels=BATCH_LABELS,
    )
    counted = dict(
        BatchAction.objects.filter(batch_id__in=ids, kind=BatchAction.Kind.AUTO_PAUSE)
        .values_list("batch_id")
        .annotate(n=Count("id"))
        .order_by()
    )
    for batch_id in ids:
        pauses.add_metric(labels[batch_id], counted.get(batch_id, 0))
    return pauses


def _step_durations(ids: list[int], labels: dict[int, list[str]]) -> Metric:
    histogram = HistogramMetricFamily(
        "csms_migrate_step_duration_seconds",
        "Time stations spent in a step (a state they have left), from the state history.",
        labels=[*BATCH_LABELS, "step"],
    )
    for batch_id, step, count, total, cumulative in _step_duration_rows(ids):
        buckets = [
            (str(float(le)), n) for le, n in zip(STEP_SECONDS_BUCKETS, cumulative, strict=True)
        ]
        histogram.add_metric(
            [*labels[batch_id], step], [*buckets, ("+Inf", count)], sum_value=total
        )
    return histogram


def _step_duration_rows(ids: list[int]) -> list[tuple[int, str, int, float, list[int]]]:
    """(batch, step, count, sum of seconds, cumulative count per bucket), one SQL statement:
    each state change's time until the migration's next change (a window function), then
    counted into the buckets, so no history row reaches Python."""
    if not ids:
        return []
    seconds = (
        "EXTRACT(EPOCH FROM (next_at - at))"
        if connection.vendor == "postgresql"
        else "(julianday(next_at) - julianday(at)) * 86400.0"
    )
    buckets = ", ".join(
        f"SUM(CASE WHEN seconds <= {le} THEN 1 ELSE 0 END)" for le in STEP_SECONDS_BUCKETS
    )
    history = StateChange._meta.db_table
    migrations = StationMigration._meta.db_table
    placeholders = ", ".join(["%s"] * len(ids))
    sql = f"""
        SELECT batch_id, to_state, COUNT(*), SUM(seconds), {buckets}
        FROM (
            SELECT m.batch_id AS batch_id, c.to_state AS to_state, {seconds} AS seconds
            FROM (
                SELECT migration_id, to_state, at,
                       LEAD(at) OVER (PARTITION BY migration_id ORDER BY at, id) AS next_at
                FROM {history}
                WHERE migration_id IN (
                    SELECT id FROM {migrations} WHERE batch_id IN ({placeholders})
                )
            ) c
            JOIN {migrations} m ON m.id = c.migration_id
            WHERE c.next_at IS NOT NULL
        ) durations
        GROUP BY batch_id, to_state
        ORDER BY batch_id, to_state
    """
    with connection.cursor() as cursor:
        cursor.execute(sql, ids)
        return [
            (row[0], row[1], row[2], float(row[3] or 0), [int(n) for n in row[4:]])
            for row in cursor.fetchall()
        ]


def exposition() -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MigrationCollector())
    return generate_latest(registry)
