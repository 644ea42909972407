"""Celery tasks: thin wrappers that run one service and send the follow-up.

Each step task takes the migration id, the station identity (so Flower shows which station)
and the state it expects; a task that finds the migration elsewhere does nothing, so a
redelivered or re-driven task is harmless.
"""

from __future__ import annotations

from celery import shared_task

from migrations_app.services import batches
from migrations_app.services.dispatch import DRIVE_BATCH_TASK, STEP_TASKS, enqueue_step
from migrations_app.services.runner import run_step


def _run(migration_id: int, expected_state: str) -> str | None:
    followup = run_step(migration_id, expected_state)
    if followup is None:
        return None
    enqueue_step(followup.migration_id, followup.station, followup.state, followup.countdown)
    return followup.state


def _step_task(name: str):
    @shared_task(name=name)
    def step(migration_id: int, station: str, expected_state: str) -> str | None:
        return _run(migration_id, expected_state)

    return step


# One task per step of the procedure (migrations.read_config, migrations.set_url, ...).
step_tasks = {name: _step_task(name) for name in sorted(set(STEP_TASKS.values()))}


@shared_task(name=DRIVE_BATCH_TASK)
def drive_batch(batch_id: int) -> int:
    return batches.batch_drive(batch_id=batch_id)


@shared_task(name="migrations.tick")
def tick() -> None:
    batches.batches_tick()
