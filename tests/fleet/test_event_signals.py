"""The inventory tells other apps what a batch of events changed, once it is committed."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from fleet.models import ChargingStation
from fleet.services.events import events_ingest
from fleet.signals import station_events_applied
from ocpp_gateway.envelopes import EventKind


@pytest.fixture
def received() -> Iterator[list[dict]]:
    calls: list[dict] = []

    def receiver(sender, **kwargs) -> None:
        calls.append(kwargs)

    station_events_applied.connect(receiver)
    yield calls
    station_events_applied.disconnect(receiver)


def pk(identity: str) -> int:
    return ChargingStation.objects.get(identity=identity).pk


def test_one_signal_per_batch_after_commit_with_boots_and_changed_statuses(
    alpha, publish, make_event, received, django_capture_on_commit_callbacks
):
    publish(
        make_event(EventKind.CONNECT, "CP-1", at=0),
        make_event(EventKind.BOOT, "CP-1", at=1),
        # Rejected: the inventory keeps it as an event only, and it is a boot all the same.
        make_event(EventKind.BOOT, "CP-2", at=1, status="Rejected"),
        make_event(EventKind.STATUS, "CP-3", at=2, connector_id=1, status="Charging"),
        make_event(EventKind.STATUS, "CP-3", at=3, connector_id=2, status="Available"),
        make_event(EventKind.CONNECT, "CP-4", at=2),
    )
    with django_capture_on_commit_callbacks() as callbacks:
        events_ingest(consumer="test")
        assert received == []  # not before the batch is committed
    for callback in callbacks:
        callback()

    assert len(received) == 1
    assert received[0]["booted"] == {pk("CP-1"), pk("CP-2")}
    connectors = received[0]["connectors"]
    assert set(connectors) == {pk("CP-3")}
    assert {key: value["status"] for key, value in connectors[pk("CP-3")].items()} == {
        "1": "Charging",
        "2": "Available",
    }


def test_nothing_is_sent_for_events_already_applied_or_without_a_boot_or_status(
    alpha, publish, make_event, received, django_capture_on_commit_callbacks
):
    boot = make_event(EventKind.BOOT, "CP-1", at=1)
    publish(boot)
    with django_capture_on_commit_callbacks(execute=True):
        events_ingest(consumer="test")
    publish(
        boot,  # re-delivered
        make_event(EventKind.CONNECT, "CP-1", at=2),
        # Older than what the inventory holds for the connector: no change.
        make_event(EventKind.STATUS, "CP-1", at=5, connector_id=1, status="Charging"),
    )
    with django_capture_on_commit_callbacks(execute=True):
        events_ingest(consumer="test")
    publish(make_event(EventKind.STATUS, "CP-1", at=4, connector_id=1, status="Available"))
    with django_capture_on_commit_callbacks(execute=True):
        events_ingest(consumer="test")

    assert [call["booted"] for call in received] == [{pk("CP-1")}, frozenset()]
    assert received[1]["connectors"][pk("CP-1")]["1"]["status"] == "Charging"


def test_a_receiver_that_raises_costs_the_ingestion_nothing(
    alpha, publish, make_event, received, django_capture_on_commit_callbacks, caplog
):
    def broken(sender, **kwargs) -> None:
        raise RuntimeError("receiver bug")

    station_events_applied.connect(broken)
    try:
        publish(make_event(EventKind.BOOT, "CP-1", at=1))
        with django_capture_on_commit_callbacks(execute=True):
            assert events_ingest(consumer="test") == 1
    finally:
        station_events_applied.disconnect(broken)
    assert len(received) == 1
    assert "receiver bug" in caplog.text
