from devstack.processes import wait_until
from fleet import celery_app
from fleet.models import ChargingStation, CsmsBackend, Registration
from ocpp_gateway.envelopes import (
    EVENT_CONSUMER_GROUP,
    EVENT_STREAM,
    INGEST_EVENTS_TASK,
    Event,
    EventKind,
)


def test_a_real_worker_ingests_a_boot(celery_worker, redis_client, redis_url):
    CsmsBackend.objects.create(name="alpha", url="wss://alpha.example.com/ocpp")
    boot = Event(
        kind=EventKind.BOOT,
        station="CP-42",
        csms="alpha",
        at=1_700_000_000.0,
        data={"vendor": "Acme", "model": "AC22", "serial": "S-42", "firmware": "5.1.0"},
    )
    redis_client.xadd(EVENT_STREAM, {"e": boot.to_json()})

    # The project's app, on this test's private Redis rather than the configured broker.
    with celery_app.connection_for_write(redis_url) as broker:
        celery_app.send_task(INGEST_EVENTS_TASK, connection=broker)

    station = wait_until(
        lambda: ChargingStation.objects.filter(identity="CP-42").first(),
        30,
        "the worker to add CP-42 to the inventory",
    )
    assert (station.vendor, station.model, station.firmware_version) == ("Acme", "AC22", "5.1.0")
    assert station.csms.name == "alpha"
    assert Registration.objects.get(station=station).state == Registration.State.ACTIVE
    wait_until(
        lambda: (
            redis_client.xpending(EVENT_STREAM, EVENT_CONSUMER_GROUP)["pending"] == 0
            and redis_client.xlen(EVENT_STREAM) == 0
        ),
        10,
        "the worker to acknowledge the entry",
    )


def test_a_retried_task_that_ignores_its_result_closes_its_retry_row_on_success(db):
    """Retries are stored even for a task that ignores its result; its success must
    replace the RETRY row, or the row says the task was lost mid-retry."""
    from django_celery_results.models import TaskResult

    from fleet.celery import close_retried_result
    from fleet.tasks import ingest_events

    retried, first_try = "retried-task-id", "first-try-task-id"
    for task_id in (retried, first_try):
        TaskResult.objects.create(task_id=task_id, task_name=ingest_events.name, status="RETRY")
    for task_id, retries in ((retried, 2), (first_try, 0)):
        ingest_events.push_request(id=task_id, retries=retries, task=ingest_events.name)
        try:
            close_retried_result(sender=ingest_events, result=3)
        finally:
            ingest_events.pop_request()

    assert TaskResult.objects.get(task_id=retried).status == "SUCCESS"
    # Not retried: its success is not stored (its row here stands for none at all).
    assert TaskResult.objects.get(task_id=first_try).status == "RETRY"
