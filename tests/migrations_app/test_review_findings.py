"""Review of the issue-9 engine: races between a step task and the operator's controls.

Each test plays the operator's action at the moment a station's command is on its way (the
scripted station's answer), the way it happens in the field: the worker is waiting for the
station, the operator pauses or cancels in the admin, and the wake (or the rest of the
task's group) runs meanwhile.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

import pytest
from django.utils import timezone
from kombu.exceptions import OperationalError
from ocpp.v16 import call

from fleet.celery import app
from fleet.models import ChargingStation, CsmsBackend
from migrations_app.models import MigrationBatch, StateChange, StationMigration
from migrations_app.services import liveness, wakes
from migrations_app.services.batches import BatchOptions, batch_create, batch_drive
from migrations_app.services.controls import batch_cancel, batch_pause
from migrations_app.services.exchanges import station_link
from migrations_app.services.plan import PRIORITY, PROFILE_1, PROFILE_2
from migrations_app.services.runner import load_group, run_step
from migrations_app.tasks import _run_group, _send_followups
from ocpp_gateway.envelopes import Reply
from tests.migrations_app.links import Firmware, ScriptedStation, no_answer

State = StationMigration.State
SOURCE, TARGET = "csms-1", "csms-2"
SOURCE_URL, TARGET_URL = "ws://old/ocpp", "ws://new/ocpp"
ORIGINAL = {PROFILE_1: SOURCE_URL, PROFILE_2: "", PRIORITY: f"{PROFILE_1},{PROFILE_2}"}
NEW_PRIORITY = f"{PROFILE_2},{PROFILE_1}"
# What the station holds once set_url ran.
URL_SET = {**ORIGINAL, PROFILE_2: TARGET_URL}


def _batch(identities: list[str], state: str, **options: Any) -> MigrationBatch:
    source = CsmsBackend.objects.create(name=SOURCE, url=SOURCE_URL, open_admission=True)
    target = CsmsBackend.objects.create(name=TARGET, url=TARGET_URL, open_admission=True)
    stations = [
        ChargingStation.objects.create(identity=identity, csms=source, connected=True)
        for identity in identities
    ]
    batch = batch_create(target=target, stations=stations, options=BatchOptions(**options))
    StationMigration.objects.filter(batch=batch).update(
        state=state,
        config_snapshot=ORIGINAL,
        active_slot=PROFILE_1,
        free_slot=PROFILE_2,
        original_priority=ORIGINAL[PRIORITY],
    )
    return batch


@dataclass
class Stations:
    """A link to several scripted stations, by identity."""

    stations: dict[str, ScriptedStation] = field(default_factory=dict)

    def call(
        self, identity: str, request: Any, *, timeout: float, csms: str, claimed_id: str = ""
    ) -> Reply:
        return self.stations[identity].call(
            identity, request, timeout=timeout, csms=csms, claimed_id=claimed_id
        )


def _priority_writes(station: ScriptedStation) -> list[str]:
    return [
        sent.request.value
        for sent in station.sent
        if isinstance(sent.request, call.ChangeConfiguration) and sent.request.key == PRIORITY
    ]


@pytest.mark.django_db
def test_a_pause_during_a_group_holds_the_groups_later_stations_before_they_are_armed(
    redis_client,
):
    """The operator (or the brake) pauses the batch while the first station of a
    set_priority group waits for its answer: the other stations of the group must be held
    (SETTING_PRIORITY is stoppable), not armed and then reset after the pause."""
    batch = _batch(["CP-1", "CP-2"], State.SETTING_PRIORITY)
    first = Firmware(URL_SET)

    def first_station(request: Any) -> Any:
        if isinstance(request, call.ChangeConfiguration) and request.key == PRIORITY:
            batch_pause(batch_id=batch.id, user=None, reason="looks wrong")
        return first(request)

    second = Firmware(URL_SET)
    link = Stations(
        {
            "CP-1": ScriptedStation(first_station, csms=SOURCE),
            "CP-2": ScriptedStation(second, csms=SOURCE),
        }
    )
    group = list(
        batch.stations.order_by("station__identity").values_list("id", "station__identity")
    )

    with station_link(link):
        _run_group("review@host", State.SETTING_PRIORITY, group)

    held = StationMigration.objects.get(batch=batch, station__identity="CP-2")
    assert _priority_writes(link.stations["CP-2"]) == [], "armed after the batch was paused"
    assert held.state == State.SETTING_PRIORITY
    assert second.config[PRIORITY] == ORIGINAL[PRIORITY]


@pytest.mark.django_db
def test_a_cancel_while_the_priority_write_is_on_its_way_leaves_a_working_first_profile(
    redis_client,
):
    """Pause, then cancel, while set_priority waits for the station's answer. The cancel of
    the paused batch wakes the station (wakes.wake_held): that second run finds the batch
    cancelled in SETTING_PRIORITY and puts back only the free slot (priority=False),
    although the first run's priority write reached the station. The station must not end
    with its first profile blank."""
    batch = _batch(["CP-1"], State.SETTING_PRIORITY)
    migration = batch.stations.get()
    firmware = Firmware(URL_SET)
    writes: list[str] = []

    def station(request: Any) -> Any:
        answer = firmware(request)  # the station takes the write; its answer is on its way
        if isinstance(request, call.ChangeConfiguration) and request.key == PRIORITY:
            writes.append(request.value)
            if len(writes) == 1:
                batch_pause(batch_id=batch.id, user=None)
                batch_cancel(batch_id=batch.id, user=None)
                # What wake_held sent on the cancel's commit: the station's step, run now.
                run_step(migration.id, State.SETTING_PRIORITY)
        return answer

    with station_link(ScriptedStation(station, csms=SOURCE)):
        run_step(migration.id, State.SETTING_PRIORITY)

    migration.refresh_from_db()
    first_profile = firmware.config[PRIORITY].split(",")[0]
    assert migration.state == State.CANCELLED
    assert firmware.config[first_profile], (
        f"{PRIORITY}={firmware.config[PRIORITY]} names a blank {first_profile} first: "
        f"{firmware.config}"
    )


@pytest.mark.django_db
def test_a_station_found_offline_by_a_run_that_read_the_batch_before_its_cancel_is_not_left_waiting(
    redis_client,
):
    """A step task's group was loaded while the batch ran; the batch is cancelled before the
    station's pre-flight runs, and the station is offline: it is queued until it reconnects
    (WAITING_ONLINE) in a cancelled batch, where nothing moves it again: it stays live for
    ever, and the one-live-migration constraint keeps the station out of every new batch."""
    batch = _batch(["CP-1"], State.PREFLIGHT, offline_wait_seconds=600)
    migration = batch.stations.get()
    ChargingStation.objects.filter(id=migration.station_id).update(connected=False)
    loaded = load_group([migration.id])  # the task's group, read while the batch runs

    batch_cancel(batch_id=batch.id, user=None)
    run_step(migration.id, State.PREFLIGHT, loaded.get(migration.id))
    # Whatever drives the batch afterwards (the drive asked for by the move, the beat).
    batch_drive(batch_id=batch.id, scheduled=False)

    migration.refresh_from_db()
    assert migration.state in {State.CANCELLED}, (
        f"left {migration.state} in a cancelled batch: "
        f"{list(StateChange.objects.filter(migration=migration).values_list('to_state', 'reason'))}"
    )


@pytest.mark.django_db
def test_a_cancelled_batch_s_drive_cancels_a_station_queued_after_the_cancel(redis_client):
    """The narrower race behind the test above: the step re-read the batch (running), then
    the cancel committed, then the step queued the offline station. The cancelled batch's
    next drive (the one the move asked for) must cancel it, with its history."""
    batch = _batch(["CP-1"], State.WAITING_ONLINE)
    MigrationBatch.objects.filter(id=batch.id).update(state=MigrationBatch.State.CANCELLED)

    batch_drive(batch_id=batch.id)

    migration = batch.stations.get()
    assert migration.state == State.CANCELLED
    assert list(migration.state_changes.values_list("from_state", "to_state", "reason")) == [
        (State.WAITING_ONLINE, State.CANCELLED, "batch cancelled")
    ]


@pytest.mark.django_db
def test_a_resume_does_not_wake_a_step_a_live_worker_is_running(redis_client):
    """wake_held sends the held stations' steps; one whose step runs on a live worker right
    now is not held, and a second run beside it would send its command twice."""
    batch = _batch(["CP-1", "CP-2"], State.SETTING_URL)
    running, _ = batch.stations.order_by("station__identity")
    liveness.heartbeat("review@host")
    liveness.steps_started("review@host", [running.id])
    try:
        assert wakes.wake_held(batch.id) == 1
    finally:
        liveness.forget_worker("review@host")


# Transactional: a task runs in autocommit, where the send happens inside enqueue_steps.
@pytest.mark.django_db(transaction=True)
def test_followups_that_could_not_be_sent_leave_no_timer_that_would_skip_a_wake(
    redis_client, monkeypatch
):
    """A waiting step notes its timer's due time, then sends it with the group's other
    followups. When the broker refuses the send, the note must go: a wake meanwhile would
    otherwise skip the station for a timer that never comes (it would wait for the lease)."""
    batch = _batch(["CP-1"], State.AWAITING_BOOT)
    migration = batch.stations.get()
    assert wakes.timer_needed(migration.id, State.AWAITING_BOOT, 30)

    def broker_down(*args: Any, **kwargs: Any) -> None:
        raise OperationalError("Error 111 connecting to the broker")

    # The broker's refusal as kombu raises it; the test's broker itself must stay up.
    monkeypatch.setattr(app, "send_task", broker_down)
    with pytest.raises(OperationalError):
        _send_followups({(State.AWAITING_BOOT, 30.0): [(migration.id, "CP-1")]})

    assert wakes.timer_needed(migration.id, State.AWAITING_BOOT, 30), "the wake was skipped"


@pytest.mark.django_db
@pytest.mark.parametrize("stop", ["schedule_end", "cancel"])
def test_a_station_stopped_in_setting_url_after_a_lost_answer_gets_its_free_slot_back(
    redis_client, stop
):
    """The station stores the target URL in its free slot (its fallback profile) but the
    answer is lost, so the step waits to try again. If the batch's schedule ends or it is
    cancelled meanwhile, the station must not keep the target URL there: its own fallback
    could take it to the target later while the record says cancelled."""
    batch = _batch(["CP-1"], State.SETTING_URL, ends_at=timezone.now() + dt.timedelta(hours=1))
    migration = batch.stations.get()
    firmware = Firmware(ORIGINAL)

    def station(request: Any) -> Any:
        answer = firmware(request)
        if isinstance(request, call.ChangeConfiguration) and request.value == TARGET_URL:
            return no_answer()  # taken, but the answer never arrives
        return answer

    with station_link(ScriptedStation(station, csms=SOURCE)):
        run_step(migration.id, State.SETTING_URL)
        assert firmware.config[PROFILE_2] == TARGET_URL
        assert StationMigration.objects.get(id=migration.id).state == State.SETTING_URL
        if stop == "cancel":
            batch_cancel(batch_id=batch.id, user=None)
        else:
            MigrationBatch.objects.filter(id=batch.id).update(ends_at=timezone.now())
        run_step(migration.id, State.SETTING_URL)

    migration.refresh_from_db()
    assert migration.state == State.CANCELLED
    assert migration.reason.endswith(f"; {PROFILE_2} restored")
    assert firmware.config == ORIGINAL
