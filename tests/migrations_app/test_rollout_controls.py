"""Rollout controls enforced by real workers: canary, brake, window, pause, cancel, retry,
migrate back, the offline queue, and limits across two worker processes."""

from __future__ import annotations

import datetime as dt
import time
from collections import Counter

from django.utils import timezone

from devstack.processes import wait_until
from fleet.models import ChargingStation, CsmsBackend, Registration
from migrations_app.models import BatchAction, MigrationBatch, StationMigration
from migrations_app.services.batches import BatchOptions, batch_create, batch_drive
from migrations_app.services.controls import (
    batch_cancel,
    batch_migrate_back,
    batch_pause,
    batch_resume,
    batch_retry_failed,
)
from ocpp_gateway.simulator import Fleet
from ocpp_gateway.simulator.spec import Behaviour
from tests.migrations_app.conftest import WORKER_ENV, wait_batch
from tests.migrations_app.test_migration_resilience import most_in_flight_at_once

State = StationMigration.State
BatchState = MigrationBatch.State
# Past the priority change: these finish even in a paused batch.
# From the priority write to the end: a pause lets these finish. (The last two last only
# between two commits of one task, but a look at the batch can fall between them.)
ARMED = {
    State.WAITING_IDLE,
    State.RESETTING,
    State.AWAITING_BOOT,
    State.VERIFIED,
    State.OLD_REGISTRATION_MARKED,
    State.CLEANUP,
}


def start(identities: list[str], **options) -> MigrationBatch:
    stations = ChargingStation.objects.filter(identity__in=identities)
    return batch_create(
        target=CsmsBackend.objects.get(name="csms-2"),
        stations=stations,
        options=BatchOptions(**{"boot_timeout_seconds": 60, **options}),
    )


def states(batch: MigrationBatch) -> Counter:
    return Counter(batch.stations.values_list("state", flat=True))


def test_a_failed_canary_pauses_the_batch_and_the_rest_wait(stack, admin_user):
    ids = [f"CP-C{i:02}" for i in range(6)]
    specs = [stack.station(ids[0], behaviour=Behaviour(reject_url_writes=True))]
    specs += [stack.station(identity) for identity in ids[1:]]
    with stack.fleet(specs) as fleet:
        batch = start(ids, canary_size=2)
        wait_batch(batch, BatchState.PAUSED)
        assert batch.pause_reason.startswith("canary failed: CP-C00")
        wait_until(lambda: not set(states(batch)) & ARMED, 30, "armed stations to finish")
        assert states(batch)[State.PENDING] == 4  # only the canary wave started
        assert all(fleet[i].events("config_changed") == [] for i in ids[2:])
        assert BatchAction.objects.filter(batch=batch, kind="auto_pause", user=None).exists()

        batch_resume(batch_id=batch.id, user=admin_user)
        wait_batch(batch, BatchState.FINISHED)
        assert states(batch) == Counter({State.DONE: 5, State.FAILED: 1})


def test_the_brake_pauses_once_failures_pass_the_ratio(stack):
    ids = [f"CP-B{i:02}" for i in range(10)]
    rejecting = Behaviour(reject_url_writes=True)
    specs = [
        stack.station(identity, behaviour=rejecting if i < 4 else Behaviour())
        for i, identity in enumerate(ids)
    ]
    with stack.fleet(specs):
        batch = start(ids, max_in_flight=2, brake_failure_ratio=0.3, brake_min_sample=3)
        wait_batch(batch, BatchState.PAUSED)
        assert batch.pause_reason.startswith("brake:")
        wait_until(lambda: not set(states(batch)) & ARMED, 30, "armed stations to end")
        assert states(batch)[State.PENDING] >= 4  # the rest were not started


def test_nothing_starts_outside_the_maintenance_window(stack):
    with stack.fleet([stack.station("CP-W")]):
        now = timezone.now()
        closed_from = (now + dt.timedelta(hours=1)).time()
        closed_to = (now + dt.timedelta(hours=2)).time()
        batch = start(["CP-W"], window_start=closed_from, window_end=closed_to)
        assert batch_drive(batch_id=batch.id) == 0
        assert states(batch) == Counter({State.PENDING: 1})

        opened_from = (now - dt.timedelta(minutes=5)).time()
        MigrationBatch.objects.filter(id=batch.id).update(window_start=opened_from)
        wait_batch(batch, BatchState.FINISHED)
        assert states(batch) == Counter({State.DONE: 1})


def test_pause_holds_unarmed_stations_and_resume_goes_on(stack, admin_user):
    ids = [f"CP-P{i:02}" for i in range(8)]
    with stack.fleet([stack.station(i) for i in ids], reboot_delay=2) as fleet:
        batch = start(ids, max_in_flight=4)
        wait_until(lambda: states(batch)[State.AWAITING_BOOT] >= 1, 30, "a station resetting")
        batch_pause(batch_id=batch.id, user=admin_user, reason="checking the target")
        wait_until(lambda: not set(states(batch)) & ARMED, 30, "armed stations to finish")
        paused = states(batch)
        assert paused[State.PENDING] >= 4  # nothing new started
        armed_done = paused[State.DONE]
        assert armed_done >= 1
        assert sum(len(fleet[i].events("reset")) for i in ids) == armed_done

        batch_resume(batch_id=batch.id, user=admin_user)
        wait_batch(batch, BatchState.FINISHED)
        assert states(batch) == Counter({State.DONE: 8})
    kinds = list(batch.actions.values_list("kind", "user__username"))
    assert ("pause", admin_user.username) in kinds and ("resume", admin_user.username) in kinds


def test_cancel_marks_the_rest_cancelled(stack, admin_user):
    ids = [f"CP-X{i:02}" for i in range(5)]
    with stack.fleet([stack.station(i) for i in ids]) as fleet:
        now = timezone.now()
        batch = start(
            ids,
            window_start=(now + dt.timedelta(hours=1)).time(),
            window_end=(now + dt.timedelta(hours=2)).time(),
        )
        batch_cancel(batch_id=batch.id, user=admin_user)
        batch.refresh_from_db()
        assert batch.state == BatchState.CANCELLED
        assert states(batch) == Counter({State.CANCELLED: 5})
        assert all(fleet[i].events("config_changed") == [] for i in ids)


def test_retry_failed_puts_failed_stations_back_in_line(stack, admin_user):
    specs = [stack.station("CP-R", behaviour=Behaviour(charging=True, charging_seconds=8))]
    with stack.fleet(specs):
        batch = start(["CP-R"], idle_wait_seconds=1)
        wait_batch(batch, BatchState.FINISHED)
        assert states(batch) == Counter({State.FAILED: 1})  # busy
        wait_until(
            lambda: (
                ChargingStation.objects.get(identity="CP-R").connector_status["1"]["status"]
                == "Available"
            ),
            30,
            "the charging session to end",
        )
        assert batch_retry_failed(batch_id=batch.id, user=admin_user) == 1
        wait_batch(batch, BatchState.FINISHED)
        assert states(batch) == Counter({State.DONE: 1})


def test_migrate_back_moves_verified_stations_to_where_they_came_from(stack, admin_user):
    with stack.fleet([stack.station("CP-BACK")]) as fleet:
        batch = start(["CP-BACK"])
        wait_batch(batch, BatchState.FINISHED)
        back = batch_migrate_back(batch_id=batch.id, user=admin_user)
        assert back.target.name == "csms-1" and back.migrated_back_from_id == batch.id
        wait_batch(back, BatchState.FINISHED)
        assert states(back) == Counter({State.DONE: 1})
        assert fleet["CP-BACK"].connected_url == stack.source_url
    registrations = dict(
        Registration.objects.filter(station__identity="CP-BACK").values_list("csms__name", "state")
    )
    assert registrations == {"csms-1": "active", "csms-2": "pending_removal"}


def test_an_offline_station_is_queued_until_it_reconnects(stack):
    spec = stack.station("CP-LATE")
    with stack.fleet([spec]):
        pass  # it booted once, so the inventory knows it; now it is off
    wait_until(
        lambda: not ChargingStation.objects.get(identity="CP-LATE").connected, 15, "it offline"
    )
    batch = start(["CP-LATE"], offline_wait_seconds=60)
    wait_until(lambda: states(batch)[State.WAITING_ONLINE] == 1, 30, "it queued")
    with Fleet([spec]) as fleet:
        wait_batch(batch, BatchState.FINISHED)
        assert states(batch) == Counter({State.DONE: 1})
        assert fleet["CP-LATE"].connected_url == stack.target_url


def test_limits_hold_across_two_worker_processes(stack, tmp_path):
    _, second_log = stack.start_worker("w2", **WORKER_ENV)
    ids = [f"CP-2W{i:02}" for i in range(24)]
    with stack.fleet([stack.station(i) for i in ids]):
        batch = start(ids, max_in_flight=4)
        wait_batch(batch, BatchState.FINISHED, timeout=120)
        assert states(batch) == Counter({State.DONE: 24})
    assert most_in_flight_at_once() <= 4
    assert b"migrations.set_url" in second_log.read_bytes()  # the second worker took part


def test_the_rate_limit_spreads_starts(stack):
    ids = [f"CP-RATE{i:02}" for i in range(14)]
    with stack.fleet([stack.station(i) for i in ids]):
        batch = start(ids, rate_per_minute=60, max_in_flight=50)
        wait_batch(batch, BatchState.FINISHED, timeout=120)
    starts = sorted(batch.stations.values_list("started_at", flat=True))
    for first in starts:
        in_ten_seconds = [s for s in starts if first <= s < first + dt.timedelta(seconds=10)]
        assert len(in_ten_seconds) <= 10
    assert starts[-1] - starts[0] >= dt.timedelta(seconds=9)


def test_the_default_brake_pauses_when_the_first_five_ended_stations_all_failed(stack):
    ids = [f"CP-DB{i:02}" for i in range(12)]
    rejecting = Behaviour(reject_url_writes=True)
    specs = [
        stack.station(identity, behaviour=rejecting if i < 6 else Behaviour())
        for i, identity in enumerate(ids)
    ]
    with stack.fleet(specs) as fleet:
        batch = start(ids, max_in_flight=6)  # the defaults' brake, nothing said
        wait_batch(batch, BatchState.PAUSED)
        assert batch.pause_reason == "brake: the first 5 ended stations all failed"
        wait_until(lambda: not set(states(batch)) & ARMED, 30, "armed stations to end")
        # Each failure freed a slot for the next station until the fifth ended; then none.
        pending = list(
            batch.stations.filter(state=State.PENDING).values_list("station__identity", flat=True)
        )
        assert pending and all(fleet[i].events("config_changed") == [] for i in pending)


def test_a_step_that_keeps_raising_fails_after_bounded_attempts_with_the_error(stack):
    from fleet.celery import app
    from migrations_app.services.workflow import STEP_TASKS

    with stack.fleet([stack.station("CP-BUG")]):
        now = timezone.now()
        batch = start(
            ["CP-BUG"],
            window_start=(now + dt.timedelta(hours=1)).time(),
            window_end=(now + dt.timedelta(hours=2)).time(),
        )
        migration = batch.stations.get()
        # A snapshot no step writes (a list, not a dict): set_url raises on it, a bug.
        StationMigration.objects.filter(id=migration.id).update(
            state=State.SETTING_URL, config_snapshot=["bad"], free_slot="NetworkConnectionProfile2"
        )
        app.send_task(
            STEP_TASKS[State.SETTING_URL], args=[migration.id, "CP-BUG", State.SETTING_URL]
        )
        wait_until(
            lambda: StationMigration.objects.get(id=migration.id).state == State.FAILED,
            60,
            "the raising step to fail",
        )
    migration.refresh_from_db()
    assert migration.failed_step == State.SETTING_URL
    assert "AttributeError" in migration.reason and "(5 attempts)" in migration.reason
    assert migration.state_changes.filter(to_state=State.FAILED).count() == 1


def test_the_batch_page_says_when_no_worker_and_no_beat_run(admin_client, redis_client):
    from django.urls import reverse

    from fleet.models import ChargingStation

    source = CsmsBackend.objects.create(name="csms-1", url="ws://127.0.0.1:1/ocpp")
    CsmsBackend.objects.create(name="csms-2", url="ws://127.0.0.1:2/ocpp")
    ChargingStation.objects.create(identity="CP-PAGE", csms=source, firmware_version="4.2.85")
    batch = start(["CP-PAGE"])
    page = admin_client.get(reverse("admin:migrations_app_migrationbatch_change", args=[batch.id]))
    assert page.status_code == 200
    text = page.content.decode()
    assert 'id="stack-warnings"' in text
    assert "no worker" in text and "no beat" in text


def test_a_batch_keeps_one_scheduled_drive_whatever_asks_for_it(redis_client):
    from migrations_app.services.dispatch import drive_key, drive_ran, schedule_drive

    assert schedule_drive(4242, 20)
    assert not schedule_drive(4242, 25)  # one is already due before then
    assert schedule_drive(4242, 5)  # an earlier slot: sent
    assert 0 < redis_client.ttl(drive_key(4242, "next")) <= 15
    drive_ran(4242)  # not the one due: the schedule stands
    assert not schedule_drive(4242, 6)


def test_the_safety_drive_a_drive_asks_for_is_not_sent_again_and_again(redis_client):
    """Each drive asks for a safety drive 15 s on, stations that end ask for one at once:
    the safety drive already on its way covers the next drive's request."""
    from migrations_app.services.dispatch import drive_ran, schedule_drive

    assert schedule_drive(4343, 15)  # a drive's own safety net
    assert schedule_drive(4343, 0.2)  # a station ended: drive soon
    time.sleep(0.3)
    drive_ran(4343)  # the soon one runs...
    assert not schedule_drive(4343, 15)  # ...and its safety net is the one pending
    assert schedule_drive(4343, 0.2)  # the next station's end is sent again


def test_stations_ending_together_in_one_process_share_one_look_at_the_drive_schedule(
    redis_client,
):
    """drive_soon asks Redis once per coalescing window: the drive it knows is coming sees
    every station that ends before it runs; once it is due, the next end asks again."""
    from migrations_app.services.dispatch import DRIVE_COALESCE_SECONDS, drive_key, drive_soon

    drive_soon(4444)
    assert redis_client.exists(drive_key(4444, "next"))
    redis_client.delete(drive_key(4444, "next"), drive_key(4444, "last"))
    drive_soon(4444)  # the drive sent above is still to come: no look, nothing sent
    assert not redis_client.exists(drive_key(4444, "next"))
    time.sleep(DRIVE_COALESCE_SECONDS + 0.05)
    drive_soon(4444)  # that drive may have run: a station ending now needs another
    assert redis_client.exists(drive_key(4444, "next"))
