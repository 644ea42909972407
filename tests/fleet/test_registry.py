"""Publishing the admitted set of each CSMS to Redis, as the gateways read it."""

import json
import logging
import threading

import pytest
from django.db import connection, transaction

from devstack.processes import wait_until
from fleet import celery_app
from fleet.models import ChargingStation, CsmsBackend, Registration
from fleet.services.events import events_ingest
from fleet.services.inventory import (
    csms_backend_upsert,
    registration_mark_removed,
    station_move_to_csms,
)
from fleet.services.registry import registry_publish, registry_republish_missing
from ocpp_gateway.envelopes import (
    PUBLISH_REGISTRY_TASK,
    EventKind,
    password_digest,
    registry_key,
    registry_meta_key,
)

State = Registration.State


def registry(redis_client, csms: str = "alpha") -> dict[str, dict]:
    return {
        key.decode(): json.loads(value)
        for key, value in redis_client.hgetall(registry_key(csms)).items()
    }


def meta(redis_client, csms: str = "alpha") -> dict[str, str]:
    raw = redis_client.hgetall(registry_meta_key(csms))
    return {key.decode(): value.decode() for key, value in raw.items()}


def register(csms: CsmsBackend, identity: str, state=State.ACTIVE, **fields) -> Registration:
    station, _ = ChargingStation.objects.get_or_create(identity=identity)
    return Registration.objects.create(station=station, csms=csms, state=state, **fields)


class TestPublish:
    def test_it_publishes_the_admitted_set_with_its_meta(self, alpha, beta, redis_client):
        digest = password_digest("s3cret")
        register(alpha, "CP-1", serial_number="SN-1", password_sha256=digest)
        register(alpha, "CP-2", State.PENDING_REMOVAL)
        register(alpha, "CP-3", State.REMOVED)
        register(beta, "CP-4")

        assert registry_publish(name="alpha") is True

        assert registry(redis_client) == {
            "CP-1": {"serial": "SN-1", "password_sha256": digest},
            "CP-2": {"serial": "", "password_sha256": ""},
        }
        first = meta(redis_client)
        assert (first["version"], first["open"]) == ("1", "0")
        assert float(first["published_at"]) > 0
        assert not redis_client.exists(registry_key("beta"))

        CsmsBackend.objects.filter(pk=alpha.pk).update(open_admission=True)
        registry_publish(name="alpha")
        assert (meta(redis_client)["version"], meta(redis_client)["open"]) == ("2", "1")

    def test_an_empty_set_deletes_the_registry_but_keeps_the_meta(self, alpha, redis_client):
        registration = register(alpha, "CP-1")
        registry_publish(name="alpha")
        registration.delete()

        registry_publish(name="alpha")

        assert not redis_client.exists(registry_key("alpha"))
        assert meta(redis_client)["version"] == "2"
        leftovers = {key.decode() for key in redis_client.keys("ocpp:registry:*")}
        # The meta hash and the publishers' own bookkeeping next to it; no temporary key.
        assert {key for key in leftovers if not key.startswith(registry_meta_key("alpha"))} == set()

    def test_an_unknown_csms_is_logged_and_nothing_written(self, db, redis_client, caplog):
        with caplog.at_level(logging.WARNING, logger="fleet.services.registry"):
            assert registry_publish(name="nowhere") is False

        assert "'nowhere'" in caplog.text
        assert redis_client.keys("*") == []

    @pytest.mark.django_db(transaction=True)
    def test_concurrent_publishers_leave_the_newest_set(self, redis_client):
        alpha = CsmsBackend.objects.create(name="alpha", url="ws://alpha.example.com/ocpp")
        errors: list[BaseException] = []

        def change(i: int) -> None:
            try:
                register(alpha, f"CP-{i}")
                registry_publish(name="alpha")
            except BaseException as exc:  # reported by the test
                errors.append(exc)
            finally:
                connection.close()

        threads = [threading.Thread(target=change, args=(i,)) for i in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)

        assert errors == []
        assert set(registry(redis_client)) == {f"CP-{i}" for i in range(12)}
        # Coalesced: some publishers left it to the one holding the lock.
        assert 1 <= int(meta(redis_client)["version"]) <= 12


class TestOnCommit:
    def test_every_change_of_a_transaction_publishes_once_after_commit(
        self, alpha, redis_client, django_capture_on_commit_callbacks
    ):
        with (
            django_capture_on_commit_callbacks(execute=True) as callbacks,
            transaction.atomic(),
        ):
            csms_backend_upsert(name="alpha", url="ws://alpha.example.com/ocpp")
            for i in range(3):
                pending = register(alpha, f"CP-{i}", State.PENDING_REMOVAL)
                registration_mark_removed(registration_id=pending.pk)
            assert not redis_client.exists(registry_meta_key("alpha"))

        assert len(callbacks) == 1
        assert meta(redis_client)["version"] == "1"

    def test_add_csms_open_publishes_the_flag(
        self, db, redis_client, django_capture_on_commit_callbacks
    ):
        with django_capture_on_commit_callbacks(execute=True):
            csms_backend_upsert(name="lab", url="ws://lab.example.com/ocpp", open_admission=True)
        assert meta(redis_client, "lab")["open"] == "1"

        with django_capture_on_commit_callbacks(execute=True):
            csms_backend_upsert(name="lab", url="ws://lab.example.com/ocpp")
        assert meta(redis_client, "lab")["open"] == "0"
        assert meta(redis_client, "lab")["version"] == "2"

    def test_a_migration_publishes_only_a_set_that_changed(
        self, alpha, beta, redis_client, django_capture_on_commit_callbacks
    ):
        station = register(alpha, "CP-1").station
        register(beta, "CP-1")

        with django_capture_on_commit_callbacks(execute=True) as callbacks:
            station_move_to_csms(station_id=station.pk, source_id=alpha.pk, target_id=beta.pk)
        # Active -> pending removal on alpha, active on beta: both admitted as before.
        assert callbacks == []

        other = ChargingStation.objects.create(identity="CP-2", csms=alpha)
        with django_capture_on_commit_callbacks(execute=True):
            station_move_to_csms(station_id=other.pk, source_id=alpha.pk, target_id=beta.pk)
        # Onto an open target it was not registered on: beta's set grew, and so did
        # alpha's (an account to remove there, unknown to the inventory until now).
        assert set(registry(redis_client, "beta")) == {"CP-1", "CP-2"}
        assert set(registry(redis_client, "alpha")) == {"CP-1", "CP-2"}

    def test_a_migration_back_onto_a_removed_registration_revives_and_publishes_it(
        self, alpha, beta, redis_client, django_capture_on_commit_callbacks
    ):
        station = register(alpha, "CP-1").station
        register(beta, "CP-1", State.REMOVED)

        with django_capture_on_commit_callbacks(execute=True) as callbacks:
            station_move_to_csms(station_id=station.pk, source_id=alpha.pk, target_id=beta.pk)

        assert len(callbacks) == 1  # beta's admitted set grew; alpha's did not change
        assert set(registry(redis_client, "beta")) == {"CP-1"}
        states = dict(station.registrations.values_list("csms__name", "state"))
        assert states == {"alpha": State.PENDING_REMOVAL, "beta": State.ACTIVE}
        station.refresh_from_db()
        assert station.csms_id == beta.pk

    def test_ingestion_publishes_a_registration_it_creates(
        self, alpha, publish, make_event, redis_client, django_capture_on_commit_callbacks
    ):
        with django_capture_on_commit_callbacks(execute=True):
            publish(make_event(EventKind.BOOT, "CP-1"))
            events_ingest(consumer="test")

        assert set(registry(redis_client)) == {"CP-1"}

    def test_ingestion_republishes_a_registry_lost_with_redis(
        self, alpha, beta, publish, make_event, redis_client
    ):
        register(alpha, "CP-1")
        register(beta, "CP-2")
        registry_publish(name="beta")
        publish(
            make_event(EventKind.STATUS, "CP-1", "alpha"),
            make_event(EventKind.STATUS, "CP-2", "beta"),
            make_event(EventKind.STATUS, "CP-3", "gamma"),
        )

        events_ingest(consumer="test")

        assert set(registry(redis_client, "alpha")) == {"CP-1"}
        assert meta(redis_client, "beta")["version"] == "1"  # it was there: left alone
        assert registry_republish_missing(["alpha", "beta", "gamma"]) == []


def test_a_real_worker_publishes_on_a_gateways_request(celery_worker, redis_client, redis_url):
    alpha = CsmsBackend.objects.create(name="alpha", url="ws://alpha.example.com/ocpp")
    register(alpha, "CP-1", serial_number="SN-1")

    with celery_app.connection_for_write(redis_url) as broker:
        celery_app.send_task(PUBLISH_REGISTRY_TASK, args=["nowhere"], connection=broker)
        celery_app.send_task(PUBLISH_REGISTRY_TASK, args=["alpha"], connection=broker)

    wait_until(
        lambda: redis_client.exists(registry_meta_key("alpha")),
        30,
        "the worker to publish the registry of alpha",
    )
    assert registry(redis_client) == {"CP-1": {"serial": "SN-1", "password_sha256": ""}}
    wait_until(
        lambda: b"no CSMS named 'nowhere'" in celery_worker.read_bytes(),
        10,
        "the worker to log the unknown CSMS",
    )
    assert not redis_client.exists(registry_meta_key("nowhere"))
