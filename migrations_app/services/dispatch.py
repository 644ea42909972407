"""Enqueueing a state's step task (workflow.STEP_TASKS) after the current transaction commits.

Tasks are sent by name so that services never import the task module (tasks call services).
"""

from __future__ import annotations

import logging
import time

from django.db import transaction
from redis import RedisError

from fleet.celery import app
from fleet.redis import get_redis
from migrations_app.services.workflow import STEP_TASKS

logger = logging.getLogger(__name__)

DRIVE_BATCH_TASK = "migrations.drive_batch"
# A countdown held by a worker is redelivered by Redis after the visibility timeout (1 h)
# and would then run twice: a scheduled drive never waits longer than this.
MAX_DRIVE_COUNTDOWN = 30.0


def enqueue_step(migration_id: int, station: str, state: str, countdown: float = 0) -> None:
    """Run the step of `state` for this migration once the current transaction commits."""
    name = STEP_TASKS[state]
    transaction.on_commit(
        lambda: app.send_task(name, args=[migration_id, station, state], countdown=countdown)
    )


def enqueue_drive(batch_id: int) -> None:
    transaction.on_commit(lambda: app.send_task(DRIVE_BATCH_TASK, args=[batch_id]))


def drive_key(batch_id: int) -> str:
    return f"engine:drive:{batch_id}"


def schedule_drive(batch_id: int, countdown: float) -> bool:
    """Drive the batch again in `countdown` seconds, unless a drive is already due by then.

    One scheduled drive per batch, whatever the number of stations and workers: the due
    time is kept in Redis, and only an earlier due time sends another. Returns whether it
    sent one.
    """
    countdown = max(0.0, min(countdown, MAX_DRIVE_COUNTDOWN))
    due = time.time() + countdown
    key = drive_key(batch_id)
    client = get_redis()
    try:
        # The key outlives its due time a little: a drive lost with its worker is
        # forgotten soon and the next caller schedules a new one.
        ttl = int(countdown) + 10
        if not client.set(key, due, nx=True, ex=ttl):
            current = float(client.get(key) or 0)
            if current <= due + 0.5:
                return False
            client.set(key, due, ex=ttl)
    except RedisError as exc:
        # Without the de-duplication a drive may run twice (harmless); without the drive a
        # batch with no beat would never move again. A broker that is down makes send_task
        # raise, and the task that asked retries.
        logger.warning("batch %s: drive scheduled without de-duplication (%s)", batch_id, exc)
    app.send_task(
        DRIVE_BATCH_TASK, args=[batch_id], kwargs={"scheduled": True}, countdown=countdown
    )
    return True


def drive_ran(batch_id: int) -> None:
    """A scheduled drive is running: the next one may be scheduled."""
    try:
        get_redis().delete(drive_key(batch_id))
    except RedisError:
        logger.warning("could not clear batch %s's drive schedule", batch_id, exc_info=True)
