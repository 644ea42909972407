"""The batch page's notice of a missing broker, worker or beat."""

from __future__ import annotations

from django import template

from migrations_app.models import MigrationBatch
from migrations_app.selectors import batch_stack_warnings

register = template.Library()


@register.simple_tag
def stack_warnings(batch: MigrationBatch) -> list[str]:
    return batch_stack_warnings(batch)
