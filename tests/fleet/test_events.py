import json
import logging
import socket
import subprocess
import sys
from datetime import UTC, datetime

import pytest
from django.db import connection
from django.utils import timezone

from fleet.models import ChargingStation, Registration, StationEvent
from fleet.services.events import events_ingest
from ocpp_gateway.envelopes import EVENT_CONSUMER_GROUP, EVENT_STREAM, Event, EventKind
from tests.fleet.conftest import T0

CONNECT, DISCONNECT, BOOT, STATUS = (
    EventKind.CONNECT,
    EventKind.DISCONNECT,
    EventKind.BOOT,
    EventKind.STATUS,
)


def at(seconds: float) -> datetime:
    return datetime.fromtimestamp(T0 + seconds, tz=UTC)


def ingest(consumer: str = "test") -> int:
    return events_ingest(consumer=consumer)


def station(identity: str = "CP-1") -> ChargingStation:
    return ChargingStation.objects.get(identity=identity)


def assert_stream_drained(redis_client) -> None:
    assert redis_client.xlen(EVENT_STREAM) == 0
    assert redis_client.xpending(EVENT_STREAM, EVENT_CONSUMER_GROUP)["pending"] == 0


def ensure_group(redis_client) -> None:
    redis_client.xgroup_create(EVENT_STREAM, EVENT_CONSUMER_GROUP, id="0", mkstream=True)


class TestIngest:
    def test_it_builds_the_inventory_from_a_boot(self, alpha, publish, make_event, redis_client):
        publish(
            make_event(CONNECT, "CP-1", at=0, address="10.0.0.7"),
            make_event(
                BOOT, "CP-1", at=1, vendor="Acme", model="AC22", serial="S-9", firmware="4.2.0"
            ),
            make_event(STATUS, "CP-1", at=2, connector_id=0),
            make_event(STATUS, "CP-1", at=2, connector_id=1, status="Charging"),
            make_event(
                STATUS, "CP-1", at=2, connector_id=2, status="Faulted", error_code="GroundFailure"
            ),
        )

        assert ingest() == 5

        cp = station()
        assert (cp.vendor, cp.model, cp.serial, cp.firmware_version) == (
            "Acme",
            "AC22",
            "S-9",
            "4.2.0",
        )
        assert cp.csms == alpha
        assert cp.connected is True
        assert cp.connection_changed_at == at(0)
        assert cp.last_boot_at == at(1)
        assert cp.last_seen_at == at(2)
        assert cp.connector_status["1"] == {
            "status": "Charging",
            "error_code": "NoError",
            "at": at(2).isoformat(),
        }
        assert cp.connector_status["2"]["error_code"] == "GroundFailure"
        registration = Registration.objects.get()
        assert (registration.station, registration.csms) == (cp, alpha)
        assert registration.state == Registration.State.ACTIVE
        assert StationEvent.objects.filter(station=cp).count() == 5
        assert_stream_drained(redis_client)

    def test_a_redelivered_event_changes_nothing(self, alpha, publish, make_event):
        events = [
            make_event(CONNECT, "CP-1", at=0),
            make_event(BOOT, "CP-1", at=1),
            make_event(DISCONNECT, "CP-1", at=5, code=1006),
        ]
        publish(*events)
        assert ingest() == 3
        before = ChargingStation.objects.values().get()

        # The gateway re-sends a batch when Redis failed halfway through its pipeline.
        publish(*events)

        assert ingest() == 0
        assert ChargingStation.objects.values().get() == before
        assert StationEvent.objects.count() == 3

    def test_it_reads_events_written_before_the_group_existed(
        self, alpha, publish, make_event, redis_client
    ):
        publish(make_event(BOOT, "CP-1"))
        assert redis_client.xinfo_groups(EVENT_STREAM) == []

        assert ingest() == 1
        assert ingest() == 0

    def test_it_does_nothing_on_an_empty_stream(self, db, redis_client):
        assert ingest() == 0
        assert ingest() == 0


class TestOrder:
    @pytest.mark.parametrize("order", ["in order", "reversed"])
    def test_the_newest_connection_event_wins(self, alpha, publish, make_event, order):
        events = [
            make_event(CONNECT, "CP-1", at=0),
            make_event(DISCONNECT, "CP-1", at=10),
            make_event(CONNECT, "CP-1", at=20),
            make_event(DISCONNECT, "CP-1", at=30),
        ]
        if order == "reversed":
            events.reverse()

        for event in events:  # one batch each: the order in which they are applied
            publish(event)
            ingest()

        cp = station()
        assert cp.connected is False
        assert cp.connection_changed_at == at(30)

    @pytest.mark.parametrize("order", ["in order", "reversed"])
    def test_an_older_event_does_not_undo_a_newer_one(self, alpha, publish, make_event, order):
        events = [make_event(DISCONNECT, "CP-1", at=0), make_event(CONNECT, "CP-1", at=5)]
        if order == "reversed":
            events.reverse()
        for event in events:
            publish(event)
            ingest()

        cp = station()
        assert cp.connected is True
        assert cp.connection_changed_at == at(5)

    @pytest.mark.parametrize("order", ["in order", "reversed"])
    def test_a_late_disconnect_from_the_csms_it_left_keeps_it_connected(
        self, alpha, beta, publish, make_event, order
    ):
        # A station reset without closing its socket: the old gateway notices only after
        # its ping timeout, when the station is already on the new CSMS.
        events = [
            make_event(CONNECT, "CP-1", "alpha", at=0),
            make_event(BOOT, "CP-1", "alpha", at=1),
            make_event(CONNECT, "CP-1", "beta", at=100),
            make_event(BOOT, "CP-1", "beta", at=101, firmware="2.0"),
            make_event(DISCONNECT, "CP-1", "alpha", at=120, code=1011),
        ]
        if order == "reversed":
            events.reverse()
        for event in events:
            publish(event)
            ingest()

        cp = station()
        assert cp.connected is True
        assert cp.connection_changed_at == at(100)
        assert cp.csms == beta
        assert cp.firmware_version == "2.0"
        assert cp.last_seen_at == at(120)

    def test_a_disconnect_on_the_current_csms_counts_even_if_the_old_one_never_said(
        self, alpha, beta, publish, make_event
    ):
        # alpha's gateway died before it could report the disconnect.
        publish(
            make_event(CONNECT, "CP-1", "alpha", at=0),
            make_event(CONNECT, "CP-1", "beta", at=100),
            make_event(DISCONNECT, "CP-1", "beta", at=200),
        )
        ingest()

        cp = station()
        assert cp.connected is False
        assert cp.connection_changed_at == at(200)

    def test_a_replaced_connection_closing_does_not_mark_it_offline(
        self, alpha, publish, make_event
    ):
        publish(
            make_event(CONNECT, "CP-1", at=0),
            make_event(CONNECT, "CP-1", at=10),
            make_event(DISCONNECT, "CP-1", at=11, replaced=True),
        )
        ingest()

        assert station().connected is True

    @pytest.mark.parametrize("order", ["in order", "reversed"])
    def test_the_newest_boot_wins(self, alpha, beta, publish, make_event, order):
        events = [
            make_event(BOOT, "CP-1", "alpha", at=0, firmware="1.0"),
            make_event(BOOT, "CP-1", "beta", at=50, firmware="1.1", serial="S-1"),
        ]
        if order == "reversed":
            events.reverse()
        for event in events:
            publish(event)
            ingest()

        cp = station()
        assert (cp.csms, cp.firmware_version, cp.serial) == (beta, "1.1", "S-1")
        assert cp.last_boot_at == at(50)
        assert set(Registration.objects.values_list("csms__name", "state")) == {
            ("alpha", "active"),
            ("beta", "active"),
        }

    def test_each_connector_keeps_its_newest_status(self, alpha, publish, make_event):
        publish(make_event(STATUS, "CP-1", at=10, connector_id=1, status="Charging"))
        ingest()
        publish(
            make_event(STATUS, "CP-1", at=5, connector_id=1, status="Available"),
            make_event(STATUS, "CP-1", at=5, connector_id=2, status="Faulted"),
        )
        ingest()

        status = station().connector_status
        assert (status["1"]["status"], status["2"]["status"]) == ("Charging", "Faulted")

    def test_consumers_splitting_a_station_apply_to_the_same_result(
        self, alpha, publish, make_event, redis_client
    ):
        publish(
            make_event(CONNECT, "CP-1", at=0),
            make_event(STATUS, "CP-1", at=2, connector_id=1, status="Preparing"),
            make_event(BOOT, "CP-1", at=1, firmware="3.1"),
        )
        ensure_group(redis_client)
        # Worker A takes the connect and the status, worker B the boot; B commits first.
        redis_client.xreadgroup(EVENT_CONSUMER_GROUP, "A", {EVENT_STREAM: ">"}, count=2)

        assert ingest("B") == 1
        assert station().firmware_version == "3.1"
        assert ingest("A") == 2

        cp = station()
        assert (cp.connected, cp.firmware_version, cp.csms) == (True, "3.1", alpha)
        assert cp.connector_status["1"]["status"] == "Preparing"
        assert cp.last_boot_at == at(1)
        assert Registration.objects.get().state == Registration.State.ACTIVE
        assert_stream_drained(redis_client)


class TestRegistrations:
    def test_a_boot_older_than_the_removal_decision_does_not_revive_it(
        self, alpha, publish, make_event
    ):
        cp = ChargingStation.objects.create(identity="CP-1", csms=alpha)
        registration = Registration.objects.create(
            station=cp,
            csms=alpha,
            state=Registration.State.PENDING_REMOVAL,
            state_changed_at=at(100),
        )
        publish(make_event(BOOT, "CP-1", at=50))
        ingest()
        registration.refresh_from_db()
        assert registration.state == Registration.State.PENDING_REMOVAL

        # Booting there after the decision: the station is back on this CSMS.
        publish(make_event(BOOT, "CP-1", at=150))
        ingest()
        registration.refresh_from_db()
        assert registration.state == Registration.State.ACTIVE
        assert registration.state_changed_at == at(150)


class TestBootStatus:
    @pytest.mark.parametrize("status", ["Pending", "Rejected"])
    def test_a_boot_not_accepted_is_kept_as_an_event_only(
        self, alpha, beta, publish, make_event, status
    ):
        publish(make_event(BOOT, "CP-1", "alpha", at=0, serial="REAL-1", firmware="4.2.9"))
        ingest()
        before = ChargingStation.objects.values().get()

        # An impostor with the identity of CP-1 and other hardware, refused by beta.
        publish(
            make_event(
                BOOT,
                "CP-1",
                "beta",
                at=10,
                serial="FAKE-9",
                firmware="9.9",
                status=status,
                reason="serial number differs from the registered one",
            ),
            make_event(EventKind.SECURITY, "CP-1", "beta", at=11, reason="impostor"),
        )
        assert ingest() == 2

        after = ChargingStation.objects.values().get()
        # A rejection only marks its own connection as not the station's (see below).
        beta_entry = after.pop("connections").pop("beta", None)
        before.pop("connections")
        assert after == before
        assert beta_entry == ({"rejected_at": at(10).isoformat()} if status == "Rejected" else None)
        assert list(Registration.objects.values_list("csms__name", "state")) == [
            ("alpha", "active")
        ]
        kinds = StationEvent.objects.filter(csms=beta).values_list("kind", "data__status")
        assert sorted(kinds, key=str) == sorted([("boot", status), ("security", None)], key=str)

    @pytest.mark.parametrize("order", ["in order", "reversed"])
    def test_a_rejected_connection_does_not_make_the_station_look_offline(
        self, alpha, beta, publish, make_event, order
    ):
        events = [
            make_event(CONNECT, "CP-1", "alpha", at=0),
            make_event(BOOT, "CP-1", "alpha", at=1),
            # An impostor on beta: admitted by identity, rejected at its boot, closed.
            make_event(CONNECT, "CP-1", "beta", at=10),
            make_event(BOOT, "CP-1", "beta", at=11, status="Rejected", serial="FAKE"),
            make_event(DISCONNECT, "CP-1", "beta", at=12, code=1008),
        ]
        if order == "reversed":
            events.reverse()
        for event in events:
            publish(event)
            ingest()

        cp = station()
        assert (cp.connected, cp.connection_changed_at, cp.csms) == (True, at(0), alpha)

        # The station itself connecting to beta later counts again.
        publish(make_event(CONNECT, "CP-1", "beta", at=20))
        ingest()
        assert (station().connected, station().connection_changed_at) == (True, at(20))

    def test_an_accepted_boot_moves_the_station(self, alpha, beta, publish, make_event):
        publish(
            make_event(BOOT, "CP-1", "alpha", at=0, serial="S-1"),
            make_event(BOOT, "CP-1", "beta", at=10, serial="S-1", status="Accepted"),
        )
        ingest()

        cp = station()
        assert (cp.csms, cp.last_boot_at, cp.serial) == (beta, at(10), "S-1")
        assert Registration.objects.get(csms=beta).state == Registration.State.ACTIVE

    def test_a_security_event_does_not_place_a_new_station(self, alpha, publish, make_event):
        publish(make_event(EventKind.SECURITY, "CP-X", at=0, reason="not registered"))
        ingest()

        cp = station("CP-X")
        assert (cp.csms, cp.last_seen_at) == (None, None)
        assert not Registration.objects.exists()


class TestBadInput:
    def test_an_unknown_csms_is_acknowledged_and_logged(
        self, alpha, publish, make_event, redis_client, caplog
    ):
        publish(make_event(BOOT, "CP-9", "gamma"), make_event(BOOT, "CP-1", "alpha"))

        with caplog.at_level(logging.WARNING, logger="fleet.services.events"):
            assert ingest() == 1

        assert list(ChargingStation.objects.values_list("identity", flat=True)) == ["CP-1"]
        assert "'gamma'" in caplog.text
        assert_stream_drained(redis_client)

    def test_malformed_entries_are_acknowledged_and_never_block(
        self, alpha, publish, make_event, redis_client, caplog
    ):
        good = make_event(BOOT, "CP-1")
        envelope = json.loads(good.to_json())
        for raw in [
            "not json",
            "[1, 2]",
            json.dumps({**envelope, "id": "k1", "kind": "explode"}),
            json.dumps({**envelope, "id": "k2", "station": ""}),
            json.dumps({**envelope, "id": "k3", "station": "x" * 300}),
            json.dumps({**envelope, "id": "k4", "data": [1]}),
            json.dumps({**envelope, "id": "k5", "at": "yesterday"}),
            json.dumps({**envelope, "id": "k6", "at": 1e300}),
            json.dumps({**envelope, "id": "k7"}).replace(str(good.at), "NaN"),
            json.dumps({**envelope, "id": ""}),
        ]:
            redis_client.xadd(EVENT_STREAM, {"e": raw})
        redis_client.xadd(EVENT_STREAM, {"something": "else"})
        publish(good)

        with caplog.at_level(logging.WARNING, logger="fleet.services.events"):
            assert ingest() == 1

        assert station().firmware_version == "1.0"
        assert caplog.text.count("skipped") == 11
        assert_stream_drained(redis_client)

    def test_a_status_without_a_usable_connector_is_kept_as_an_event(
        self, alpha, publish, make_event
    ):
        publish(make_event(STATUS, "CP-1", connector_id="one"))

        assert ingest() == 1
        assert station().connector_status == {}
        assert StationEvent.objects.get().kind == "status"

    @pytest.mark.skipif(
        connection.vendor != "postgresql", reason="only PostgreSQL refuses NUL in JSON"
    )
    def test_an_event_the_database_refuses_costs_only_itself(
        self, alpha, publish, make_event, redis_client, caplog
    ):
        publish(
            make_event(CONNECT, "CP-1", at=0),
            make_event(STATUS, "CP-1", at=1, info="nul \x00 here"),
            make_event(BOOT, "CP-1", at=2),
        )

        with caplog.at_level(logging.ERROR, logger="fleet.services.events"):
            assert ingest() == 2

        assert station().last_boot_at == at(2)
        assert "cannot be stored" in caplog.text
        assert_stream_drained(redis_client)


class TestRecovery:
    def test_it_reclaims_what_a_dead_consumer_left_pending(
        self, alpha, publish, make_event, redis_client
    ):
        ensure_group(redis_client)
        [entry] = publish(make_event(BOOT, "CP-1"))
        redis_client.xreadgroup(EVENT_CONSUMER_GROUP, "dead", {EVENT_STREAM: ">"})
        # Age the delivery instead of waiting: as if "dead" took it two minutes ago.
        redis_client.xclaim(EVENT_STREAM, EVENT_CONSUMER_GROUP, "dead", 0, [entry], idle=120_000)

        assert ingest("alive") == 1
        assert station().firmware_version == "1.0"
        assert_stream_drained(redis_client)

    def test_it_leaves_a_live_consumers_entries_alone(
        self, alpha, publish, make_event, redis_client
    ):
        ensure_group(redis_client)
        publish(make_event(BOOT, "CP-1"))
        redis_client.xreadgroup(EVENT_CONSUMER_GROUP, "busy", {EVENT_STREAM: ">"})

        assert ingest("other") == 0
        assert not ChargingStation.objects.exists()
        [pending] = redis_client.xpending_range(EVENT_STREAM, EVENT_CONSUMER_GROUP, "-", "+", 10)
        assert pending["consumer"] == b"busy"

    def test_it_finishes_its_own_unacknowledged_batch_first(
        self, alpha, publish, make_event, redis_client
    ):
        ensure_group(redis_client)
        publish(make_event(BOOT, "CP-1"))
        # Same consumer name (host:pid) as a run that died between its read and its commit.
        redis_client.xreadgroup(EVENT_CONSUMER_GROUP, "me", {EVENT_STREAM: ">"})

        assert ingest("me") == 1
        assert_stream_drained(redis_client)

    def test_it_forgets_consumers_of_dead_local_processes(self, db, redis_client):
        ensure_group(redis_client)
        finished = subprocess.Popen([sys.executable, "-c", "pass"])
        finished.wait()
        dead = f"{socket.gethostname()}:{finished.pid}"
        remote = "elsewhere:1"
        for name in (dead, remote):
            redis_client.xgroup_createconsumer(EVENT_STREAM, EVENT_CONSUMER_GROUP, name)

        ingest("me")

        names = {
            info["name"].decode()
            for info in redis_client.xinfo_consumers(EVENT_STREAM, EVENT_CONSUMER_GROUP)
        }
        assert dead not in names
        assert remote in names


def test_a_thousand_stations_booting_at_once(alpha, publish, make_event, redis_client):
    events = []
    for n in range(1000):
        identity = f"CP-{n:04d}"
        events += [
            make_event(CONNECT, identity, at=0),
            make_event(BOOT, identity, at=0.1, firmware=f"1.{n % 3}"),
            make_event(STATUS, identity, at=0.2, connector_id=0),
            make_event(STATUS, identity, at=0.2, connector_id=1),
            make_event(STATUS, identity, at=0.2, connector_id=2),
        ]
    pipe = redis_client.pipeline(transaction=False)
    for event in events:
        pipe.xadd(EVENT_STREAM, {"e": event.to_json()})
    pipe.execute()

    assert ingest() == 5000

    assert ChargingStation.objects.filter(connected=True, csms=alpha).count() == 1000
    assert Registration.objects.filter(state="active").count() == 1000
    assert ChargingStation.objects.filter(firmware_version="1.2").count() == 333
    assert StationEvent.objects.count() == 5000
    assert_stream_drained(redis_client)


def test_events_are_stored_with_their_envelope_id(alpha, publish, make_event):
    event: Event = make_event(BOOT, "CP-1", firmware="9.9")
    publish(event)
    ingest()

    stored = StationEvent.objects.get()
    assert stored.event_id == event.id
    assert (stored.kind, stored.csms, stored.at) == ("boot", alpha, at(0))
    assert stored.data["firmware"] == "9.9"
    assert stored.received_at <= timezone.now()
