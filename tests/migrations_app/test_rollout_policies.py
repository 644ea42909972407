"""Rollout policies enforced by real workers on simulated stations: the exponential rate,
abort criteria by failure kind, the schedule, approval by a second person and the
promotion after the canary (the last two through manage.py control_batch)."""

from __future__ import annotations

import datetime as dt
import io
import json
from collections import Counter

import pytest
from django.contrib.auth.models import Permission, User
from django.core.management import CommandError, call_command
from django.utils import timezone

from devstack.processes import wait_until
from fleet.models import ChargingStation, CsmsBackend
from migrations_app.models import (
    BatchAction,
    MigrationBatch,
    StationMigration,
    WebhookDelivery,
)
from migrations_app.services.batches import (
    BatchOptions,
    Webhooks,
    batch_create,
    batch_drive,
    held_for,
)
from migrations_app.services.controls import batch_resume
from migrations_app.services.policies import parse_criterion, when_text
from ocpp_gateway.simulator.spec import Behaviour
from tests.migrations_app.conftest import wait_batch
from tests.migrations_app.test_rollout_controls import ARMED, start, states
from tests.webhook_receiver import WebhookReceiver

State = StationMigration.State
BatchState = MigrationBatch.State


def test_the_exponential_rate_grows_as_stations_are_done(stack):
    ids = [f"CP-E{i:02}" for i in range(6)]
    with stack.fleet([stack.station(i) for i in ids]):
        # 6 a minute lets one station start in any 10 s; each done station multiplies it by 10.
        batch = start(
            ids,
            max_in_flight=10,
            rate_per_minute=6,
            rate_increase_factor=10,
            rate_increase_every=1,
            rate_max_per_minute=600,
        )
        wait_batch(batch, BatchState.FINISHED)
    assert states(batch) == Counter({State.DONE: 6})
    starts = sorted(batch.stations.values_list("started_at", flat=True))
    assert (starts[1] - starts[0]).total_seconds() > 0.5  # the second waited for a done one
    # At the constant rate no 10 s would hold more than one start.
    assert (starts[-1] - starts[1]).total_seconds() < 10, starts


def test_abort_criteria_pause_the_batch_naming_the_one_that_held(stack, admin_user):
    ids = [f"CP-K{i:02}" for i in range(6)]
    behaviours = {
        ids[0]: Behaviour(reject_url_writes=True),
        ids[2]: Behaviour(fall_back_after=2),
    }
    specs = [stack.station(i, behaviour=behaviours.get(i, Behaviour())) for i in ids]
    with stack.fleet(specs) as fleet:
        # One at a time, the brake off: only the criteria judge, in a known order.
        batch = start(
            ids,
            max_in_flight=1,
            brake_failure_ratio=None,
            brake_first_failed=0,
            abort_criteria=(parse_criterion("rejected:50%:3"), parse_criterion("fallback:1")),
        )
        wait_batch(batch, BatchState.PAUSED, timeout=120)
        # 1 of 3 rejected is under 50 %; the fallback holds.
        assert batch.pause_reason == (
            "abort criterion fallback:1: 1 of 3 ended stations failed (fell back to the source)"
        )
        auto_pause = BatchAction.objects.get(batch=batch, kind=BatchAction.Kind.AUTO_PAUSE)
        assert auto_pause.user is None and "fallback:1" in auto_pause.detail
        wait_until(lambda: not set(states(batch)) & ARMED, 30, "armed stations to end")
        assert states(batch) == Counter({State.PENDING: 3, State.FAILED: 2, State.DONE: 1})
        assert all(fleet[i].events("config_changed") == [] for i in ids[3:])

        # A resume counts afresh: the failures before it no longer hold the criteria.
        batch_resume(batch_id=batch.id, user=admin_user)
        wait_batch(batch, BatchState.FINISHED, timeout=120)
    assert states(batch) == Counter({State.DONE: 4, State.FAILED: 2})
    kinds = dict(batch.stations.values_list("station__identity", "failure_kind"))
    assert (kinds[ids[0]], kinds[ids[2]]) == ("rejected", "fallback")


def test_the_schedule_holds_the_start_and_its_end_cancels_the_stations_not_started(stack):
    ids = [f"CP-S{i:02}" for i in range(4)]
    with stack.fleet([stack.station(i) for i in ids]) as fleet:
        now = timezone.now()
        starts_at, ends_at = now + dt.timedelta(seconds=3), now + dt.timedelta(seconds=10)
        # 6 a minute: after the first start the next may come 10 s later, past the end.
        batch = start(ids, rate_per_minute=6, starts_at=starts_at, ends_at=ends_at)
        assert held_for(batch).startswith("scheduled to start at ")
        assert batch_drive(batch_id=batch.id) == 0  # before the start nothing starts
        wait_batch(batch, BatchState.FINISHED)
        started = [i for i in ids if fleet[i].events("config_changed")]
    assert states(batch) == Counter({State.DONE: 1, State.CANCELLED: 3})
    done = batch.stations.get(state=State.DONE)
    assert starts_at <= done.started_at < ends_at
    assert started == [done.station.identity]
    when = when_text(ends_at)
    for cancelled in batch.stations.filter(state=State.CANCELLED):
        assert cancelled.reason == f"not started: the schedule ended at {when}"
        assert cancelled.started_at is None
    end = BatchAction.objects.get(batch=batch, kind=BatchAction.Kind.SCHEDULE_END)
    assert end.detail == "3 stations not started were cancelled"


def test_the_schedule_composes_with_the_maintenance_window(stack):
    with stack.fleet([stack.station("CP-SW")]):
        now = timezone.now()
        batch = start(
            ["CP-SW"],
            starts_at=now - dt.timedelta(minutes=1),
            window_start=(now + dt.timedelta(hours=1)).time(),
            window_end=(now + dt.timedelta(hours=2)).time(),
        )
        # Inside the schedule, outside the window: nothing starts.
        assert batch_drive(batch_id=batch.id) == 0
        assert states(batch) == Counter({State.PENDING: 1})
        MigrationBatch.objects.filter(id=batch.id).update(
            window_start=(now - dt.timedelta(minutes=5)).time()
        )
        wait_batch(batch, BatchState.FINISHED)
    assert states(batch) == Counter({State.DONE: 1})


def staff(username: str, *codenames: str) -> User:
    user = User.objects.create_user(username, is_staff=True)
    user.user_permissions.add(*Permission.objects.filter(codename__in=codenames))
    return user


def control(name: str, batch: MigrationBatch, user: str) -> str:
    out = io.StringIO()
    call_command("control_batch", name, str(batch.id), "--user", user, stdout=out)
    return out.getvalue()


def refused(name: str, batch: MigrationBatch, user: str) -> str:
    with pytest.raises(CommandError) as refusal:
        control(name, batch, user)
    assert refusal.value.returncode == 2
    return str(refusal.value)


def test_approval_by_a_second_person_then_promotion_after_the_canary(stack):
    creator = staff("creator", "run_migration", "approve_migration")
    staff("approver", "approve_migration")
    staff("bystander", "run_migration")
    ids = [f"CP-V{i:02}" for i in range(4)]
    with WebhookReceiver.start() as receiver, stack.fleet([stack.station(i) for i in ids]) as fleet:
        batch = batch_create(
            target=CsmsBackend.objects.get(name="csms-2"),
            stations=ChargingStation.objects.filter(identity__in=ids),
            options=BatchOptions(
                canary_size=2,
                approval_required=True,
                promote_after_canary=True,
                rate_per_minute=0,
            ),
            created_by=creator,
            webhooks=Webhooks(urls=(receiver.url,)),
        )
        assert held_for(batch) == "awaiting approval by a second person"
        assert batch_drive(batch_id=batch.id) == 0
        assert "created batch" in refused("approve", batch, "creator")
        assert "may not approve" in refused("approve", batch, "bystander")
        assert "run permission" in refused("promote", batch, "approver")
        assert states(batch) == Counter({State.PENDING: 4})

        assert "approved" in control("approve", batch, "approver")
        assert "has not ended yet" in refused("promote", batch, "creator")
        wait_until(
            lambda: states(batch)[State.DONE] == 2 and not set(states(batch)) & ARMED,
            60,
            "the canary wave to be done",
        )
        assert batch_drive(batch_id=batch.id) == 0
        batch.refresh_from_db()
        assert held_for(batch) == "the canary wave ended: awaiting promotion"
        assert states(batch)[State.PENDING] == 2
        assert sorted(i for i in ids if fleet[i].events("config_changed")) == ids[:2]

        assert "promoted" in control("promote", batch, "bystander")
        assert "was promoted by bystander" in refused("promote", batch, "creator")
        wait_batch(batch, BatchState.FINISHED)
        deliveries = WebhookDelivery.objects.filter(webhook__batch=batch)
        wait_until(
            lambda: (
                deliveries.count() == 5
                and not deliveries.exclude(status=WebhookDelivery.Status.DELIVERED).exists()
            ),
            30,
            "the batch's 5 webhook deliveries",
        )
    events = {body["event"]: body for body in (json.loads(r.body) for r in receiver.accepted)}
    assert sorted(events) == [
        "batch.approved",
        "batch.canary_passed",
        "batch.finished",
        "batch.promoted",
        "batch.started",
    ]
    assert events["batch.approved"]["by"] == "approver"
    assert events["batch.canary_passed"]["reason"] == "waiting to be promoted"
    assert events["batch.promoted"]["by"] == "bystander"
    assert states(batch) == Counter({State.DONE: 4})
    assert (batch.approved_by.username, batch.promoted_by.username) == ("approver", "bystander")
    history = list(batch.actions.order_by("id").values_list("kind", "user__username"))
    assert history[:3] == [("start", "creator"), ("approve", "approver"), ("promote", "bystander")]
