"""Reads of migration state for the CLI and the admin."""

from __future__ import annotations

from django.db.models import Count, QuerySet

from migrations_app.models import MigrationBatch, StationMigration


def state_counts(migrations: QuerySet[StationMigration]) -> dict[str, int]:
    """How many of these station migrations are in each state (one aggregate query)."""
    return dict(migrations.values_list("state").annotate(n=Count("id")).order_by())  # type: ignore[arg-type]


def batch_counts(batch: MigrationBatch) -> dict[str, int]:
    """Stations of the batch per state."""
    return state_counts(batch.stations.all())
