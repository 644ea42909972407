"""Step handlers against a scripted station at the network edge (tests/migrations_app/links.py).

Fast: no gateway, worker or simulator; the handler runs in this process and every exchange it
makes is recorded as in production. Verification and the Reset read the last boot (and the
gateways' liveness) from Redis, so those tests use the test session's redis-server; the boot
record itself is given either as the gateway writes it (the Redis hash) or as ingestion does
(StationEvent rows, the durable record). The end-to-end tests beside these run the same steps
through the whole stack.

What is pinned are the safety rules: a rollback only ever goes through the source, stops at
the first refusal and says so; "verified" needs an accepted boot on the target from the same
hardware, a settle time, and the new profile first in an answer through the target; a Reset
is never sent twice.
"""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
from django.utils import timezone
from ocpp.v16 import call, call_result
from ocpp.v16.enums import ConfigurationStatus, ResetStatus, ResetType
from redis import RedisError

from fleet.models import ChargingStation, CsmsBackend, StationEvent
from migrations_app.models import StateChange, StationMigration
from migrations_app.services.batches import BatchOptions, batch_create
from migrations_app.services.exchanges import station_link
from migrations_app.services.liveness import gateway_channels
from migrations_app.services.plan import PRIORITY, PROFILE_1, PROFILE_2
from migrations_app.services.runner import run_step, step_raised
from migrations_app.services.steps import (
    cleanup,
    reset,
    restore,
    set_priority,
    verify_boot,
    wait_idle,
)
from ocpp_gateway.client import CommandNotSent, CommandRevoked, claim_command
from ocpp_gateway.envelopes import EventKind, claim_key, last_boot_key
from tests.migrations_app.links import (
    REJECTED,
    Firmware,
    ScriptedStation,
    call_error,
    no_answer,
    rejecting,
)

State = StationMigration.State
SOURCE, TARGET = "csms-1", "csms-2"
SOURCE_URL, TARGET_URL = "ws://old/ocpp", "ws://new/ocpp"
ORIGINAL = {PROFILE_1: SOURCE_URL, PROFILE_2: "", PRIORITY: f"{PROFILE_1},{PROFILE_2}"}
NEW_PRIORITY = f"{PROFILE_2},{PROFILE_1}"
# What the station holds once set_url and set_priority ran.
ARMED = {**ORIGINAL, PROFILE_2: TARGET_URL, PRIORITY: NEW_PRIORITY}
HARDWARE = {"vendor": "ACME", "model": "X1", "serial": "SN-1"}
OTHER_HARDWARE = {**HARDWARE, "serial": "SN-OTHER"}
# The rollback after the Reset: the priority, then the free slot, through the source only.
ROLLBACK = [
    (call.ChangeConfiguration(key=PRIORITY, value=ORIGINAL[PRIORITY]), SOURCE),
    (call.ChangeConfiguration(key=PROFILE_2, value=""), SOURCE),
]
RESTORED = f"; {PRIORITY} and {PROFILE_2} restored"


def _migration(state: str, **fields: object) -> StationMigration:
    """A migration of CP-1 from csms-1 to csms-2 that has read the original configuration."""
    source = CsmsBackend.objects.create(name=SOURCE, url=SOURCE_URL)
    target = CsmsBackend.objects.create(name=TARGET, url=TARGET_URL, open_admission=True)
    station = ChargingStation.objects.create(identity="CP-1", csms=source, connected=True)
    batch = batch_create(target=target, stations=[station], options=BatchOptions())
    read = {
        "config_snapshot": ORIGINAL,
        "active_slot": PROFILE_1,
        "free_slot": PROFILE_2,
        "original_priority": ORIGINAL[PRIORITY],
        "expected_hardware": HARDWARE,
    }
    StationMigration.objects.filter(batch=batch).update(state=state, **{**read, **fields})
    return _reload_migration(batch_id=batch.id)


def _reload_migration(**lookup: Any) -> StationMigration:
    return StationMigration.objects.select_related("batch__target", "source", "station").get(
        **lookup
    )


def _reload(m: StationMigration) -> StationMigration:
    return _reload_migration(id=m.id)


def _sent(station: ScriptedStation) -> list[tuple[Any, str]]:
    return [(sent.request, sent.csms) for sent in station.sent]


def _recorded(m: StationMigration) -> list[tuple[str, str, str, str]]:
    return list(m.exchanges.order_by("id").values_list("step", "action", "csms", "outcome"))


# --- restore -----------------------------------------------------------------------------


@pytest.mark.django_db
def test_restore_writes_the_priority_then_the_free_slot_through_the_source_only():
    migration = _migration(State.RESETTING)
    firmware = Firmware(ARMED)
    station = ScriptedStation(firmware, csms=SOURCE)

    with station_link(station):
        said = restore(migration, State.RESETTING, priority=True)

    assert said == RESTORED
    assert firmware.config == ORIGINAL
    assert _sent(station) == ROLLBACK
    assert _recorded(migration) == [
        (f"{State.RESETTING}:rollback", "ChangeConfiguration", SOURCE, "result"),
        (f"{State.RESETTING}:rollback", "ChangeConfiguration", SOURCE, "result"),
    ]


@pytest.mark.django_db
def test_restore_takes_reboot_required_as_restored():
    migration = _migration(State.WAITING_IDLE)
    reboot_required = call_result.ChangeConfiguration(status=ConfigurationStatus.reboot_required)
    station = ScriptedStation(Firmware(ARMED, refuse=lambda request: reboot_required), csms=SOURCE)

    with station_link(station):
        said = restore(migration, State.WAITING_IDLE, priority=True)

    assert said == RESTORED


@pytest.mark.django_db
@pytest.mark.parametrize(
    "answer, told",
    [
        (REJECTED, "station answered Rejected"),
        (call_error("InternalError", "flash full"), "CALLERROR InternalError: flash full"),
        (no_answer("no gateway replied within 5.0s"), "no answer (no gateway replied"),
    ],
)
def test_restore_stops_at_a_refused_priority_and_leaves_the_free_slot(answer, told):
    # A priority naming a blank profile would be worse than the new URL left in the slot.
    migration = _migration(State.WAITING_IDLE)
    firmware = Firmware(ARMED, refuse=rejecting(PRIORITY, answer=answer))
    station = ScriptedStation(firmware, csms=SOURCE)

    with station_link(station):
        said = restore(migration, State.WAITING_IDLE, priority=True)

    assert said.startswith(f"; ROLLBACK INCOMPLETE: {PRIORITY} not restored: ")
    assert told in said
    assert _sent(station) == ROLLBACK[:1]
    assert firmware.config == ARMED
    assert [step for step, *_ in _recorded(migration)] == [f"{State.WAITING_IDLE}:rollback"]


@pytest.mark.django_db
def test_restore_says_which_write_was_refused_when_the_free_slot_is():
    migration = _migration(State.WAITING_IDLE)
    firmware = Firmware(ARMED, refuse=rejecting(PROFILE_2))
    station = ScriptedStation(firmware, csms=SOURCE)

    with station_link(station):
        said = restore(migration, State.WAITING_IDLE, priority=True)

    assert said == f"; ROLLBACK INCOMPLETE: {PROFILE_2} not restored: station answered Rejected"
    assert _sent(station) == ROLLBACK
    assert firmware.config == {**ARMED, PRIORITY: ORIGINAL[PRIORITY]}


@pytest.mark.django_db
def test_restore_never_reaches_a_station_on_the_target():
    # The station is on csms-2: the rollback is addressed to csms-1, whose gateways do not
    # hold it, and nothing is written.
    migration = _migration(State.AWAITING_BOOT, reset_sent_at=time.time())
    firmware = Firmware(ARMED)
    station = ScriptedStation(firmware, csms=TARGET)

    with station_link(station):
        said = restore(migration, State.AWAITING_BOOT, priority=True)

    assert said.startswith(f"; ROLLBACK INCOMPLETE: {PRIORITY} not restored: disconnected")
    assert _sent(station) == ROLLBACK[:1]
    assert firmware.config == ARMED
    assert _recorded(migration) == [
        (f"{State.AWAITING_BOOT}:rollback", "ChangeConfiguration", TARGET, "disconnected")
    ]


@pytest.mark.django_db
@pytest.mark.parametrize("failure", ["offline", "redis"])
def test_restore_through_an_unreachable_source_says_rollback_incomplete(failure):
    migration = _migration(State.WAITING_IDLE)
    firmware = Firmware(ARMED)
    if failure == "offline":
        station = ScriptedStation(firmware, csms="")
        outcome = "offline"
    else:

        def redis_fails(request: object) -> object:
            raise RedisError("connection reset")

        station = ScriptedStation(redis_fails, csms=SOURCE)
        outcome = "unknown"

    with station_link(station):
        said = restore(migration, State.WAITING_IDLE, priority=True)

    assert said.startswith(f"; ROLLBACK INCOMPLETE: {PRIORITY} not restored: ")
    assert _sent(station) == ROLLBACK[:1]
    assert firmware.config == ARMED
    assert _recorded(migration) == [
        (f"{State.WAITING_IDLE}:rollback", "ChangeConfiguration", "", outcome)
    ]


@pytest.mark.django_db
def test_restore_without_a_source_sends_nothing_and_says_so():
    migration = _migration(State.WAITING_IDLE)
    migration.source = None
    station = ScriptedStation(Firmware(ARMED), csms=SOURCE)

    with station_link(station):
        said = restore(migration, State.WAITING_IDLE, priority=True)

    assert said == "; ROLLBACK INCOMPLETE: no source CSMS to send it through"
    assert station.sent == []


@pytest.mark.django_db
def test_restore_with_nothing_written_sends_nothing():
    # The free slot held the target URL before the migration, and the priority is not to be
    # restored (cancelled before set_priority wrote it).
    migration = _migration(
        State.SETTING_PRIORITY, config_snapshot={**ORIGINAL, PROFILE_2: TARGET_URL}
    )
    station = ScriptedStation(Firmware(ARMED), csms=SOURCE)

    with station_link(station):
        said = restore(migration, State.SETTING_PRIORITY, priority=False)

    assert said == ""
    assert station.sent == []
    assert not migration.exchanges.exists()


@pytest.mark.django_db
def test_a_rejected_priority_is_rolled_back_through_the_source_and_both_writes_recorded():
    # The URL is already in the free slot (set_url ran): the rollback blanks it again.
    migration = _migration(State.SETTING_PRIORITY)
    firmware = Firmware(
        {**ORIGINAL, PROFILE_2: TARGET_URL}, refuse=rejecting(PRIORITY, unless=ORIGINAL[PRIORITY])
    )
    station = ScriptedStation(firmware, csms=SOURCE)

    with station_link(station):
        next_ = set_priority(migration)

    assert next_.state == State.FAILED
    assert next_.reason == (
        "the station did not accept the new priority (station answered Rejected); "
        f"{PRIORITY} and {PROFILE_2} restored"
    )
    assert firmware.config == ORIGINAL
    # The priority asked of whichever gateway holds the station; the rollback only ever
    # through the source.
    assert _sent(station) == [
        (call.ChangeConfiguration(key=PRIORITY, value=NEW_PRIORITY), ""),
        *ROLLBACK,
    ]
    recorded = list(
        migration.exchanges.order_by("id").values_list(
            "step", "action", "request", "csms", "outcome", "sent", "response"
        )
    )
    assert recorded == [
        (
            State.SETTING_PRIORITY,
            "ChangeConfiguration",
            {"key": PRIORITY, "value": NEW_PRIORITY},
            SOURCE,
            "result",
            True,
            {"status": "Rejected"},
        ),
        (
            f"{State.SETTING_PRIORITY}:rollback",
            "ChangeConfiguration",
            {"key": PRIORITY, "value": ORIGINAL[PRIORITY]},
            SOURCE,
            "result",
            True,
            {"status": "Accepted"},
        ),
        (
            f"{State.SETTING_PRIORITY}:rollback",
            "ChangeConfiguration",
            {"key": PROFILE_2, "value": ""},
            SOURCE,
            "result",
            True,
            {"status": "Accepted"},
        ),
    ]


# --- waiting for the station to be idle --------------------------------------------------


def _connectors(m: StationMigration, **statuses: str) -> None:
    """Ingested StatusNotifications: connector id (c0, c1, ...) -> status."""
    ChargingStation.objects.filter(id=m.station_id).update(
        connector_status={
            key.removeprefix("c"): {"status": status, "error_code": "NoError", "at": "x"}
            for key, status in statuses.items()
        }
    )


@pytest.mark.django_db
@pytest.mark.parametrize("status", ["Charging", "SuspendedEV", "SuspendedEVSE", "Preparing"])
def test_wait_idle_stays_while_a_connector_is_busy(status):
    migration = _migration(State.WAITING_IDLE)
    _connectors(migration, c0="Available", c1="Available", c2=status)
    station = ScriptedStation(Firmware(ARMED), csms=SOURCE)

    with station_link(station):
        next_ = wait_idle(migration)

    assert next_.state is None
    assert station.sent == []


@pytest.mark.django_db
def test_wait_idle_goes_on_to_the_reset_when_every_connector_is_idle():
    # Connector 0 is the station itself, not a socket a car is plugged into.
    migration = _migration(State.WAITING_IDLE)
    _connectors(migration, c0="Charging", c1="Available", c2="Finishing", c3="Faulted")
    station = ScriptedStation(Firmware(ARMED), csms=SOURCE)

    with station_link(station):
        next_ = wait_idle(migration)

    assert next_.state == State.RESETTING
    assert station.sent == []


@pytest.mark.django_db
def test_wait_idle_past_its_time_fails_and_rolls_back_through_the_source():
    migration = _migration(State.WAITING_IDLE, wait_until=timezone.now() - timedelta(seconds=1))
    migration.batch.idle_wait_seconds = 0
    _connectors(migration, c1="Charging", c2="Available")
    firmware = Firmware(ARMED)
    station = ScriptedStation(firmware, csms=SOURCE)

    with station_link(station):
        next_ = wait_idle(migration)

    assert next_.state == State.FAILED
    assert next_.fields["failed_step"] == State.WAITING_IDLE
    assert next_.fields["failure_kind"] == StationMigration.FailureKind.BUSY
    assert next_.reason.startswith("busy: a charging session was still in progress")
    assert "(connectors 1)" in next_.reason
    assert next_.reason.endswith(RESTORED)
    assert _sent(station) == ROLLBACK
    assert firmware.config == ORIGINAL


# --- the Reset ---------------------------------------------------------------------------


@pytest.fixture
def target_gateway_up(redis_client: redis.Redis):
    """A gateway of csms-2 connected to Redis, as gateway_up() sees one."""
    pubsub = redis_client.pubsub()
    pubsub.subscribe(gateway_channels(TARGET).replace("*", uuid.uuid4().hex))
    pubsub.get_message(timeout=1)  # the subscription is confirmed
    yield
    pubsub.close()


RESET = (call.Reset(type=ResetType.hard), "")


@pytest.mark.django_db
@pytest.mark.parametrize("sent_ago", [0.0, 3600.0])
def test_a_reset_sent_by_an_earlier_run_is_never_sent_again(sent_ago):
    migration = _migration(State.RESETTING, reset_sent_at=time.time() - sent_ago)
    station = ScriptedStation(Firmware(ARMED), csms=SOURCE)

    with station_link(station):
        next_ = reset(migration)

    assert station.sent == []
    if sent_ago:
        assert next_.state == State.AWAITING_BOOT
        assert "answer was lost" in next_.reason
    else:  # that run may still be waiting for the station's answer
        assert next_.state is None


@pytest.mark.django_db
@pytest.mark.parametrize("claim", ["unpublished", "published to nobody"])
def test_a_reset_claimed_by_a_run_that_died_before_publishing_is_sent_once_by_the_next(
    redis_client, target_gateway_up, claim
):
    """The worker claimed the Reset and died before a gateway got it: the next run takes the
    claim back and sends the Reset; the dead run's id can never be published after that."""
    claimed = claim_command(redis_client, ttl=60)
    if claim == "published to nobody":
        redis_client.set(claim_key(claimed), "nobody", keepttl=True)
    migration = _migration(State.RESETTING, reset_sent_at=time.time() - 5, reset_command_id=claimed)
    accepted = call_result.Reset(status=ResetStatus.accepted)
    station = ScriptedStation(Firmware(ARMED, answers={call.Reset: accepted}), csms=SOURCE)

    with station_link(station):
        run_step(migration.id, State.RESETTING)
        # A redelivered run of the same step, on what it read before the first one moved.
        again = reset(migration)
        # The dead run, had it only been slow, publishing its claimed Reset now.
        late = CommandRevoked if claim == "unpublished" else RedisError
        with pytest.raises(late):
            station.call(
                "CP-1", call.Reset(type=ResetType.hard), timeout=5, csms="", claimed_id=claimed
            )

    moved = _reload(migration)
    assert moved.state == State.AWAITING_BOOT and moved.reset_accepted
    assert moved.reset_command_id not in ("", claimed)
    assert again.state is None
    assert _sent(station) == [RESET]
    # The dead run's claim can no longer be published.
    assert redis_client.get(claim_key(claimed)) == (
        b"revoked" if claim == "unpublished" else b"nobody"
    )
    assert _recorded(migration) == [
        (State.RESETTING, "Reset", "", "not_sent"),
        (State.RESETTING, "Reset", SOURCE, "result"),
    ]
    taken_back = migration.exchanges.order_by("id").first()
    assert (taken_back.command_id, taken_back.sent) == (claimed, False)
    assert "never reached a gateway" in taken_back.error_description


@pytest.mark.django_db
def test_a_reset_whose_claim_lapsed_before_the_publish_is_claimed_anew_and_sent_once(
    redis_client, target_gateway_up
):
    """Redis restarted (or its claim expired) between this run's claim and its publish:
    nothing was published, so the run gives its claim back and a retry sends the Reset."""
    accepted = call_result.Reset(status=ResetStatus.accepted)
    station = ScriptedStation(Firmware(ARMED, answers={call.Reset: accepted}), csms=SOURCE)
    migration = _migration(State.RESETTING)
    lapsing = station._publish_claimed

    def lapse_then_publish(claimed_id: str) -> None:
        redis_client.delete(claim_key(claimed_id))
        station._publish_claimed = lapsing  # the retry's claim stands
        lapsing(claimed_id)

    station._publish_claimed = lapse_then_publish
    with station_link(station):
        with pytest.raises(CommandNotSent, match="does not stand"):
            reset(migration)
        assert _reload(migration).reset_sent_at is None  # given back: nothing went out
        next_ = reset(_reload(migration))

    assert next_.state == State.AWAITING_BOOT
    assert _sent(station) == [RESET]


@pytest.mark.django_db
def test_a_reset_whose_publish_redis_failed_under_is_settled_by_its_claim(
    redis_client, target_gateway_up
):
    """Redis failed before the publish was confirmed: the station stays claimed, and the
    next run finds the claim unpublished, sends the Reset, and corrects the first record."""
    accepted = call_result.Reset(status=ResetStatus.accepted)
    station = ScriptedStation(Firmware(ARMED, answers={call.Reset: accepted}), csms=SOURCE)
    migration = _migration(State.RESETTING)
    publish = station._publish_claimed

    def redis_fails(claimed_id: str) -> None:
        raise RedisError("connection reset before the script ran")

    station._publish_claimed = redis_fails
    with station_link(station):
        stays = reset(migration)
        station._publish_claimed = publish
        StationMigration.objects.filter(id=migration.id).update(reset_sent_at=time.time() - 5)
        next_ = reset(_reload(migration))

    assert (stays.state, next_.state) == (None, State.AWAITING_BOOT)
    assert _sent(station) == [RESET]
    assert _recorded(migration) == [
        (State.RESETTING, "Reset", "", "not_sent"),
        (State.RESETTING, "Reset", SOURCE, "result"),
    ]
    corrected = migration.exchanges.order_by("id").first()
    assert corrected.sent is False
    assert corrected.error_description.startswith("never reached a gateway")


@pytest.mark.django_db
@pytest.mark.parametrize("claim", ["published", "taken on another Redis server", "expired"])
@pytest.mark.parametrize("claimed_ago", [0.0, 3600.0])
def test_a_reset_claim_that_may_have_been_published_is_never_sent_again(
    redis_client, target_gateway_up, claim, claimed_ago
):
    """Published, or nothing can tell (a Redis restart or failover may have lost the mark):
    the Reset may be on its way. Wait for the answer, then for the boot; never resend."""
    claimed = claim_command(redis_client, ttl=60)
    if claim == "published":
        redis_client.set(claim_key(claimed), "published", keepttl=True)
    elif claim == "taken on another Redis server":
        redis_client.set(claim_key(claimed), "claimed:another-run:another-replid", ex=60)
    else:
        redis_client.delete(claim_key(claimed))
    migration = _migration(
        State.RESETTING, reset_sent_at=time.time() - claimed_ago, reset_command_id=claimed
    )
    station = ScriptedStation(Firmware(ARMED), csms=SOURCE)

    with station_link(station):
        next_ = reset(migration)

    assert station.sent == []
    assert _reload(migration).reset_command_id == claimed
    if claimed_ago:
        assert next_.state == State.AWAITING_BOOT
        assert next_.reason == "Reset may have been sent earlier; its answer was lost"
    else:  # that run may still be waiting for the station's answer
        assert next_.state is None


@pytest.mark.django_db
def test_a_lost_reset_answer_awaits_the_boot_and_a_redelivered_step_sends_no_second_reset(
    target_gateway_up,
):
    migration = _migration(State.RESETTING)
    firmware = Firmware(ARMED, answers={call.Reset: no_answer()})
    station = ScriptedStation(firmware, csms=SOURCE)

    with station_link(station):
        run_step(migration.id, State.RESETTING)
        # A redelivered task of the same step, and the handler run on what that task read.
        run_step(migration.id, State.RESETTING, loaded=migration)
        again = reset(_reload(migration))

    moved = _reload(migration)
    assert moved.state == State.AWAITING_BOOT
    assert moved.reset_sent_at is not None
    [change] = StateChange.objects.filter(migration=migration, from_state=State.RESETTING)
    assert change.to_state == State.AWAITING_BOOT
    assert change.reason.startswith("Reset answer lost (no answer")
    assert again.state != State.FAILED
    assert _sent(station) == [RESET]
    assert _recorded(migration) == [(State.RESETTING, "Reset", SOURCE, "timeout")]


@pytest.mark.django_db
def test_an_accepted_reset_claims_the_reset_and_awaits_the_boot(target_gateway_up):
    migration = _migration(State.RESETTING)
    accepted = call_result.Reset(status=ResetStatus.accepted)
    station = ScriptedStation(Firmware(ARMED, answers={call.Reset: accepted}), csms=SOURCE)

    with station_link(station):
        next_ = reset(migration)
        again = reset(_reload(migration))

    assert next_.state == State.AWAITING_BOOT
    assert again.state is None
    assert _reload(migration).reset_sent_at is not None
    assert _sent(station) == [RESET]


@pytest.mark.django_db
def test_a_refused_reset_fails_and_rolls_back_through_the_source(target_gateway_up):
    migration = _migration(State.RESETTING)
    rejected = call_result.Reset(status=ResetStatus.rejected)
    firmware = Firmware(ARMED, answers={call.Reset: rejected})
    station = ScriptedStation(firmware, csms=SOURCE)

    with station_link(station):
        next_ = reset(migration)

    assert next_.state == State.FAILED
    assert next_.reason == "the station refused the Reset (station answered Rejected)" + RESTORED
    assert _sent(station) == [RESET, *ROLLBACK]
    assert firmware.config == ORIGINAL


@pytest.mark.django_db
def test_a_session_started_since_the_idle_check_sends_no_reset():
    migration = _migration(State.RESETTING)
    _connectors(migration, c1="Charging")
    station = ScriptedStation(Firmware(ARMED), csms=SOURCE)

    with station_link(station):
        next_ = reset(migration)

    assert next_.state == State.WAITING_IDLE
    assert station.sent == []
    assert _reload(migration).reset_sent_at is None


# --- verification ------------------------------------------------------------------------

# The station's boot on the source before the Reset (what the Reset's boot marks name).
BOOTED_BEFORE = time.time() - 3600


@pytest.fixture
def awaiting_boot(redis_client: redis.Redis):
    """A migration whose Reset went out a moment ago, the source's earlier boot in Redis."""

    def make(**fields: object) -> StationMigration:
        migration = _migration(
            State.AWAITING_BOOT,
            reset_sent_at=time.time() - 5,
            reset_accepted=True,
            boot_marks={SOURCE: {"event_id": "boot-before", "at": BOOTED_BEFORE}, TARGET: {}},
            **fields,
        )
        before = {**HARDWARE, "status": "Accepted", "event_id": "boot-before"}
        redis_client.hset(
            last_boot_key(SOURCE), "CP-1", json.dumps({**before, "at": BOOTED_BEFORE})
        )
        return migration

    return make


def _booted(
    redis_client: redis.Redis,
    csms: str,
    *,
    status: str = "Accepted",
    hardware: dict[str, str] = HARDWARE,
    reason: str = "",
    ago: float = 1.0,
    recorded_by: str = "ingestion",
) -> None:
    """The station (or whoever has its identity) booted on ``csms`` ``ago`` seconds ago: the
    gateway's record in Redis, or the StationEvent row ingestion writes."""
    at = time.time() - ago
    event_id = str(uuid.uuid4())
    data: dict[str, Any] = {**hardware, "status": status, **({"reason": reason} if reason else {})}
    if recorded_by == "gateway":
        record = {**data, "at": at, "event_id": event_id}
        redis_client.hset(last_boot_key(csms), "CP-1", json.dumps(record))
        return
    StationEvent.objects.create(
        event_id=event_id,
        station=ChargingStation.objects.get(identity="CP-1"),
        csms=CsmsBackend.objects.get(name=csms),
        kind=EventKind.BOOT.value,
        at=datetime.fromtimestamp(at, UTC),
        data=data,
    )


def _settled(m: StationMigration) -> StationMigration:
    """The settle time started by an earlier run has passed."""
    StationMigration.objects.filter(id=m.id).update(
        settle_until=timezone.now() - timedelta(seconds=1)
    )
    return _reload(m)


def _timed_out(m: StationMigration) -> StationMigration:
    """The batch's boot timeout has passed since the Reset."""
    StationMigration.objects.filter(id=m.id).update(
        reset_sent_at=time.time() - m.batch.boot_timeout_seconds - 1
    )
    return _reload(m)


def _security_events() -> list[dict[str, Any]]:
    return list(
        StationEvent.objects.filter(kind=EventKind.SECURITY.value).values_list("data", flat=True)
    )


@pytest.mark.django_db
@pytest.mark.parametrize("recorded_by", ["gateway", "ingestion"])
def test_an_accepted_boot_from_the_same_hardware_settles_then_is_confirmed_through_the_target(
    awaiting_boot, redis_client, recorded_by
):
    migration = awaiting_boot()
    _booted(redis_client, TARGET, recorded_by=recorded_by)
    station = ScriptedStation(Firmware(ARMED), csms=TARGET)

    with station_link(station):
        settling = verify_boot(migration)
        assert settling.state is None
        assert settling.fields["settle_until"] > timezone.now()
        assert station.sent == []  # nothing asked before the settle time
        next_ = verify_boot(_settled(migration))

    assert next_.state == State.VERIFIED
    assert next_.reason.startswith(f"BootNotification accepted on {TARGET}; still there after")
    assert f"answering {PRIORITY}={NEW_PRIORITY} through it" in next_.reason
    assert _sent(station) == [(call.GetConfiguration(key=[PRIORITY]), TARGET)]
    assert _recorded(migration) == [(State.AWAITING_BOOT, "GetConfiguration", TARGET, "result")]


@pytest.mark.django_db
@pytest.mark.parametrize(
    "config, answers, told",
    [
        (
            {**ARMED, PRIORITY: ORIGINAL[PRIORITY]},
            {},
            f"the station answers through {TARGET} with {PRIORITY}={ORIGINAL[PRIORITY]!r}, "
            f"not {PROFILE_2} first",
        ),
        (
            ARMED,
            {call.GetConfiguration: call_error("NotSupported")},
            f"the station is on {TARGET} but did not tell its priority "
            "(station answered CALLERROR NotSupported)",
        ),
    ],
    ids=["old priority", "no priority"],
)
def test_a_station_on_the_target_not_running_its_new_profile_fails_and_gets_nothing_through_it(
    awaiting_boot, redis_client, config, answers, told
):
    # A rollback through the target would cut off a station that is working there.
    migration = _settled(awaiting_boot())
    _booted(redis_client, TARGET)
    station = ScriptedStation(Firmware(config, answers=answers), csms=TARGET)

    with station_link(station):
        next_ = verify_boot(migration)

    assert next_.state == State.FAILED
    assert next_.reason == f"{told}; ROLLBACK INCOMPLETE: never sent through the target"
    assert _sent(station) == [(call.GetConfiguration(key=[PRIORITY]), TARGET)]


@pytest.mark.django_db
def test_a_station_gone_from_the_target_when_confirmed_is_rolled_back_through_the_source(
    awaiting_boot, redis_client
):
    # Accepted on the target, then fell back to the source during the settle time.
    migration = _settled(awaiting_boot())
    _booted(redis_client, TARGET)
    firmware = Firmware(ARMED)
    station = ScriptedStation(firmware, csms=SOURCE)

    with station_link(station):
        next_ = verify_boot(migration)

    assert next_.state == State.FAILED
    assert next_.reason == f"the station fell back to {SOURCE} after booting on {TARGET}" + (
        RESTORED
    )
    # The only command addressed to the target is the confirmation.
    assert _sent(station) == [
        (call.GetConfiguration(key=[PRIORITY]), TARGET),
        (call.GetConfiguration(key=[PRIORITY]), ""),
        *ROLLBACK,
    ]
    assert firmware.config == ORIGINAL
    assert [step for step, *_ in _recorded(migration)] == [
        State.AWAITING_BOOT,
        f"{State.AWAITING_BOOT}:locate",
        f"{State.AWAITING_BOOT}:rollback",
        f"{State.AWAITING_BOOT}:rollback",
    ]


@pytest.mark.django_db
@pytest.mark.parametrize(
    "booted_on_target, told",
    [
        (True, f"the station fell back to {SOURCE} after booting on {TARGET}"),
        (False, f"the station fell back to {SOURCE}: it booted there instead of on {TARGET}"),
    ],
)
def test_a_boot_on_the_source_after_the_reset_fails_with_the_rollback_through_the_source(
    awaiting_boot, redis_client, booted_on_target, told
):
    migration = awaiting_boot()
    if booted_on_target:
        _booted(redis_client, TARGET, ago=3)
    _booted(redis_client, SOURCE, ago=1)
    firmware = Firmware(ARMED)
    station = ScriptedStation(firmware, csms=SOURCE)

    with station_link(station):
        next_ = verify_boot(migration)

    assert next_.state == State.FAILED
    assert next_.reason == told + RESTORED
    assert _sent(station) == ROLLBACK  # nothing through the target
    assert firmware.config == ORIGINAL


@pytest.mark.django_db
def test_a_boot_from_other_hardware_is_never_verified_and_recorded_once(
    awaiting_boot, redis_client
):
    migration = awaiting_boot()
    _booted(redis_client, TARGET, hardware=OTHER_HARDWARE)
    # Whoever holds the identity on the target would answer with the new priority.
    firmware = Firmware(ARMED)
    station = ScriptedStation(firmware, csms=TARGET)

    with station_link(station):
        first = verify_boot(migration)
        # Re-driven on what the first run read, and on what it wrote; then settled.
        again = [verify_boot(migration), verify_boot(_reload(migration))]
        settled = verify_boot(_settled(migration))
        station.csms = SOURCE  # the real station is back on the source by its timeout
        last = verify_boot(_timed_out(migration))

    assert [first.state, *(each.state for each in again), settled.state] == [None] * 4
    assert last.state == State.FAILED
    assert last.reason.startswith(
        f"other hardware booted on {TARGET} as CP-1 (serial 'SN-OTHER', expected 'SN-1'); "
        "recorded as a security event"
    )
    assert last.reason.endswith(RESTORED)
    [event] = _security_events()
    assert event["seen"]["serial"] == "SN-OTHER"
    assert event["expected"] == HARDWARE
    assert event["migration_id"] == migration.id
    assert _sent(station) == ROLLBACK  # nothing ever asked through the target


@pytest.mark.django_db
@pytest.mark.parametrize(
    "hardware, security_events", [(HARDWARE, 0), (OTHER_HARDWARE, 1)], ids=["same", "other"]
)
def test_a_rejected_boot_on_the_target_waits_for_the_source_then_rolls_back(
    awaiting_boot, redis_client, hardware, security_events
):
    migration = awaiting_boot()
    _booted(redis_client, TARGET, status="Rejected", reason="not registered", hardware=hardware)
    firmware = Firmware(ARMED)
    station = ScriptedStation(firmware, csms=SOURCE)

    with station_link(station):
        waiting = verify_boot(migration)
        StationMigration.objects.filter(id=migration.id).update(**waiting.fields)
        _booted(redis_client, SOURCE)  # its profile fallback took it back
        next_ = verify_boot(_reload(migration))

    assert waiting.state is None
    assert next_.state == State.FAILED
    assert next_.reason.startswith("the target rejected the BootNotification (not registered)")
    assert next_.reason.endswith(RESTORED)
    assert len(_security_events()) == security_events
    assert _sent(station) == ROLLBACK


@pytest.mark.django_db
def test_a_pending_boot_waits_for_the_targets_verdict_until_the_boot_timeout(
    awaiting_boot, redis_client
):
    migration = awaiting_boot()
    _booted(redis_client, TARGET, status="Pending", reason="registry not loaded")
    firmware = Firmware(ARMED)
    station = ScriptedStation(firmware, csms=SOURCE)

    with station_link(station):
        waiting = verify_boot(migration)
        sent_while_waiting = list(station.sent)
        next_ = verify_boot(_timed_out(migration))

    assert waiting.state is None
    assert sent_while_waiting == []
    assert next_.state == State.FAILED
    assert next_.reason.startswith(
        "the target still answered the BootNotification Pending (registry not loaded)"
    )
    assert next_.reason.endswith(RESTORED)
    assert _sent(station) == ROLLBACK


@pytest.mark.django_db
def test_a_lost_boot_record_asks_the_station_where_it_is_and_confirms_it_on_the_target(
    awaiting_boot, redis_client
):
    migration = awaiting_boot()
    redis_client.delete(last_boot_key(SOURCE))  # Redis lost its data
    station = ScriptedStation(Firmware(ARMED), csms=TARGET)

    with station_link(station):
        located = verify_boot(migration)
        assert located.state is None
        StationMigration.objects.filter(id=migration.id).update(**located.fields)
        next_ = verify_boot(_settled(migration))

    assert next_.state == State.VERIFIED
    assert next_.reason.startswith(
        f"boot record lost; confirmed through the target: found on {TARGET}"
    )
    assert _sent(station) == [
        (call.GetConfiguration(key=[PRIORITY]), ""),  # through whichever gateway holds it
        (call.GetConfiguration(key=[PRIORITY]), TARGET),
    ]
    assert [step for step, *_ in _recorded(migration)] == [
        f"{State.AWAITING_BOOT}:locate",
        State.AWAITING_BOOT,
    ]


@pytest.mark.django_db
def test_a_lost_boot_record_and_other_hardware_answering_on_the_target_is_never_verified(
    awaiting_boot, redis_client
):
    migration = awaiting_boot()
    redis_client.delete(last_boot_key(SOURCE))
    impostor = {**OTHER_HARDWARE, "charge_point_serial": "SN-OTHER", "status": "Accepted"}
    station = ScriptedStation(Firmware(ARMED), csms=TARGET, boot=impostor)

    with station_link(station):
        located = verify_boot(migration)
        StationMigration.objects.filter(id=migration.id).update(**located.fields)
        confirming = verify_boot(_settled(migration))
        again = verify_boot(_reload(migration))

    assert located.state is None
    assert confirming.state is None
    assert again.state != State.VERIFIED
    assert "other hardware answers through csms-2 as CP-1" in confirming.fields["verify_failure"]
    assert len(_security_events()) == 1


@pytest.mark.django_db
def test_a_lost_boot_record_and_the_station_still_on_the_source_fails_at_the_boot_timeout(
    awaiting_boot, redis_client
):
    migration = awaiting_boot()
    redis_client.delete(last_boot_key(SOURCE))
    firmware = Firmware(ARMED)
    station = ScriptedStation(firmware, csms=SOURCE)

    with station_link(station):
        early = verify_boot(migration)  # it may not have rebooted yet
        next_ = verify_boot(_timed_out(migration))

    assert early.state is None
    assert next_.state == State.FAILED
    assert next_.reason.startswith(f"the station is still on {SOURCE}")
    assert next_.reason.endswith(RESTORED)
    assert _sent(station) == [
        (call.GetConfiguration(key=[PRIORITY]), ""),
        (call.GetConfiguration(key=[PRIORITY]), ""),
        *ROLLBACK,
    ]


@pytest.mark.django_db
def test_no_boot_within_the_boot_timeout_fails_and_says_the_rollback_did_not_reach_it(
    awaiting_boot, redis_client
):
    migration = awaiting_boot()
    station = ScriptedStation(Firmware(ARMED), csms="")  # on neither CSMS

    with station_link(station):
        early = verify_boot(migration)
        next_ = verify_boot(_timed_out(migration))

    assert early.state is None
    assert next_.state == State.FAILED
    assert next_.reason.startswith(
        f"no BootNotification on {TARGET} within {migration.batch.boot_timeout_seconds}s"
    )
    assert f"ROLLBACK INCOMPLETE: {PRIORITY} not restored" in next_.reason
    assert [csms for _, csms in _sent(station)] == ["", SOURCE]
    assert [outcome for *_, outcome in _recorded(migration)] == ["offline", "offline"]


# --- cleanup -----------------------------------------------------------------------------


@pytest.mark.django_db
def test_cleanup_blanks_the_old_slot_through_the_target_only():
    migration = _migration(State.CLEANUP)
    firmware = Firmware(ARMED)
    station = ScriptedStation(firmware, csms=TARGET)

    with station_link(station):
        next_ = cleanup(migration)

    assert next_.state == State.DONE
    assert firmware.config[PROFILE_1] == ""
    assert _sent(station) == [(call.ChangeConfiguration(key=PROFILE_1, value=""), TARGET)]


# --- the runner's failure paths ----------------------------------------------------------


@pytest.mark.django_db
def test_a_station_offline_at_its_reset_gives_the_claim_back_and_fails_when_the_wait_ends(
    target_gateway_up,
):
    migration = _migration(State.RESETTING, wait_until=timezone.now() - timedelta(seconds=1))
    station = ScriptedStation(Firmware(ARMED), csms="")

    with station_link(station):
        run_step(migration.id, State.RESETTING)

    failed = _reload(migration)
    assert failed.state == State.FAILED
    assert failed.failed_step == State.RESETTING
    assert failed.reason.startswith("offline: no gateway holds the station")
    assert f"ROLLBACK INCOMPLETE: {PRIORITY} not restored" in failed.reason
    assert failed.reset_sent_at is None  # nothing reached the station: no Reset is pending
    assert _sent(station) == [RESET, ROLLBACK[0]]
    assert _recorded(migration) == [
        (State.RESETTING, "Reset", "", "offline"),
        (f"{State.RESETTING}:rollback", "ChangeConfiguration", "", "offline"),
    ]


@pytest.mark.django_db
def test_a_step_that_keeps_raising_after_the_reset_fails_with_the_rollback_through_the_source(
    redis_client, settings
):
    settings.MIGRATION_STEP_MAX_ATTEMPTS = 1
    migration = _migration(State.AWAITING_BOOT, reset_sent_at=time.time() - 5)
    firmware = Firmware(ARMED)
    station = ScriptedStation(firmware, csms=SOURCE)

    with station_link(station):
        step_raised(migration.id, State.AWAITING_BOOT, KeyError("event_id"))

    failed = _reload(migration)
    assert failed.state == State.FAILED
    assert failed.reason == "the step raised KeyError: 'event_id' (1 attempts)" + RESTORED
    assert _sent(station) == ROLLBACK
    assert firmware.config == ORIGINAL
