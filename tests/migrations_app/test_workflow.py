"""The workflow table: one declaration per state, and the sets the engine reads from it."""

from __future__ import annotations

from migrations_app.models import StationMigration
from migrations_app.services import workflow
from migrations_app.services.workflow import WORKFLOW, Segment

State = StationMigration.State


def test_it_declares_every_state_exactly_once_in_the_enums_order():
    declared = [spec.state for spec in WORKFLOW]

    assert declared == list(State.values)
    assert list(workflow.STATE_ORDER) == list(State.values)


def test_a_task_runs_a_state_exactly_when_it_has_a_handler_and_holds_a_slot():
    for spec in WORKFLOW:
        assert bool(spec.task) == (spec.handler is not None) == spec.in_flight, spec.state
        assert not (spec.terminal and spec.in_flight), spec.state


def test_the_derived_sets_are_the_engines_sets():
    assert {State.DONE, State.FAILED, State.SKIPPED, State.CANCELLED} == workflow.TERMINAL
    assert {State.PENDING, State.WAITING_ONLINE} == workflow.QUEUED
    assert set(State.values) - workflow.TERMINAL - workflow.QUEUED == workflow.ACTIVE
    assert {
        State.READING_CONFIG,
        State.WAITING_IDLE,
        State.VERIFIED,
        State.OLD_REGISTRATION_MARKED,
    } == workflow.INLINE
    assert {
        State.PREFLIGHT,
        State.READING_CONFIG,
        State.CHECKING_ROOT_CA,
        State.SETTING_URL,
        State.SETTING_PRIORITY,
    } == workflow.STOPPABLE
    assert {State.SETTING_PRIORITY, State.WAITING_IDLE, State.RESETTING} == workflow.ARMED


def test_flower_keeps_the_step_named_tasks():
    assert workflow.STEP_TASKS == {
        State.PREFLIGHT: "migrations.read_config",
        State.READING_CONFIG: "migrations.read_config",
        State.CHECKING_ROOT_CA: "migrations.check_root_ca",
        State.SETTING_URL: "migrations.set_url",
        State.SETTING_PRIORITY: "migrations.set_priority",
        State.WAITING_IDLE: "migrations.wait_idle",
        State.RESETTING: "migrations.reset",
        State.AWAITING_BOOT: "migrations.verify_boot",
        State.VERIFIED: "migrations.mark_old_registration",
        State.OLD_REGISTRATION_MARKED: "migrations.mark_old_registration",
        State.CLEANUP: "migrations.cleanup",
    }


def test_each_state_runs_its_handler():
    handlers = {state: workflow.handler(state).__name__ for state in workflow.STEP_TASKS}

    assert handlers == {
        State.PREFLIGHT: "preflight",
        State.READING_CONFIG: "read_config",
        State.CHECKING_ROOT_CA: "check_root_ca",
        State.SETTING_URL: "set_url",
        State.SETTING_PRIORITY: "set_priority",
        State.WAITING_IDLE: "wait_idle",
        State.RESETTING: "reset",
        State.AWAITING_BOOT: "verify_boot",
        State.VERIFIED: "mark_old_registration",
        State.OLD_REGISTRATION_MARKED: "after_marking",
        State.CLEANUP: "cleanup",
    }


def test_the_dashboard_segments():
    assert {
        Segment.DONE: {State.DONE},
        Segment.FAILED: {State.FAILED},
        Segment.SKIPPED: {State.SKIPPED},
        Segment.CANCELLED: {State.CANCELLED},
        Segment.IN_FLIGHT: workflow.ACTIVE,
        Segment.WAITING: workflow.QUEUED,
    } == workflow.SEGMENT_STATES
    assert workflow.ENDED_SEGMENTS == (
        Segment.DONE,
        Segment.FAILED,
        Segment.SKIPPED,
        Segment.CANCELLED,
    )
    assert list(workflow.SEGMENT_LABELS) == list(Segment)


def test_the_one_live_migration_constraint_spells_out_the_terminal_states():
    (constraint,) = (
        c for c in StationMigration._meta.constraints if c.name == "one_live_migration_per_station"
    )
    assert constraint.condition.negated
    ((lookup, states),) = constraint.condition.children

    assert lookup == "state__in"
    assert set(states) == workflow.TERMINAL
