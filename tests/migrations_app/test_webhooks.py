"""Webhook notifications: signed JSON to a real HTTP receiver on 127.0.0.1, delivered by
real workers with retries and backoff, each delivery recorded."""

from __future__ import annotations

import hashlib
import hmac
import io
import json
from datetime import timedelta

import pytest
from django.core.management import CommandError, call_command
from django.test import override_settings
from django.utils import timezone

from devstack.processes import wait_until
from fleet.models import ChargingStation, CsmsBackend
from migrations_app.models import BatchWebhook, MigrationBatch, WebhookDelivery
from migrations_app.services import notifications
from migrations_app.services.notifications import Event
from ocpp_gateway.simulator.spec import Behaviour
from tests.migrations_app.conftest import migrate
from tests.webhook_receiver import WebhookReceiver

SECRET = "hook-secret"
Status = WebhookDelivery.Status


def verified_bodies(receiver: WebhookReceiver) -> list[dict]:
    """The accepted bodies, each checked against its signature header."""
    bodies = []
    for request in receiver.accepted:
        expected = "sha256=" + hmac.new(SECRET.encode(), request.body, hashlib.sha256).hexdigest()
        assert request.headers["X-Csms-Migrate-Signature"] == expected
        assert request.headers["Content-Type"] == "application/json"
        body = json.loads(request.body)
        assert request.headers["X-Csms-Migrate-Event"] == body["event"]
        bodies.append(body)
    return bodies


def test_a_batch_notifies_its_webhook_through_a_receiver_that_fails_twice(stack):
    specs = [
        stack.station("CP-W1"),
        stack.station("CP-W2"),
        stack.station("CP-W3", behaviour=Behaviour(reject_url_writes=True)),
    ]
    with WebhookReceiver.start(fail_first=2) as receiver, stack.fleet(specs):
        code, report = migrate(
            "--to", "csms-2", "--from", "csms-1", "--rate-per-minute", "0", "--canary", "1",
            "--no-brake", "--webhook", receiver.url, "--webhook-secret", SECRET,
            "--webhook-failures",
        )  # fmt: skip
        assert code == 1
        batch = MigrationBatch.objects.get(id=report["batch"])
        deliveries = WebhookDelivery.objects.filter(webhook__batch=batch)
        undelivered = deliveries.exclude(status=Status.DELIVERED)
        wait_until(
            lambda: deliveries.exists() and not undelivered.exists(),
            30,
            "every webhook delivery to be delivered",
        )
    bodies = verified_bodies(receiver)
    events = sorted(body["event"] for body in bodies)
    assert events == sorted(
        ["batch.started", "batch.canary_passed", "station.failed", "batch.finished"]
    )
    # Two refused attempts, each tried again after a backoff: nothing lost, none twice.
    assert len(receiver.received) == len(bodies) + 2
    assert sum(deliveries.values_list("attempts", flat=True)) == len(bodies) + 2
    assert len({body["id"] for body in bodies}) == len(bodies)
    by_event = {body["event"]: body for body in bodies}
    finished = by_event["batch.finished"]
    assert finished["schema"] == 1
    assert finished["batch"]["counts"] == {"done": 2, "failed": 1}
    assert finished["text"].startswith(f"csms-migrate: Batch {batch.id} to csms-2 finished")
    failed = by_event["station.failed"]["station"]
    assert (failed["identity"], failed["step"], failed["kind"]) == (
        "CP-W3",
        "setting_url",
        "rejected",
    )


@pytest.fixture
def one_batch(db, settings) -> MigrationBatch:
    target = CsmsBackend.objects.create(name="csms-2", url="ws://csms-2.example.com/ocpp")
    return MigrationBatch.objects.create(target=target)


def record(batch: MigrationBatch, url: str, secret: str = SECRET) -> WebhookDelivery:
    notifications.webhooks_add(batch, [url], secret=secret)
    notifications.notify(batch, Event.PAUSED, reason="for the night", by=None)
    return WebhookDelivery.objects.get()


@pytest.mark.usefixtures("redis_client")
@override_settings(MIGRATION_WEBHOOK_MAX_ATTEMPTS=3, MIGRATION_WEBHOOK_RETRY_SECONDS=60)
def test_a_delivery_is_tried_with_backoff_then_given_up_with_its_last_answer(one_batch):
    with WebhookReceiver.start(fail_first=99, error_status=503) as receiver:
        delivery = record(one_batch, receiver.url)
        notifications.deliver(delivery.id)
        delivery.refresh_from_db()
        assert (delivery.status, delivery.attempts, delivery.last_status_code) == (
            Status.PENDING,
            1,
            503,
        )
        assert delivery.next_attempt_at > timezone.now() + timedelta(seconds=55)
        notifications.deliver(delivery.id)  # not due yet: no second POST
        assert len(receiver.received) == 1
        for attempt in (2, 3):
            WebhookDelivery.objects.filter(id=delivery.id).update(next_attempt_at=timezone.now())
            notifications.deliver(delivery.id)
            delivery.refresh_from_db()
            assert delivery.attempts == attempt
    assert delivery.status == Status.FAILED
    assert delivery.last_error.startswith("HTTP 503")
    assert len(receiver.received) == 3


@pytest.mark.usefixtures("redis_client")
def test_an_unreachable_receiver_is_a_recorded_failed_attempt(one_batch):
    with WebhookReceiver.start() as receiver:
        url = receiver.url
    delivery = record(one_batch, url)  # the receiver is gone: connection refused
    notifications.deliver(delivery.id)
    delivery.refresh_from_db()
    assert delivery.status == Status.PENDING and delivery.attempts == 1
    assert delivery.last_status_code is None
    assert "Connection refused" in delivery.last_error or "URLError" in delivery.last_error


@pytest.mark.usefixtures("redis_client")
def test_an_unsigned_webhook_gets_the_slack_text(one_batch):
    with WebhookReceiver.start() as receiver:
        delivery = record(one_batch, receiver.url, secret="")
        notifications.deliver(delivery.id)
    (request,) = receiver.accepted
    assert "X-Csms-Migrate-Signature" not in request.headers
    body = json.loads(request.body)
    assert body["text"] == f"csms-migrate: Batch {one_batch.id} to csms-2 was paused: for the night"
    assert (body["event"], body["reason"], body["by"]) == ("batch.paused", "for the night", None)


@pytest.mark.usefixtures("redis_client")
def test_the_sweep_sends_again_a_delivery_whose_task_was_lost(one_batch):
    with WebhookReceiver.start() as receiver:
        delivery = record(one_batch, receiver.url)
    assert notifications.deliveries_sweep() == 0  # just recorded: its task is on its way
    WebhookDelivery.objects.filter(id=delivery.id).update(
        next_attempt_at=timezone.now() - timedelta(minutes=1)
    )
    assert notifications.deliveries_sweep() == 1


@pytest.mark.usefixtures("redis_client")
@override_settings(
    MIGRATION_WEBHOOK_URL="https://hooks.example.com/default",
    MIGRATION_WEBHOOK_SECRET="s",
    MIGRATION_WEBHOOK_STATION_FAILURES=True,
)
def test_the_settings_default_webhook_joins_every_new_batch(one_batch):
    station = ChargingStation.objects.create(identity="CP-1", csms=one_batch.target)
    out = io.StringIO()
    call_command(
        "migrate_fleet", "--to", "csms-2", "--station", station.identity,
        "--webhook", "https://hooks.example.com/ops", stdout=out, stderr=io.StringIO(),
    )  # fmt: skip
    batch = MigrationBatch.objects.latest("id")
    rows = list(batch.webhooks.values_list("url", "from_settings", "station_failures"))
    assert rows == [
        ("https://hooks.example.com/ops", False, False),
        ("https://hooks.example.com/default", True, True),
    ]
    started = WebhookDelivery.objects.filter(webhook__batch=batch, event="batch.started")
    assert started.count() == 2


@pytest.mark.parametrize("url", ["ftp://hooks.example.com/x", "https://hooks.example.com/a b"])
def test_a_bad_webhook_url_is_refused_and_creates_nothing(one_batch, url):
    ChargingStation.objects.create(identity="CP-1", csms=one_batch.target)
    with pytest.raises(CommandError, match="webhook URL") as refused:
        call_command("migrate_fleet", "--to", "csms-2", "--station", "CP-1", "--webhook", url)
    assert refused.value.returncode == 2
    assert MigrationBatch.objects.count() == 1  # only the fixture's
    assert not BatchWebhook.objects.exists()


@pytest.mark.usefixtures("redis_client")
def test_the_admin_form_adds_a_webhook_and_the_batch_page_lists_its_deliveries(
    one_batch, admin_client
):
    station = ChargingStation.objects.create(identity="CP-1", csms=one_batch.target)
    form = {
        "action": "migrate_to_another_csms",
        "_selected_action": [station.pk],
        "_migrate": "1",
        "_confirm": "1",
        "target": one_batch.target.pk,
        "max_in_flight": 5,
        "rate_per_minute": 0,
        "canary_size": 0,
        "brake_min_sample": 10,
        "boot_timeout_seconds": 60,
        "idle_wait_seconds": 60,
        "offline_wait_seconds": 0,
        "webhook_url": "https://user:pw@hooks.example.com/ops",
        "webhook_secret": SECRET,
    }
    assert admin_client.post("/admin/fleet/chargingstation/", form).status_code == 302
    batch = MigrationBatch.objects.latest("id")
    assert list(batch.webhooks.values_list("secret", flat=True)) == [SECRET]
    page = admin_client.get(f"/admin/migrations_app/migrationbatch/{batch.id}/change/")
    text = page.content.decode()
    assert 'id="mig-deliveries"' in text and "batch.started" in text
    assert "hooks.example.com/ops" in text and "user:pw" not in text

    bad = admin_client.post(
        "/admin/fleet/chargingstation/", {**form, "webhook_url": "hooks.example.com"}
    )
    assert "must be an http:// or https:// URL" in bad.content.decode()
