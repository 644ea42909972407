"""Operator-driven changes to the inventory: CSMS backends and registrations."""

from __future__ import annotations

import datetime

from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from fleet.models import ChargingStation, CsmsBackend, Registration
from fleet.rows import select_first, update_where
from fleet.services.registry import registry_publish_on_commit
from fleet.validators import csms_url_problems, upstream_url_problems


def csms_backend_upsert(
    *,
    name: str,
    url: str,
    open_admission: bool = False,
    upstream_url: str = "",
    root_ca_pem: str = "",
) -> tuple[CsmsBackend, bool]:
    """Create the backend ``name`` or set everything about it; return it and whether it is
    new. Its gateways learn the admission (and, if new, an empty registry) on commit.

    Every field is set from the arguments, an existing backend's included: an empty
    ``upstream_url`` means endpoint mode and an empty ``root_ca_pem`` no root CA, as a False
    ``open_admission`` means registered stations only.

    Raises ValidationError, having written nothing, when a value is invalid: among others an
    upstream with credentials in it or one that is the CSMS's own URL (a loop).
    """
    # The URL checks run on their own first: full_clean would add Django's generic length
    # message next to ours.
    problems = {"url": csms_url_problems(url)}
    if upstream_url:
        problems["upstream_url"] = upstream_url_problems(upstream_url)
    with transaction.atomic():
        backend = CsmsBackend.objects.select_for_update().filter(name=name).first()
        created = backend is None
        if backend is None:
            backend = CsmsBackend(name=name)
        backend.url = url
        backend.open_admission = open_admission
        backend.upstream_url = upstream_url
        backend.root_ca_pem = root_ca_pem
        errors: dict[str, list[str]] = {}
        try:
            backend.full_clean(exclude=list(problems))
        except ValidationError as exc:
            errors.update(exc.message_dict)
        errors.update({field: found for field, found in problems.items() if found})
        if errors:
            raise ValidationError(errors)
        backend.save()
        registry_publish_on_commit([backend.name])
    return backend, created


def station_move_to_csms(*, station_id: int, source_id: int | None, target_id: int) -> None:
    """Record a verified migration (step 6): the station is on the target now, and its
    account on the source is to be removed (created as such if the inventory had none).

    Usually neither admitted set changes (active and pending removal are both admitted):
    only a registration created or brought back from removed is published.
    """
    now = timezone.now()
    changed: list[int] = []
    pending = Registration.State.PENDING_REMOVAL
    if (
        source_id is not None
        and source_id != target_id
        and _registration_set_state(station_id, source_id, pending, now)
    ):
        changed.append(source_id)
    if _registration_set_state(station_id, target_id, Registration.State.ACTIVE, now):
        changed.append(target_id)
    update_where(ChargingStation, {"id": station_id}, {"csms_id": target_id})
    if changed:
        registry_publish_on_commit(
            CsmsBackend.objects.filter(id__in=changed).values_list("name", flat=True)
        )


def _registration_set_state(
    station_id: int, csms_id: int, state: str, now: datetime.datetime
) -> bool:
    """Set the state; return whether the registration was not admitted before."""
    # In the usual case (the registration exists and is admitted) a read and an UPDATE of
    # the statements built once (fleet.rows): this runs for every migrated station.
    found = select_first(
        Registration, ("id", "state"), {"station_id": station_id, "csms_id": csms_id}
    )
    if found is not None and found[1] != Registration.State.REMOVED:
        registration_id, before = found
        if update_where(
            Registration,
            {"id": registration_id, "state": before},
            {"state": state, "state_changed_at": now},
        ):
            return False
    # None yet, removed, or its state changed since the read: through the ORM, as before.
    updated = (
        Registration.objects.filter(station_id=station_id, csms_id=csms_id)
        .exclude(state=Registration.State.REMOVED)
        .update(state=state, state_changed_at=now)
    )
    if updated:
        return False
    Registration.objects.update_or_create(
        station_id=station_id,
        csms_id=csms_id,
        defaults={"state": state, "state_changed_at": now},
    )
    return True


def registration_mark_removed(*, registration_id: int) -> bool:
    """Record that the account was deleted on the CSMS (after it was marked for removal)."""
    updated = Registration.objects.filter(
        pk=registration_id, state=Registration.State.PENDING_REMOVAL
    ).update(state=Registration.State.REMOVED, state_changed_at=timezone.now())
    if updated:
        registry_publish_on_commit(
            CsmsBackend.objects.filter(registrations__pk=registration_id).values_list(
                "name", flat=True
            )
        )
    return updated == 1
