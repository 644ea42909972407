"""migrate_fleet --wait returns a closed batch: once every station has ended it gives the
batch's drive a bounded moment to close it, and never waits for a drive nobody may run."""

from __future__ import annotations

import pytest

from fleet.models import ChargingStation, CsmsBackend
from migrations_app.management.commands import migrate_fleet
from migrations_app.models import MigrationBatch, StationMigration
from migrations_app.selectors import batch_counts
from migrations_app.services.batches import BatchOptions, batch_create

BatchState = MigrationBatch.State


@pytest.fixture
def ended_batch(db, redis_client, monkeypatch) -> MigrationBatch:
    """A running batch whose stations have all ended, not yet closed by a drive."""
    source = CsmsBackend.objects.create(name="csms-1", url="wss://csms-1.example.com/ocpp")
    target = CsmsBackend.objects.create(name="csms-2", url="wss://csms-2.example.com/ocpp")
    stations = [
        ChargingStation.objects.create(identity=f"CP-{i}", csms=source, firmware_version="4.2.85")
        for i in range(3)
    ]
    batch = batch_create(target=target, stations=stations, options=BatchOptions(), source=source)
    batch.stations.update(state=StationMigration.State.SKIPPED)
    monkeypatch.setattr(migrate_fleet, "POLL_SECONDS", 0.01)
    return batch


def looks_counted(monkeypatch, close_at_look: int | None = None) -> list[int]:
    """Counts the command's looks at the batch; closes it (as a drive would) at a look."""
    looks: list[int] = []

    def counting(batch: MigrationBatch) -> dict[str, int]:
        looks.append(len(looks) + 1)
        if len(looks) == close_at_look:
            MigrationBatch.objects.filter(id=batch.id).update(state=BatchState.FINISHED)
        return batch_counts(batch)

    monkeypatch.setattr(migrate_fleet, "batch_counts", counting)
    return looks


def test_wait_follows_an_ended_batch_until_its_drive_closes_it(ended_batch, monkeypatch):
    looks = looks_counted(monkeypatch, close_at_look=4)
    migrate_fleet.Command()._follow(ended_batch)
    # The 4th look closed it; the 5th read the closed state and stopped.
    assert len(looks) == 5
    ended_batch.refresh_from_db()
    assert ended_batch.state == BatchState.FINISHED


def test_wait_gives_up_on_a_drive_that_does_not_come_within_its_bound(ended_batch, monkeypatch):
    monkeypatch.setattr(migrate_fleet, "BATCH_CLOSE_SECONDS", 0.2)
    looks = looks_counted(monkeypatch)
    migrate_fleet.Command()._follow(ended_batch)
    assert len(looks) > 1
    ended_batch.refresh_from_db()
    assert ended_batch.state == BatchState.RUNNING


@pytest.mark.parametrize("state", [BatchState.CANCELLED, BatchState.PAUSED])
def test_wait_does_not_wait_for_a_batch_no_drive_closes(ended_batch, monkeypatch, state):
    MigrationBatch.objects.filter(id=ended_batch.id).update(state=state)
    looks = looks_counted(monkeypatch)
    migrate_fleet.Command()._follow(ended_batch)
    assert looks == [1]
