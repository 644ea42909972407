"""Pre-flight refusals, run through the step service itself (nothing reaches a station)."""

from __future__ import annotations

import pytest

from fleet.models import ChargingStation, CsmsBackend
from migrations_app.models import OcppExchange, StationMigration
from migrations_app.services.batches import BatchOptions, batch_create
from migrations_app.services.runner import run_step

State = StationMigration.State


def _migration(*, source_url: str, target_url: str, identity="CP-1", **options):
    source = CsmsBackend.objects.create(name="csms-1", url=source_url)
    target = CsmsBackend.objects.create(name="csms-2", url=target_url)
    station = ChargingStation.objects.create(
        identity=identity, csms=source, firmware_version="4.2.85", connected=True
    )
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
