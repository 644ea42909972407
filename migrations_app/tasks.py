"""Celery tasks: thin wrappers that run one service and send the follow-up.

Each step task takes the migration id, the station identity (so Flower shows which station)
and the state it expects; a task that finds the migration elsewhere does nothing, so a
redelivered or re-driven task is harmless.
"""

from __future__ import annotations

from celery import shared_task
from django.db import OperationalError
from redis import RedisError

from migrations_app.services import batches
from migrations_app.services.dispatch import DRIVE_BATCH_TASK, STEP_TASKS, enqueue_step
from migrations_app.services.runner import run_step


def _run(migration_id: int, expected_state: str) -> str | None:
    followup = run_step(migration_id, expected_state)
    if followup is None:
        return None
    enqueue_step(followup.migration_id, followup.station, followup.state, followup.countdown)
    return followup.state


# Every step, drive and tick would otherwise write a result row: thousands per batch, and
# on SQLite each one waits for the single writer. The audit lives in the migration's own
# history; a task that raises is still stored (CELERY_TASK_STORE_ERRORS_EVEN_IF_IGNORED).
def _step_task(name: str):
    # A Redis or database hiccup retries the step soon (every step is safe to repeat);
    # past the retries, the tick's lease re-drives the station.
    @shared_task(
        name=name,
        ignore_result=True,
        autoretry_for=(RedisError, OperationalError),
        retry_backoff=True,
        retry_backoff_max=30,
        max_retries=5,
    )
    def step(migration_id: int, station: str, expected_state: str) -> str | None:
        return _run(migration_id, expected_state)

    return step


# One task per step of the procedure (migrations.read_config, migrations.set_url, ...).
step_tasks = {name: _step_task(name) for name in sorted(set(STEP_TASKS.values()))}


@shared_task(name=DRIVE_BATCH_TASK, ignore_result=True)
def drive_batch(batch_id: int) -> int:
    return batches.batch_drive(batch_id=batch_id)


@shared_task(name="migrations.tick", ignore_result=True)
def tick() -> None:
    batches.batches_tick()
