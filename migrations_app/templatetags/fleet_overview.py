"""The admin's front page: the fleet overview above the app list."""

from __future__ import annotations

from typing import Any

from django import template

from migrations_app.selectors import fleet_overview

register = template.Library()

VIEW_PERMISSION = "migrations_app.view_migrationbatch"


@register.inclusion_tag("admin/migrations_app/includes/fleet_overview.html", takes_context=True)
def fleet_overview_panel(context: dict[str, Any]) -> dict[str, Any]:
    user = context["request"].user
    if not user.has_perm(VIEW_PERMISSION):
        return {"overview": None}
    return {"overview": fleet_overview()}
