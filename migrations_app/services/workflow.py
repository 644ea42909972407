"""Every state of a station migration, and what each one means to the engine: one table.

A reader learns the procedure here: which handler runs a state, under which Celery task
name (named after the seed's steps, so Flower reads like the procedure), and how the
runner, the batch drive, the operator's controls and the dashboard treat it. Every other
module reads the sets derived below instead of spelling states out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from migrations_app.models import StationMigration
from migrations_app.services import steps
from migrations_app.services.steps import Next

State = StationMigration.State


class Segment(StrEnum):
    """The dashboard's progress bar: which part of it a state counts in, in bar order."""

    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"
    IN_FLIGHT = "in_flight"
    WAITING = "waiting"


SEGMENT_LABELS: dict[Segment, str] = {
    Segment.DONE: "done",
    Segment.FAILED: "failed",
    Segment.SKIPPED: "skipped",
    Segment.CANCELLED: "cancelled",
    Segment.IN_FLIGHT: "in flight",
    Segment.WAITING: "waiting to start",
}


@dataclass(frozen=True)
class StateSpec:
    """What one state means.

    handler: the step that runs in it (steps.py); None for a state no task runs in.
    task: the Celery task that runs the handler.
    inline: entered after a step that did no OCPP exchange (pre-flight, the idle check, the
        verification, the registrations), so the same task runs straight on: a task is
        ~4 ms of worker CPU plus a trip through the queue.
    in_flight: started and not ended; counts against the batch's max in flight.
    stoppable: a pause holds it and a cancel stops it: the station is not armed yet (its
        priority unchanged); after that, finishing (reset and verify) is what leaves it
        in a known state.
    armed: past a possible priority write; giving up on it must try to restore the station.
    terminal: the migration has ended.
    segment: where the dashboard counts it.
    """

    state: State
    segment: Segment
    handler: Callable[[StationMigration], Next] | None = None
    task: str = ""
    inline: bool = False
    in_flight: bool = False
    stoppable: bool = False
    armed: bool = False
    terminal: bool = False


# In the order a station moves through them (the dashboard lists states in this order).
WORKFLOW: tuple[StateSpec, ...] = (
    StateSpec(State.PENDING, Segment.WAITING),
    # Queued until it reconnects: it holds no in-flight slot meanwhile.
    StateSpec(State.WAITING_ONLINE, Segment.WAITING),
    # Pre-flight sends nothing: the task that runs it goes straight on to step 1.
    StateSpec(
        State.PREFLIGHT,
        Segment.IN_FLIGHT,
        handler=steps.preflight,
        task="migrations.read_config",
        in_flight=True,
        stoppable=True,
    ),
    StateSpec(
        State.READING_CONFIG,
        Segment.IN_FLIGHT,
        handler=steps.read_config,
        task="migrations.read_config",
        inline=True,
        in_flight=True,
        stoppable=True,
    ),
    StateSpec(
        State.CHECKING_ROOT_CA,
        Segment.IN_FLIGHT,
        handler=steps.check_root_ca,
        task="migrations.check_root_ca",
        in_flight=True,
        stoppable=True,
    ),
    StateSpec(
        State.SETTING_URL,
        Segment.IN_FLIGHT,
        handler=steps.set_url,
        task="migrations.set_url",
        in_flight=True,
        stoppable=True,
    ),
    # Stoppable and armed: a cancel here puts back what the free slot held.
    StateSpec(
        State.SETTING_PRIORITY,
        Segment.IN_FLIGHT,
        handler=steps.set_priority,
        task="migrations.set_priority",
        in_flight=True,
        stoppable=True,
        armed=True,
    ),
    StateSpec(
        State.WAITING_IDLE,
        Segment.IN_FLIGHT,
        handler=steps.wait_idle,
        task="migrations.wait_idle",
        inline=True,
        in_flight=True,
        armed=True,
    ),
    StateSpec(
        State.RESETTING,
        Segment.IN_FLIGHT,
        handler=steps.reset,
        task="migrations.reset",
        in_flight=True,
        armed=True,
    ),
    StateSpec(
        State.AWAITING_BOOT,
        Segment.IN_FLIGHT,
        handler=steps.verify_boot,
        task="migrations.verify_boot",
        in_flight=True,
    ),
    # Normally run inline by verify_boot; a re-driven station may be found here.
    StateSpec(
        State.VERIFIED,
        Segment.IN_FLIGHT,
        handler=steps.mark_old_registration,
        task="migrations.mark_old_registration",
        inline=True,
        in_flight=True,
    ),
    StateSpec(
        State.OLD_REGISTRATION_MARKED,
        Segment.IN_FLIGHT,
        handler=steps.after_marking,
        task="migrations.mark_old_registration",
        inline=True,
        in_flight=True,
    ),
    StateSpec(
        State.CLEANUP,
        Segment.IN_FLIGHT,
        handler=steps.cleanup,
        task="migrations.cleanup",
        in_flight=True,
    ),
    StateSpec(State.DONE, Segment.DONE, terminal=True),
    StateSpec(State.FAILED, Segment.FAILED, terminal=True),
    StateSpec(State.SKIPPED, Segment.SKIPPED, terminal=True),
    StateSpec(State.CANCELLED, Segment.CANCELLED, terminal=True),
)

SPECS: dict[str, StateSpec] = {spec.state: spec for spec in WORKFLOW}


def _states(has: Callable[[StateSpec], bool]) -> frozenset[str]:
    return frozenset(spec.state for spec in WORKFLOW if has(spec))


TERMINAL = _states(lambda spec: spec.terminal)
ACTIVE = _states(lambda spec: spec.in_flight)
# Waiting for their turn (or their reconnection): not started, so a cancel ends them at once.
QUEUED = _states(lambda spec: not spec.in_flight and not spec.terminal)
INLINE = _states(lambda spec: spec.inline)
STOPPABLE = _states(lambda spec: spec.stoppable)
ARMED = _states(lambda spec: spec.armed)
STEP_TASKS: dict[str, str] = {spec.state: spec.task for spec in WORKFLOW if spec.task}
TASK_NAMES: tuple[str, ...] = tuple(sorted(set(STEP_TASKS.values())))
STATE_ORDER: tuple[str, ...] = tuple(spec.state for spec in WORKFLOW)
SEGMENT_STATES: dict[Segment, frozenset[str]] = {
    segment: frozenset(spec.state for spec in WORKFLOW if spec.segment == segment)
    for segment in Segment
}
# The segments of ended stations (the bar's "n of N ended").
ENDED_SEGMENTS = tuple(segment for segment in Segment if SEGMENT_STATES[segment] <= TERMINAL)


def handler(state: str) -> Callable[[StationMigration], Next]:
    """The step that runs in state (KeyError for a state no task runs in)."""
    found = SPECS[state].handler
    if found is None:
        raise KeyError(state)
    return found


def segment_of(state: str) -> Segment:
    return SPECS[state].segment
