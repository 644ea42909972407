"""The cached writes of the step path store what the ORM would (both databases run these)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from django.core.exceptions import ObjectDoesNotExist
from django.db import IntegrityError, connection, transaction
from django.db.models import F
from django.test.utils import CaptureQueriesContext

from fleet.models import ChargingStation, CsmsBackend, StationEvent
from fleet.rows import insert_row, select_first, select_value, update_each, update_where
from migrations_app.models import MigrationBatch, OcppExchange, StationMigration
from migrations_app.services.batches import BatchOptions, batch_create
from ocpp_gateway.envelopes import EventKind

pytestmark = pytest.mark.django_db

State = StationMigration.State


@pytest.fixture
def migration() -> StationMigration:
    target = CsmsBackend.objects.create(name="csms-2", url="ws://new/ocpp", open_admission=True)
    station = ChargingStation.objects.create(identity="CP-1")
    batch = batch_create(target=target, stations=[station], options=BatchOptions())
    return batch.stations.get()


def test_an_inserted_row_reads_back_as_the_orm_would_have_written_it(migration):
    sent_at = datetime(2026, 12, 3, 10, 0, 0, 123456, tzinfo=UTC)
    fields = {
        "step": State.READING_CONFIG,
        "action": "GetConfiguration",
        "request": {"key": ["a", "b"], "nested": {"x": None}},
        "outcome": "result",
        "response": None,  # SQL NULL, as create() stores it, not the JSON null
        "sent_at": sent_at,
        "duration_ms": 1.5,
    }
    insert_row(OcppExchange, migration_id=migration.id, **fields)
    OcppExchange.objects.create(migration=migration, **fields)

    ours, orms = OcppExchange.objects.order_by("id")
    for name in [*fields, "command_id", "csms", "sent", "error_code", "error_description"]:
        assert getattr(ours, name) == getattr(orms, name), name
    assert ours.recorded_at is not None  # the field's default
    assert OcppExchange.objects.filter(response__isnull=True).count() == 2


def test_an_unknown_field_is_refused_and_nothing_is_written(migration):
    with pytest.raises(TypeError, match="no_such_field"):
        insert_row(OcppExchange, migration_id=migration.id, no_such_field=1)
    assert not OcppExchange.objects.exists()


def test_a_conditional_update_moves_only_a_row_that_matches(migration):
    snapshot = {"NetworkConfigurationPriority": "1,2"}
    moved = update_where(
        StationMigration,
        {"id": migration.id, "state": State.PENDING},
        {"state": State.PREFLIGHT, "config_snapshot": snapshot, "wait_until": None},
    )
    again = update_where(
        StationMigration,
        {"id": migration.id, "state": State.PENDING},
        {"state": State.FAILED},
    )

    assert (moved, again) == (1, 0)
    migration.refresh_from_db()
    assert (migration.state, migration.config_snapshot) == (State.PREFLIGHT, snapshot)


def test_a_selected_value_is_converted_as_the_orm_converts_it(migration):
    status = {"1": {"status": "Charging"}, "2": None}
    ChargingStation.objects.filter(id=migration.station_id).update(connector_status=status)

    assert select_value(ChargingStation, "connector_status", migration.station_id) == status
    assert select_value(StationMigration, "state", migration.id) == State.PENDING
    with pytest.raises(ObjectDoesNotExist):
        select_value(StationMigration, "state", migration.id + 1000)


@pytest.mark.parametrize("order_by", ["-at", "at"])
def test_a_first_row_is_the_one_the_orm_finds_first_and_reads_as_it_reads(migration, order_by):
    csms = migration.batch.target
    for second, kind in [(1, EventKind.BOOT), (3, EventKind.BOOT), (2, EventKind.BOOT),
                         (4, EventKind.STATUS)]:  # fmt: skip
        StationEvent.objects.create(
            event_id=f"e{second}",
            station_id=migration.station_id,
            csms=csms,
            kind=kind,
            at=datetime(2026, 12, 3, 10, 0, second, tzinfo=UTC),
            data={"status": "Accepted", "second": second, "none": None},
        )
    where = {"station_id": migration.station_id, "csms_id": csms.id, "kind": EventKind.BOOT}
    orms = (
        StationEvent.objects.filter(**where)
        .order_by(order_by)
        .values_list("event_id", "at", "data")
        .first()
    )

    ours = select_first(StationEvent, ("event_id", "at", "data"), where, order_by=order_by)

    assert ours == orms and ours is not None
    assert ours[0] == ("e3" if order_by == "-at" else "e1")
    assert select_first(StationEvent, ("event_id",), {**where, "kind": EventKind.CONNECT}) is None
    with pytest.raises(TypeError):
        select_first(StationEvent, ("event_id",), {**where, "csms_id": None})


def test_plain_values_stored_as_they_are_read_back_as_the_orm_wrote_them(migration):
    batch = migration.batch
    values = {"brake_failure_ratio": 0.25, "canary_size": 3, "install_root_ca": True,
              "pause_reason": "operator", "state": MigrationBatch.State.PAUSED}  # fmt: skip
    update_where(MigrationBatch, {"id": batch.id}, values)
    ours = MigrationBatch.objects.values_list(*values).get(id=batch.id)
    MigrationBatch.objects.filter(id=batch.id).update(**values)
    assert ours == MigrationBatch.objects.values_list(*values).get(id=batch.id)
    assert type(ours[2]) is bool and type(ours[0]) is float

    # Not a float's or a bool's value as it is: converted by the field as the ORM does.
    update_where(MigrationBatch, {"id": batch.id}, {"brake_failure_ratio": 1, "canary_size": 2})
    assert MigrationBatch.objects.values_list("brake_failure_ratio", "canary_size").get(
        id=batch.id
    ) == (1.0, 2)


def test_a_failed_write_raises_djangos_error_and_marks_its_atomic_block(migration):
    other = ChargingStation.objects.create(identity="CP-2")
    with transaction.atomic():
        with pytest.raises(IntegrityError):  # django.db's, as the ORM would raise
            update_where(ChargingStation, {"id": other.id}, {"identity": "CP-1"})
        assert transaction.get_connection().needs_rollback
    assert ChargingStation.objects.get(id=other.id).identity == "CP-2"


def test_captured_queries_include_these_statements(migration):
    with CaptureQueriesContext(connection) as captured:
        select_value(StationMigration, "state", migration.id)
        update_where(StationMigration, {"id": migration.id}, {"reason": "x"})
    assert [query["sql"].split()[0] for query in captured] == ["SELECT", "UPDATE"]


@pytest.mark.parametrize(
    "where, values",
    [
        ({"id": 1, "state": State.PENDING}, {"state": F("reason")}),  # an expression
        ({"id": 1, "state": State.PENDING}, {"reason": CsmsBackend(name="x")}),  # an instance
        ({"id": 1, "wait_until": None}, {"state": State.FAILED}),  # = NULL never matches
    ],
)
def test_an_update_of_anything_but_plain_values_is_refused(migration, where, values):
    with pytest.raises(TypeError):
        update_where(StationMigration, where, values)
    migration.refresh_from_db()
    assert (migration.state, migration.reason) == (State.PENDING, "")


def test_each_instance_is_written_back_to_its_own_row(migration):
    ChargingStation.objects.create(identity="CP-2")
    stations = list(ChargingStation.objects.order_by("identity"))
    for index, station in enumerate(stations):
        station.vendor, station.connector_status = f"V{index}", {"1": {"status": f"S{index}"}}

    update_each(ChargingStation, ["vendor", "connector_status"], stations)

    rows = ChargingStation.objects.order_by("identity").values_list("vendor", "connector_status")
    assert list(rows) == [("V0", {"1": {"status": "S0"}}), ("V1", {"1": {"status": "S1"}})]
