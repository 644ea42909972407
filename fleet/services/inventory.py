"""Operator-driven changes to the inventory: CSMS backends and registrations."""

from __future__ import annotations

from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from fleet.models import ChargingStation, CsmsBackend, Registration
from fleet.validators import csms_url_problems


def csms_backend_upsert(*, name: str, url: str) -> tuple[CsmsBackend, bool]:
    """Create the backend ``name`` or change its URL; return it and whether it is new.

    Raises ValidationError, having written nothing, when the name or the URL is invalid.
    """
    # The URL check runs on its own first: full_clean would add Django's generic length
    # message next to ours.
    problems = csms_url_problems(url)
    with transaction.atomic():
        backend = CsmsBackend.objects.select_for_update().filter(name=name).first()
        created = backend is None
        if backend is None:
            backend = CsmsBackend(name=name)
        backend.url = url
        errors: dict[str, list[str]] = {}
        try:
            backend.full_clean(exclude=["url"])
        except ValidationError as exc:
            errors.update(exc.message_dict)
        if problems:
            errors["url"] = problems
        if errors:
            raise ValidationError(errors)
        backend.save()
    return backend, created


def station_move_to_csms(*, station_id: int, source_id: int | None, target_id: int) -> None:
    """Record a verified migration (step 6): the station is on the target now, and its
    account on the source is to be removed (created as such if the inventory had none)."""
    now = timezone.now()
    if source_id is not None and source_id != target_id:
        Registration.objects.update_or_create(
            station_id=station_id,
            csms_id=source_id,
            defaults={"state": Registration.State.PENDING_REMOVAL, "state_changed_at": now},
        )
    Registration.objects.update_or_create(
        station_id=station_id,
        csms_id=target_id,
        defaults={"state": Registration.State.ACTIVE, "state_changed_at": now},
    )
    ChargingStation.objects.filter(id=station_id).update(csms_id=target_id)


def registration_mark_removed(*, registration_id: int) -> bool:
    """Record that the account was deleted on the CSMS (after it was marked for removal)."""
    updated = Registration.objects.filter(
        pk=registration_id, state=Registration.State.PENDING_REMOVAL
    ).update(state=Registration.State.REMOVED, state_changed_at=timezone.now())
    return updated == 1
