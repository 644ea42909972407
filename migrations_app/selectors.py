"""Reads of migration state for the CLI and the admin."""

from __future__ import annotations

from django.db.models import Count

from migrations_app.models import MigrationBatch


def batch_counts(batch: MigrationBatch) -> dict[str, int]:
    """Stations of the batch per state."""
    return dict(
        batch.stations.values_list("state").annotate(n=Count("id")).order_by()  # type: ignore[arg-type]
    )
