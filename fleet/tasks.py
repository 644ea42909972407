from __future__ import annotations

from celery import shared_task
from django.db import OperationalError
from redis import RedisError

from fleet.services.events import events_consumer_name, events_ingest
from fleet.services.registry import registry_publish
from ocpp_gateway.envelopes import INGEST_EVENTS_TASK, PUBLISH_REGISTRY_TASK


# Nudged by the gateways (debounced) with no arguments; one run drains the whole stream, so
# a result per nudge is noise. Unacknowledged entries stay pending in Redis: a failed run
# loses nothing, and a short retry re-drives it if no new nudge comes.
@shared_task(
    name=INGEST_EVENTS_TASK,
    ignore_result=True,
    autoretry_for=(RedisError, OperationalError),
    retry_backoff=True,
    retry_backoff_max=30,
    max_retries=5,
)
def ingest_events() -> int:
    return events_ingest(consumer=events_consumer_name())


# Sent by a gateway that finds the registry of its CSMS missing in Redis (a data loss).
@shared_task(
    name=PUBLISH_REGISTRY_TASK,
    ignore_result=True,
    autoretry_for=(RedisError, OperationalError),
    retry_backoff=True,
    retry_backoff_max=30,
    max_retries=5,
)
def publish_registry(csms: str) -> bool:
    return registry_publish(name=csms)
