"""Pre-flight refusals (and the schedule's end), run through the step service itself
(nothing reaches a station)."""

from __future__ import annotations

import datetime as dt

import pytest
from django.utils import timezone

from fleet.models import ChargingStation, CsmsBackend, Registration
from migrations_app.models import MigrationBatch, OcppExchange, StationMigration
from migrations_app.services.batches import BatchOptions, batch_create, batch_drive
from migrations_app.services.controls import ControlError, batch_approve, batch_retry_failed
from migrations_app.services.policies import when_text
from migrations_app.services.runner import run_step

State = StationMigration.State


def _migration(
    *,
    source_url: str = "ws://old/ocpp",
    target_url: str = "ws://new/ocpp",
    identity="CP-1",
    registration: str | None = Registration.State.ACTIVE,
    source_registration: str | None = Registration.State.ACTIVE,
    open_target: bool = False,
    firmware: str = "4.2.85",
    connected: bool = True,
    **options,
):
    source = CsmsBackend.objects.create(name="csms-1", url=source_url)
    target = CsmsBackend.objects.create(name="csms-2", url=target_url, open_admission=open_target)
    station = ChargingStation.objects.create(
        identity=identity, csms=source, firmware_version=firmware, connected=connected
    )
    if registration is not None:
        Registration.objects.create(station=station, csms=target, state=registration)
    if source_registration is not None:
        Registration.objects.create(station=station, csms=source, state=source_registration)
    batch = batch_create(target=target, stations=[station], options=BatchOptions(**options))
    migration = batch.stations.get()
    StationMigration.objects.filter(id=migration.id).update(state=State.PREFLIGHT)
    return migration


@pytest.mark.usefixtures("redis_client")
def test_a_move_from_wss_to_ws_is_refused_unless_allowed(transactional_db):
    migration = _migration(source_url="wss://old.example.com/ocpp", target_url="ws://new/ocpp")
    run_step(migration.id, State.PREFLIGHT)
    migration.refresh_from_db()
    assert migration.state == State.FAILED
    assert "security downgrade" in migration.reason
    assert not OcppExchange.objects.exists()


@pytest.mark.usefixtures("redis_client")
def test_an_allowed_downgrade_goes_on_to_step_1(transactional_db):
    migration = _migration(
        source_url="wss://old.example.com/ocpp", target_url="ws://new/ocpp", allow_downgrade=True
    )
    run_step(migration.id, State.PREFLIGHT)
    migration.refresh_from_db()
    assert migration.state == State.READING_CONFIG


@pytest.mark.usefixtures("redis_client")
def test_a_target_url_ending_in_the_station_identity_is_refused(transactional_db):
    migration = _migration(
        source_url="ws://old/ocpp", target_url="ws://new/ocpp/CP-1", identity="CP-1"
    )
    run_step(migration.id, State.PREFLIGHT)
    migration.refresh_from_db()
    assert migration.state == State.FAILED
    assert "identity" in migration.reason


@pytest.mark.usefixtures("redis_client")
def test_a_station_in_an_unfinished_batch_cannot_join_another(transactional_db):
    from migrations_app.services.batches import BatchError

    migration = _migration(source_url="ws://old/ocpp", target_url="ws://new/ocpp")
    with pytest.raises(BatchError, match=r"already being migrated: CP-1 \(batch \d+\)"):
        batch_create(
            target=migration.batch.target,
            stations=[migration.station],
            options=BatchOptions(),
        )


NOT_REGISTERED = (
    "not registered on csms-2: register it first "
    "(manage.py import_registrations csms-2 FILE.csv, or the admin)"
)


@pytest.mark.usefixtures("redis_client")
@pytest.mark.parametrize(
    "registration",
    [None, Registration.State.PENDING_REMOVAL, Registration.State.REMOVED],
)
def test_a_station_not_registered_on_the_target_is_skipped_untouched(
    transactional_db, registration
):
    # Offline and on old firmware too: the registration is checked first, and nothing is
    # sent (an offline station would otherwise be waited for).
    migration = _migration(registration=registration, firmware="4.2.0", connected=False)
    run_step(migration.id, State.PREFLIGHT)
    migration.refresh_from_db()
    assert migration.state == State.SKIPPED
    assert migration.reason == NOT_REGISTERED
    assert not OcppExchange.objects.exists()


@pytest.mark.usefixtures("redis_client")
def test_an_open_target_takes_a_station_not_registered_on_it(transactional_db):
    migration = _migration(registration=None, open_target=True)
    run_step(migration.id, State.PREFLIGHT)
    migration.refresh_from_db()
    assert migration.state == State.READING_CONFIG


@pytest.mark.usefixtures("redis_client")
@pytest.mark.parametrize("registration", [None, Registration.State.REMOVED])
def test_a_station_its_own_csms_would_refuse_on_a_fall_back_is_skipped_untouched(
    transactional_db, registration
):
    migration = _migration(source_registration=registration)
    run_step(migration.id, State.PREFLIGHT)
    migration.refresh_from_db()
    assert migration.state == State.SKIPPED
    assert migration.reason.startswith("not registered on csms-1, where it is now")
    assert not OcppExchange.objects.exists()


@pytest.mark.usefixtures("redis_client")
def test_a_source_registration_marked_for_removal_still_admits_a_fall_back(transactional_db):
    migration = _migration(source_registration=Registration.State.PENDING_REMOVAL)
    run_step(migration.id, State.PREFLIGHT)
    migration.refresh_from_db()
    assert migration.state == State.READING_CONFIG


@pytest.mark.usefixtures("redis_client")
def test_the_schedule_s_end_cancels_a_station_in_pre_flight_and_refuses_a_retry(
    transactional_db, admin_user
):
    migration = _migration(ends_at=timezone.now() + dt.timedelta(minutes=1))
    ended = timezone.now() - dt.timedelta(seconds=1)
    MigrationBatch.objects.filter(id=migration.batch_id).update(ends_at=ended)
    run_step(migration.id, State.PREFLIGHT)
    migration.refresh_from_db()
    assert migration.state == State.CANCELLED
    assert migration.reason == f"not armed when the schedule ended at {when_text(ended)}"
    assert not OcppExchange.objects.exists()

    StationMigration.objects.filter(id=migration.id).update(state=State.FAILED)
    with pytest.raises(ControlError, match=r"schedule ended at .*: no station would start"):
        batch_retry_failed(batch_id=migration.batch_id, user=admin_user)
    assert StationMigration.objects.get(id=migration.id).state == State.FAILED


@pytest.mark.usefixtures("redis_client")
def test_past_the_schedule_s_end_an_approval_is_refused_and_the_batch_ends_unapproved(
    transactional_db, admin_user
):
    source = CsmsBackend.objects.create(name="csms-1", url="ws://old/ocpp")
    target = CsmsBackend.objects.create(name="csms-2", url="ws://new/ocpp", open_admission=True)
    station = ChargingStation.objects.create(identity="CP-1", csms=source, connected=True)
    options = BatchOptions(approval_required=True, ends_at=timezone.now() + dt.timedelta(hours=1))
    batch = batch_create(target=target, stations=[station], options=options)
    MigrationBatch.objects.filter(id=batch.id).update(ends_at=timezone.now())
    with pytest.raises(ControlError, match=r"schedule ended at .*: no station would start"):
        batch_approve(batch_id=batch.id, user=admin_user)
    batch_drive(batch_id=batch.id)
    batch.refresh_from_db()
    assert batch.approved_at is None
    assert batch.stations.get().state == State.CANCELLED
    batch_drive(batch_id=batch.id)
    assert MigrationBatch.objects.get(id=batch.id).state == MigrationBatch.State.FINISHED
