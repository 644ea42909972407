"""The user a management command acts as (--user): taken on trust, as shell access to a
deployment is access to its database; the admin is where identities are checked."""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import CommandError


def user_named(name: str) -> Any:
    user = get_user_model().objects.filter(username=name).first()
    if user is None:
        raise CommandError(f"unknown user {name!r}", returncode=2)
    return user
