"""Waiting migrations are moved on by the events they wait for, not by polling.

A migration awaiting its boot is woken by a BootNotification of its station (on the target:
it booted there, or answered Pending or Rejected; on the source: it fell back), one waiting
for idle by a StatusNotification after which no connector is busy. Ingestion sends
``fleet.signals.station_events_applied`` once each batch of events has committed; the
receiver finds the waiting migrations of those stations in one query and runs their step
now. Handlers are safe to repeat, so a woken run beside a timer run is harmless.

A wait's own timer is then only its deadline (steps.wait_timer), and there is one per
migration and state: its due time is kept in Redis, and a step that stays sends another
countdown task only when it is due earlier than the one on its way. Without that, every
StatusNotification of a charging station would add a timer.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from django.db.models import Q
from redis import RedisError

from fleet.redis import get_redis
from migrations_app.models import StationMigration
from migrations_app.services import liveness, workflow
from migrations_app.services.dispatch import enqueue_steps
from migrations_app.services.steps import connectors_busy

logger = logging.getLogger(__name__)

State = StationMigration.State
# A timer due this little before the one asked for is as good as it.
TIMER_SLACK_SECONDS = 0.5
# The due time outlives the timer a little: a timer lost with its worker is forgotten soon
# after, and the next step that stays sends a new one.
TIMER_KEY_GRACE_SECONDS = 10


def stations_woken(
    *, booted: Iterable[int], connectors: dict[int, dict[str, Any]], **_signal: Any
) -> int:
    """Run now the step of every migration waiting for one of these events; how many.

    The receiver of station_events_applied: ``booted`` the stations with a new boot,
    ``connectors`` the connector status of the stations whose status changed.
    """
    idle = [station_id for station_id, status in connectors.items() if not connectors_busy(status)]
    booted_ids = list(booted)
    waiting = Q()
    if booted_ids:
        waiting |= Q(state=State.AWAITING_BOOT, station_id__in=booted_ids)
    if idle:
        waiting |= Q(state=State.WAITING_IDLE, station_id__in=idle)
    if not waiting:
        return 0
    # One query per batch of events, on the station foreign key's index.
    found = list(
        StationMigration.objects.filter(waiting).values_list("id", "station__identity", "state")
    )
    _enqueue_by_state(found)
    return len(found)


def wake_held(batch_id: int) -> int:
    """Run now the step of every station a paused batch holds (after a resume or a cancel,
    so they go on, or stop, without waiting for their next look); how many."""
    # Not a step running now: it was not held (its next step reads the batch again), and a
    # second run beside it would send its command twice.
    held = StationMigration.objects.filter(batch_id=batch_id, state__in=workflow.STOPPABLE).exclude(
        id__in=liveness.held_by_live_workers()
    )
    found = list(held.values_list("id", "station__identity", "state"))
    _enqueue_by_state(found)
    return len(found)


def _enqueue_by_state(found: list[tuple[int, str, str]]) -> None:
    """Their steps, now: stations in the same state travel in the same tasks."""
    by_state: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for migration_id, identity, state in found:
        by_state[state].append((migration_id, identity))
    for state, stations in by_state.items():
        enqueue_steps(state, stations)


# --- one timer per waiting migration -------------------------------------------------------


def timer_key(migration_id: int, state: str) -> str:
    return f"engine:wait:{migration_id}:{state}"


def timer_needed(migration_id: int, state: str, countdown: float) -> bool:
    """Whether a step that stays must send its countdown task, and if so note its due time.

    Not when a timer of this migration and state is due no later and has not run yet: that
    one runs the step then (a run woken by an event stays with the same or a later
    deadline). A timer due earlier is kept; a later one is replaced (it still runs, once).
    """
    now = time.time()
    due = now + countdown
    key = timer_key(migration_id, state)
    ttl = int(countdown) + TIMER_KEY_GRACE_SECONDS
    client = get_redis()
    try:
        if not client.set(key, due, nx=True, ex=ttl):
            current = float(client.get(key) or 0)
            if now < current <= due + TIMER_SLACK_SECONDS:
                return False
            client.set(key, due, ex=ttl)
    except RedisError as exc:
        # Without the de-duplication a step may run twice (harmless); without its timer a
        # waiting station would wait for the lease.
        logger.warning("migration %s: timer sent without de-duplication (%s)", migration_id, exc)
    return True


def timers_forget(migrations: Iterable[tuple[int, str]]) -> None:
    """The timers of these (migration, state) are lost (their worker died, or the step went
    quiet past the lease): the step's next stay sends a new one."""
    keys = [timer_key(migration_id, state) for migration_id, state in migrations]
    if keys:
        get_redis().delete(*keys)
