"""Which Celery task runs which state, and enqueueing after the current transaction commits.

Tasks are sent by name so that services never import the task module (tasks call services).
"""

from __future__ import annotations

from django.db import transaction

from fleet.celery import app
from migrations_app.models import StationMigration

State = StationMigration.State

# Named after the seed's steps, so Flower reads like the procedure.
STEP_TASKS: dict[str, str] = {
    # Pre-flight sends nothing: the task that runs it goes straight on to step 1.
    State.PREFLIGHT: "migrations.read_config",
    State.READING_CONFIG: "migrations.read_config",
    State.SETTING_URL: "migrations.set_url",
    State.SETTING_PRIORITY: "migrations.set_priority",
    State.WAITING_IDLE: "migrations.wait_idle",
    State.RESETTING: "migrations.reset",
    State.AWAITING_BOOT: "migrations.verify_boot",
    # Normally run inline by verify_boot; a re-driven station may be found here.
    State.VERIFIED: "migrations.mark_old_registration",
    State.OLD_REGISTRATION_MARKED: "migrations.mark_old_registration",
    State.CLEANUP: "migrations.cleanup",
}
DRIVE_BATCH_TASK = "migrations.drive_batch"


def enqueue_step(migration_id: int, station: str, state: str, countdown: float = 0) -> None:
    """Run the step of `state` for this migration once the current transaction commits."""
    name = STEP_TASKS[state]
    transaction.on_commit(
        lambda: app.send_task(name, args=[migration_id, station, state], countdown=countdown)
    )


def enqueue_drive(batch_id: int) -> None:
    transaction.on_commit(lambda: app.send_task(DRIVE_BATCH_TASK, args=[batch_id]))
