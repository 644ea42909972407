"""The admin's front page: the fleet overview above the app list."""

from __future__ import annotations

from typing import Any

from django import template

from migrations_app.models import MigrationBatch
from migrations_app.selectors import fleet_overview
from migrations_app.services.batches import held_for

register = template.Library()

VIEW_PERMISSION = "migrations_app.view_migrationbatch"


@register.inclusion_tag("admin/migrations_app/includes/fleet_overview.html", takes_context=True)
def fleet_overview_panel(context: dict[str, Any]) -> dict[str, Any]:
    user = context["request"].user
    if not user.has_perm(VIEW_PERMISSION):
        return {"overview": None}
    return {"overview": fleet_overview()}


@register.filter
def batch_held_for(batch: MigrationBatch) -> str:
    """What keeps a running batch from starting stations (approval, promotion, start)."""
    return held_for(batch)
