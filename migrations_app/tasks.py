"""Celery tasks: thin wrappers that run one service and send the follow-up.

Each step task takes the migration id, the station identity (so Flower shows which station)
and the state it expects; a task that finds the migration elsewhere does nothing, so a
redelivered or re-driven task is harmless.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import defaultdict
from typing import Any, TypedDict

from celery import shared_task
from celery.signals import worker_ready, worker_shutdown
from django.conf import settings
from django.db import InterfaceError, OperationalError
from redis import RedisError

from migrations_app.models import StationMigration
from migrations_app.services import batches, liveness, notifications, wakes
from migrations_app.services.dispatch import (
    DRIVE_BATCH_TASK,
    enqueue_step,
    enqueue_steps,
    send_task,
)
from migrations_app.services.runner import Followup, load_group, run_step, step_raised
from migrations_app.services.workflow import TASK_NAMES

logger = logging.getLogger(__name__)

# How long a step task runs its group's stations before handing the rest on: within the
# task's soft time limit, which allows for one more station's step after it.
STEP_GROUP_BUDGET_SECONDS = settings.MIGRATION_STEP_GROUP_BUDGET_SECONDS
# The broker or the database is away: not the step's fault, retried without counting.
OUTAGES = (RedisError, OperationalError, InterfaceError)


def _run(
    migration_id: int, station: str, expected_state: str, loaded: StationMigration | None
) -> Followup | None:
    try:
        return run_step(migration_id, expected_state, loaded)
    except OUTAGES:
        raise
    except Exception as exc:  # a bug or a time limit: bounded attempts, then failed
        logger.exception("step %s of migration %s raised", expected_state, migration_id)
        countdown = step_raised(migration_id, expected_state, exc)
        if countdown is not None:
            enqueue_step(migration_id, station, expected_state, countdown)
        return None


def _run_group(hostname: str, expected_state: str, group: list[tuple[int, str]]) -> int:
    """Run the step for each station of the group; send their next steps, grouped again.

    Stations after the group's time budget are handed on to a new task, so a group of
    stations that each wait out a command deadline never runs into the task's time limit.
    On an outage the task is retried with its whole group: the stations that ran have
    moved on (their next steps are sent here first) and are left alone by the retry.
    """
    followups: dict[tuple[str, float], list[tuple[int, str]]] = defaultdict(list)
    budget_ends = time.monotonic() + STEP_GROUP_BUDGET_SECONDS
    ids = [migration_id for migration_id, _ in group]
    # Known to be running here: a recovery re-drives them only if this worker dies.
    liveness.steps_started(hostname, ids)
    ran = 0
    try:
        loaded = load_group(ids)
        for migration_id, station in group:
            if ran and time.monotonic() > budget_ends:
                enqueue_steps(expected_state, group[ran:])
                break
            followup = _run(migration_id, station, expected_state, loaded.get(migration_id))
            ran += 1
            if followup is not None:
                key = (followup.state, followup.countdown)
                followups[key].append((followup.migration_id, followup.station))
    finally:
        try:
            _send_followups(followups)
        finally:
            liveness.steps_finished(hostname, ids)
    return ran


def _send_followups(followups: dict[tuple[str, float], list[tuple[int, str]]]) -> None:
    for (state, countdown), stations in followups.items():
        try:
            enqueue_steps(state, stations, countdown)
        except Exception:
            # Their timers were noted as on their way: a wake must not skip these stations
            # for a timer that was never sent (they would wait for the lease).
            with contextlib.suppress(RedisError):
                wakes.timers_forget((migration_id, state) for migration_id, _ in stations)
            raise


# Every step, drive and tick would otherwise write a result row: thousands per batch, and
# on SQLite each one waits for the single writer. The audit lives in the migration's own
# history; a task that raises is still stored (CELERY_TASK_STORE_ERRORS_EVEN_IF_IGNORED).
def _step_task(name: str):
    # A Redis or database hiccup retries the step soon (every step is safe to repeat);
    # past the retries, the batch's drive re-sends the station's step after the lease.
    # The time limits let a step's commands run to their deadlines (see the settings), and
    # stop a step that hangs anyway.
    @shared_task(
        bind=True,
        name=name,
        ignore_result=True,
        autoretry_for=OUTAGES,
        retry_backoff=True,
        retry_backoff_max=30,
        max_retries=5,
        soft_time_limit=settings.MIGRATION_STEP_SOFT_TIME_LIMIT,
        time_limit=settings.MIGRATION_STEP_HARD_TIME_LIMIT,
    )
    def step(
        self,
        migration_id: int,
        station: str,
        expected_state: str,
        more: list[list[Any]] | None = None,
    ) -> int:
        group = [(migration_id, station), *((int(i), str(s)) for i, s in more or ())]
        return _run_group(self.request.hostname, expected_state, group)

    return step


# One task per step of the procedure (migrations.read_config, migrations.set_url, ...).
step_tasks = {name: _step_task(name) for name in TASK_NAMES}


class _TaskOptions(TypedDict):
    """The shared_task options passed as a dict, typed so that each is checked."""

    ignore_result: bool
    soft_time_limit: int
    time_limit: int
    autoretry_for: tuple[type[BaseException], ...]
    retry_backoff: bool
    retry_backoff_max: int
    max_retries: int


# Drives, ticks and recoveries read and write a few rows: a minute is plenty. A drive lost
# to an outage would end the batch's own schedule: retried like a step.
_HOUSEKEEPING: _TaskOptions = {
    "ignore_result": True,
    "soft_time_limit": 60,
    "time_limit": 90,
    "autoretry_for": OUTAGES,
    "retry_backoff": True,
    "retry_backoff_max": 30,
    "max_retries": 5,
}


@shared_task(name=DRIVE_BATCH_TASK, **_HOUSEKEEPING)
def drive_batch(batch_id: int, scheduled: bool = False) -> int:
    return batches.batch_drive(batch_id=batch_id, scheduled=scheduled)


@shared_task(name="migrations.tick", **_HOUSEKEEPING)
def tick() -> None:
    liveness.beat_alive()
    batches.batches_tick()
    notifications.deliveries_sweep()


@shared_task(name=notifications.DELIVER_TASK, **_HOUSEKEEPING)
def deliver_webhook(delivery_id: int) -> None:
    notifications.deliver(delivery_id)


@shared_task(name=liveness.RECOVER_TASK, **_HOUSEKEEPING)
def recover(running: list[int] | None = None, passes: int = 2) -> None:
    batches.batches_recover(running_on_dead_workers=running or [])
    if passes > 1:
        # The dead worker also held waiting steps' next polls (countdown tasks): their
        # stations are found once they have been quiet for longer than any poll.
        send_task(
            liveness.RECOVER_TASK,
            kwargs={"passes": passes - 1},
            countdown=batches.RECOVER_GRACE_SECONDS,
        )


_heartbeat: liveness.WorkerHeartbeat | None = None


@worker_ready.connect
def _start_heartbeat(sender, **kwargs) -> None:
    """In the worker's main process: tell the others this worker lives, and what it holds."""
    global _heartbeat
    _heartbeat = liveness.WorkerHeartbeat(sender.hostname, send_task)
    _heartbeat.start()


@worker_shutdown.connect
def _stop_heartbeat(**kwargs) -> None:
    if _heartbeat is not None:
        _heartbeat.stop()
