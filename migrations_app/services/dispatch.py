"""Enqueueing a state's step task (workflow.STEP_TASKS) after the current transaction commits.

Tasks are sent by name so that services never import the task module (tasks call services).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from functools import partial
from typing import Any

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


# Stations in the same step travel in one task: a task costs the worker ~4 ms of its own
# (Celery's) CPU and a trip through the queue, a station's step ~1 ms of ours. Small enough
# that a group's last station does not wait long behind the others.
STEP_GROUP_SIZE = 20


def send_task(name: str, **options: Any) -> None:
    """Send one of our tasks by name. Each of them ignores its result, and the message must
    say so: a worker takes the message's ignore_result (False unless given) over the task's
    own, and would write a result row for every step (a database write on the step path)."""
    app.send_task(name, ignore_result=True, **options)


def enqueue_step(migration_id: int, station: str, state: str, countdown: float = 0) -> None:
    """Run the step of `state` for this migration once the current transaction commits."""
    enqueue_steps(state, [(migration_id, station)], countdown)


def enqueue_steps(state: str, stations: Sequence[tuple[int, str]], countdown: float = 0) -> None:
    """Run the step of `state` for these (migration id, identity) pairs after commit, in
    tasks of up to STEP_GROUP_SIZE stations.

    A task's first station is in its positional arguments and the rest in ``more``, so
    Flower shows each step task with its stations, and a task of one station is the same
    message as before groups existed.
    """
    name = STEP_TASKS[state]
    for start in range(0, len(stations), STEP_GROUP_SIZE):
        (first_id, first_station), *rest = stations[start : start + STEP_GROUP_SIZE]
        kwargs = {"more": [[migration_id, identity] for migration_id, identity in rest]}
        transaction.on_commit(
            partial(
                send_task,
                name,
                args=[first_id, first_station, state],
                kwargs=kwargs if kwargs["more"] else {},
                countdown=countdown,
            )
        )


def enqueue_drive(batch_id: int) -> None:
    transaction.on_commit(lambda: send_task(DRIVE_BATCH_TASK, args=[batch_id]))


# Stations that end together free their in-flight slots together: one drive refills them
# all (and starts them in one task), instead of one drive per station that scans the batch.
DRIVE_COALESCE_SECONDS = 0.25


# A drive known to this process as pending, per batch: its due time. A station that ends
# before then is seen by that drive, so it needs no look at Redis: in a step task whose
# stations end one after another, one look serves the group (it was a Redis round trip a
# station, a sixth of a dry run's wall time). The margin covers a worker whose clock runs
# a little ahead of this one's; a drive lost with its worker is the safety drive's to cover,
# as with the bounds in Redis.
_pending_drives: dict[int, float] = {}
_PENDING_MARGIN_SECONDS = 0.05


def drive_soon(batch_id: int) -> None:
    """A station of the batch ended or left its slot: start the next ones shortly."""
    now = time.time()
    if _pending_drives.get(batch_id, 0.0) > now + _PENDING_MARGIN_SECONDS:
        return
    # Forget the drives that are past: the map holds the batches running now.
    for past in [b for b, at in _pending_drives.items() if at <= now]:
        del _pending_drives[past]
    due = _ensure_drive(batch_id, DRIVE_COALESCE_SECONDS)[1]
    if due is not None:
        _pending_drives[batch_id] = due


def drive_key(batch_id: int, bound: str = "next") -> str:
    """The due time of the batch's earliest ("next") or latest ("last") pending drive."""
    return f"engine:drive:{batch_id}:{bound}"


def schedule_drive(batch_id: int, countdown: float) -> bool:
    """Drive the batch again in `countdown` seconds, unless a drive is already due by then.

    Few scheduled drives per batch, whatever the number of stations and workers: the due
    times of the earliest and the latest pending drive are kept in Redis, and a drive is
    sent only when neither is due by then. Both bounds count: each drive asks for the
    safety drive 15 s later at its end, and with the earliest alone every coalesced drive
    (0.25 s) would leave one more safety drive behind. Returns whether it sent one.
    """
    return _ensure_drive(batch_id, countdown)[0]


def _ensure_drive(batch_id: int, countdown: float) -> tuple[bool, float | None]:
    """schedule_drive's work: whether a drive was sent, and the due time of the drive that
    will run by then (None when unknown, or one that may be running already)."""
    countdown = max(0.0, min(countdown, MAX_DRIVE_COUNTDOWN))
    now = time.time()
    due = now + countdown
    client = get_redis()
    try:
        first, last = (float(v) if v else None for v in client.mget(_bounds(batch_id)))
        pending = [b for b in (first, last) if b is not None and now - 1 <= b <= due + 0.5]
        if pending:
            coming = [b for b in pending if b > now]
            return False, min(coming) if coming else None
        # The keys outlive their due time a little: a drive lost with its worker is
        # forgotten soon and the next caller schedules a new one.
        ttl = int(countdown) + 10
        pipe = client.pipeline(transaction=False)
        if first is None or due < first or first < now - 1:
            pipe.set(drive_key(batch_id, "next"), due, ex=ttl)
        if last is None or due > last:
            pipe.set(drive_key(batch_id, "last"), due, ex=ttl)
        pipe.execute()
    except RedisError as exc:
        # Without the de-duplication a drive may run twice (harmless); without the drive a
        # batch with no beat would never move again. A broker that is down makes send_task
        # raise, and the task that asked retries.
        logger.warning("batch %s: drive scheduled without de-duplication (%s)", batch_id, exc)
    send_task(DRIVE_BATCH_TASK, args=[batch_id], kwargs={"scheduled": True}, countdown=countdown)
    return True, due


def drive_ran(batch_id: int) -> None:
    """A scheduled drive is running: the bounds it was are no longer pending."""
    client = get_redis()
    try:
        for key, value in zip(_bounds(batch_id), client.mget(_bounds(batch_id)), strict=True):
            if value is not None and float(value) <= time.time() + 0.5:
                client.delete(key)
    except RedisError:
        logger.warning("could not clear batch %s's drive schedule", batch_id, exc_info=True)


def _bounds(batch_id: int) -> list[str]:
    return [drive_key(batch_id, "next"), drive_key(batch_id, "last")]
