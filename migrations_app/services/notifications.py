"""Webhook notifications of a batch: what happened, as signed JSON, delivered with retries.

``notify`` records one WebhookDelivery per webhook of the batch, in the caller's
transaction (so a notification exists exactly when what it tells committed), and sends the
delivery task after commit: a step never waits for a receiver. Each delivery is one
attempt per task; a failed attempt schedules the next with exponential backoff, and the
beat's tick re-sends a pending delivery whose task was lost, so none is forgotten. An
attempt is claimed by a conditional update: two tasks for one delivery post it once.

The body (schema 1) is stable: ``schema``, ``event``, ``id`` (the event's, the same in
every attempt and for every webhook: de-duplicate on it), ``at`` (ISO 8601 UTC),
``batch`` (id, target, state, dry_run, counts by state), ``reason``, ``by`` (the user, or
null for the workers), ``station`` (station.failed only: identity, step, kind, reason)
and ``text``, a one-line summary, so that a Slack incoming webhook URL works as it is.
With a secret, ``X-Csms-Migrate-Signature: sha256=<hex>`` is the HMAC-SHA256 of the raw
body.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import urllib.error
import urllib.request
import uuid
from datetime import timedelta
from enum import StrEnum
from functools import partial
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from migrations_app.models import BatchWebhook, MigrationBatch, StationMigration, WebhookDelivery
from migrations_app.selectors import batch_counts
from migrations_app.services.dispatch import send_task

logger = logging.getLogger(__name__)

DELIVER_TASK = "migrations.deliver_webhook"
SCHEMA = 1
SIGNATURE_HEADER = "X-Csms-Migrate-Signature"
EVENT_HEADER = "X-Csms-Migrate-Event"
DELIVERY_HEADER = "X-Csms-Migrate-Delivery"
# One POST; a receiver slower than this counts as a failed attempt.
REQUEST_TIMEOUT_SECONDS = 10.0
# An attempt whose task died is presumed lost this long after it started.
ATTEMPT_LEASE_SECONDS = REQUEST_TIMEOUT_SECONDS + 20
# The longest wait between two attempts (a countdown held by a worker past the broker's
# visibility timeout, 1 h, would be delivered twice; the claim would drop the second).
MAX_BACKOFF_SECONDS = 900.0
# Of a response body, what the delivery keeps as its error.
ERROR_BODY_CHARS = 200

Status = WebhookDelivery.Status


class Event(StrEnum):
    STARTED = "batch.started"
    APPROVED = "batch.approved"
    CANARY_PASSED = "batch.canary_passed"
    PROMOTED = "batch.promoted"
    AUTO_PAUSED = "batch.auto_paused"
    PAUSED = "batch.paused"
    RESUMED = "batch.resumed"
    CANCELLED = "batch.cancelled"
    FINISHED = "batch.finished"
    STATION_FAILED = "station.failed"


def webhooks_add(
    batch: MigrationBatch, urls: list[str], *, secret: str = "", station_failures: bool = False
) -> None:
    """The batch's webhooks: ``urls``, and the settings' default (MIGRATION_WEBHOOK_URL)."""
    rows = [
        BatchWebhook(batch=batch, url=url, secret=secret, station_failures=station_failures)
        for url in dict.fromkeys(urls)
    ]
    if settings.MIGRATION_WEBHOOK_URL and settings.MIGRATION_WEBHOOK_URL not in urls:
        rows.append(
            BatchWebhook(
                batch=batch,
                url=settings.MIGRATION_WEBHOOK_URL,
                secret=settings.MIGRATION_WEBHOOK_SECRET,
                station_failures=settings.MIGRATION_WEBHOOK_STATION_FAILURES,
                from_settings=True,
            )
        )
    BatchWebhook.objects.bulk_create(rows)


def notify(batch: MigrationBatch, event: Event, *, reason: str = "", by: Any = None) -> None:
    """Record and (after commit) send ``event`` of the batch to each of its webhooks."""
    webhooks = list(batch.webhooks.all())
    if not webhooks:
        return
    body = _body(batch, event, reason=reason, by=by, counts=batch_counts(batch))
    _record(webhooks, event, body)


def stations_failed(migration_ids: list[int], batch_id: int | None = None) -> None:
    """Stations failed (transitions, in the move's transaction): tell the webhooks that
    want every failure. One indexed read when none does."""
    if not migration_ids:
        return
    webhooks = BatchWebhook.objects.filter(station_failures=True)
    if batch_id is not None:
        webhooks = webhooks.filter(batch_id=batch_id)
    else:
        webhooks = webhooks.filter(batch__stations__id=migration_ids[0])
    wanting = list(webhooks)
    if not wanting:
        return
    failed = StationMigration.objects.select_related("batch__target", "station").filter(
        id__in=migration_ids
    )
    for migration in failed.order_by("id"):
        station = {
            "identity": migration.station.identity,
            "step": migration.failed_step,
            "kind": migration.failure_kind,
            "reason": migration.reason,
        }
        body = _body(
            migration.batch, Event.STATION_FAILED, reason=migration.reason, station=station
        )
        _record(wanting, Event.STATION_FAILED, body)


def _body(
    batch: MigrationBatch,
    event: Event,
    *,
    reason: str = "",
    by: Any = None,
    counts: dict[str, int] | None = None,
    station: dict[str, str] | None = None,
) -> dict[str, Any]:
    user = getattr(by, "username", None) if by is not None else None
    return {
        "schema": SCHEMA,
        "event": event.value,
        "id": str(uuid.uuid4()),
        "at": timezone.now().isoformat().replace("+00:00", "Z"),
        "batch": {
            "id": batch.id,
            "target": batch.target.name,
            "state": batch.state,
            "dry_run": batch.dry_run,
            "counts": counts,
        },
        "reason": reason,
        "by": user,
        "station": station,
        "text": _text(batch, event, reason, user, counts, station),
    }


def _text(
    batch: MigrationBatch,
    event: Event,
    reason: str,
    user: str | None,
    counts: dict[str, int] | None,
    station: dict[str, str] | None,
) -> str:
    name = f"{'Dry run' if batch.dry_run else 'Batch'} {batch.id} to {batch.target.name}"
    who = f" by {user}" if user else ""
    tally = ", ".join(f"{n} {state}" for state, n in sorted((counts or {}).items()))
    because = f": {reason}" if reason else ""
    texts = {
        Event.STARTED: f"{name} started{who} ({tally})",
        Event.APPROVED: f"{name} was approved{who}",
        Event.CANARY_PASSED: f"{name}: the canary passed, "
        + (f"{reason} ({tally})" if reason else f"the rest start ({tally})"),
        Event.PROMOTED: f"{name} was promoted{who}: the rest start",
        Event.AUTO_PAUSED: f"{name} was paused by the workers{because}",
        Event.PAUSED: f"{name} was paused{who}{because}",
        Event.RESUMED: f"{name} was resumed{who}",
        Event.CANCELLED: f"{name} was cancelled{who}",
        Event.FINISHED: f"{name} finished: {tally}",
    }
    if event is Event.STATION_FAILED and station is not None:
        return f"{name}: {station['identity']} failed at {station['step']}{because}"
    return "csms-migrate: " + texts.get(event, f"{name}: {event.value}")


def _record(webhooks: list[BatchWebhook], event: Event, body: dict[str, Any]) -> None:
    deliveries = WebhookDelivery.objects.bulk_create(
        WebhookDelivery(webhook=webhook, event=event.value, payload=body) for webhook in webhooks
    )
    for delivery in deliveries:
        transaction.on_commit(partial(_send, delivery.id))


def _send(delivery_id: int, countdown: float = 0) -> None:
    try:
        send_task(DELIVER_TASK, args=[delivery_id], countdown=countdown)
    except Exception as exc:  # the broker is away: the tick's sweep sends it later
        logger.warning("webhook delivery %s not queued (%s); the sweep will", delivery_id, exc)


def deliver(delivery_id: int) -> None:
    """One attempt at the delivery, if it is pending and due; schedules the next attempt
    after a failure, until MIGRATION_WEBHOOK_MAX_ATTEMPTS."""
    now = timezone.now()
    claimed = WebhookDelivery.objects.filter(
        # A second of slack: a countdown may fire a moment before the time it was set for.
        id=delivery_id,
        status=Status.PENDING,
        next_attempt_at__lte=now + timedelta(seconds=1),
    ).update(
        attempts=F("attempts") + 1,
        next_attempt_at=now + timedelta(seconds=ATTEMPT_LEASE_SECONDS),
    )
    if not claimed:
        return  # delivered, given up, or another task holds this attempt
    delivery = WebhookDelivery.objects.select_related("webhook").get(id=delivery_id)
    status_code, error = _post(delivery)
    fields: dict[str, Any] = {"last_status_code": status_code, "last_error": error}
    if status_code is not None and 200 <= status_code < 300:
        fields.update(status=Status.DELIVERED, delivered_at=timezone.now(), last_error="")
        WebhookDelivery.objects.filter(id=delivery_id).update(**fields)
        return
    if delivery.attempts >= settings.MIGRATION_WEBHOOK_MAX_ATTEMPTS:
        fields["status"] = Status.FAILED
        logger.warning(
            "webhook %s: %s not delivered after %d attempts (%s)",
            delivery.webhook.shown_url,
            delivery.event,
            delivery.attempts,
            error,
        )
        WebhookDelivery.objects.filter(id=delivery_id).update(**fields)
        return
    backoff = min(
        settings.MIGRATION_WEBHOOK_RETRY_SECONDS * 2 ** (delivery.attempts - 1),
        MAX_BACKOFF_SECONDS,
    )
    fields["next_attempt_at"] = timezone.now() + timedelta(seconds=backoff)
    WebhookDelivery.objects.filter(id=delivery_id).update(**fields)
    _send(delivery_id, backoff)


def _post(delivery: WebhookDelivery) -> tuple[int | None, str]:
    """(HTTP status or None, what went wrong or "")."""
    body = json.dumps(delivery.payload, separators=(",", ":"), sort_keys=True).encode()
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "csms-migrate-webhook/1",
        EVENT_HEADER: delivery.event,
        DELIVERY_HEADER: str(delivery.id),
    }
    if delivery.webhook.secret:
        headers[SIGNATURE_HEADER] = signature(delivery.webhook.secret, body)
    request = urllib.request.Request(delivery.webhook.url, data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_SECONDS) as response:
            return response.status, ""
    except urllib.error.HTTPError as exc:
        text = exc.read(ERROR_BODY_CHARS).decode(errors="replace")
        return exc.code, f"HTTP {exc.code}: {text}".strip()
    except (OSError, ValueError) as exc:  # refused, timed out, no such host, a bad URL
        return None, f"{type(exc).__name__}: {exc}"


def signature(secret: str, body: bytes) -> str:
    """The signature header's value: how a receiver checks a body came from us."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def deliveries_sweep() -> int:
    """Send again the pending deliveries that are overdue (their task was lost with a
    worker or the broker); how many. The beat's tick runs it."""
    due = WebhookDelivery.objects.filter(
        status=Status.PENDING, next_attempt_at__lte=timezone.now() - timedelta(seconds=5)
    ).values_list("id", flat=True)[:500]
    ids = list(due)
    for delivery_id in ids:
        _send(delivery_id)
    return len(ids)
