"""A migration between two proxied CSMSs: each gateway in front of an upstream CSMS that is
not our code (tests/upstream_csms.py, written with the `ocpp` library), the stations real
OCPP-J clients (the simulator).

What the upstreams see is read from their raw frames: they must get every frame of their
own conversation with the station and nothing of the migration's (our CALLs are injected
by the proxy, their answers go to our command bridge only).
"""

from __future__ import annotations

import json
import time
from typing import Any

from django.core.management import call_command
from ocpp.v16 import call
from ocpp.v16.enums import (
    MessageTrigger,
    RegistrationStatus,
    RemoteStartStopStatus,
    TriggerMessageStatus,
)

from devstack.processes import wait_until
from fleet.models import ChargingStation, Registration, StationEvent
from migrations_app.models import MigrationBatch, OcppExchange, StationMigration
from migrations_app.services.batches import batch_report
from ocpp_gateway.envelopes import EventKind
from ocpp_gateway.simulator.spec import Behaviour
from tests.migrations_app.conftest import by_identity, wait_batch
from tests.upstream_csms import UpstreamCsms

P1 = "NetworkConnectionProfile1"
P2 = "NetworkConnectionProfile2"
PRIORITY = "NetworkConfigurationPriority"
INJECTED_PREFIX = "csmsm-"
# Keys only the migration reads or writes: an upstream never asks for them in these tests.
MIGRATION_KEYS = (P1, P2, PRIORITY, "NetworkProfileConnectionTimeoutSec")
State = StationMigration.State
# The states a migration passes through before its Reset, while the station is on csms-1.
BEFORE_IDLE_WAIT = frozenset(
    {
        State.PENDING,
        State.PREFLIGHT,
        State.READING_CONFIG,
        State.SETTING_URL,
        State.SETTING_PRIORITY,
    }
)


# --- what an upstream CSMS saw ----------------------------------------------------------


def frames(raw: list[str]) -> list[list[Any]]:
    return [json.loads(text) for text in raw]


def leaks(upstream: UpstreamCsms, identity: str) -> list[str]:
    """Every frame the upstream received that is not part of its own conversation with the
    station: answers to CALLs it never sent (or a second answer to one), our injected ids,
    the migration's CALLs or its configuration keys. [] when there is none."""
    own_calls = {frame[1] for frame in frames(upstream.sent(identity)) if frame[0] == 2}
    answered: set[str] = set()
    problems = []
    for frame in frames(upstream.received(identity)):
        text = json.dumps(frame)
        if INJECTED_PREFIX in text:
            problems.append(f"an injected id reached the upstream: {text}")
        if frame[0] == 2 and frame[2] in ("ChangeConfiguration", "Reset", "GetConfiguration"):
            problems.append(f"a CSMS-to-station CALL reached the upstream: {text}")
        if frame[0] in (3, 4):
            if frame[1] not in own_calls:
                problems.append(f"an answer to a CALL the upstream never sent: {text}")
            elif frame[1] in answered:
                problems.append(f"a second answer to the upstream's CALL {frame[1]}: {text}")
            answered.add(frame[1])
        if any(key in text for key in MIGRATION_KEYS):
            problems.append(f"the migration's configuration reached the upstream: {text}")
    return problems


def boot_answers(upstream: UpstreamCsms, identity: str) -> list[str]:
    """The status of each BootNotification.conf the upstream sent the station, in order."""
    boot_ids = {
        frame[1]
        for frame in frames(upstream.received(identity))
        if frame[0] == 2 and frame[2] == "BootNotification"
    }
    return [
        frame[2]["status"]
        for frame in frames(upstream.sent(identity))
        if frame[0] == 3 and frame[1] in boot_ids
    ]


def migration_state(migration: StationMigration) -> str:
    return StationMigration.objects.get(id=migration.id).state


# --- the upstream's own conversation, while the migration runs ----------------------------


def own_get_configuration(upstream: UpstreamCsms, identity: str, keys: list[str]) -> None:
    """The upstream's GetConfiguration answered with exactly the keys it asked for."""
    answer = upstream.call(identity, call.GetConfiguration(key=keys), timeout=20)
    known = sorted(entry["key"] for entry in answer.configuration_key or [])
    unknown = sorted(answer.unknown_key or [])
    assert sorted([*known, *unknown]) == sorted(keys), answer


def test_a_full_migration_between_proxied_csmss_ends_verified_and_the_upstreams_keep_their_own(
    proxied_stack,
):
    """The station charges from power-on, so the migration holds before its Reset (idle
    check, fed by the relayed StatusNotification and StartTransaction) while upstream CSMS 1
    keeps talking to the station: GetConfiguration, TriggerMessage and RemoteStartTransaction,
    each answered with its own answer, none of the migration's frames reaching it. Its
    RemoteStopTransaction ends the session; the station moves, upstream CSMS 2 accepts its
    boot, and the migration is verified through the proxy of csms-2."""
    stack = proxied_stack
    upstream1, upstream2 = stack.upstream_source, stack.upstream_target
    spec = stack.station("CP-PX", behaviour=Behaviour(charging=True))
    with stack.fleet([spec]) as fleet:
        station = fleet["CP-PX"]
        assert boot_answers(upstream1, "CP-PX") == [RegistrationStatus.accepted]
        wait_until(
            lambda: station.transaction is not None and station.transaction.transaction_id,
            20,
            "the session's StartTransaction answered by upstream CSMS 1",
        )
        wait_until(
            lambda: (
                (ChargingStation.objects.get(identity="CP-PX").connector_status.get("1", {})).get(
                    "status"
                )
                == "Charging"
            ),
            20,
            "the inventory to show connector 1 charging",
        )
        call_command(
            "migrate_fleet", "--to", "csms-2", "--from", "csms-1",
            "--rate-per-minute", "0", "--idle-wait", "300", "--boot-timeout", "90",
        )  # fmt: skip
        batch = MigrationBatch.objects.get()
        migration = StationMigration.objects.get(batch=batch)

        # While our commands go out (pre-flight, GetConfiguration, the two writes), the
        # upstream's own CALLs share the one slot towards the station.
        rounds, deadline = 0, time.monotonic() + 60
        while True:
            own_get_configuration(upstream1, "CP-PX", ["HeartbeatInterval"])
            trigger = upstream1.call(
                "CP-PX", call.TriggerMessage(requested_message=MessageTrigger.heartbeat), 20
            )
            assert trigger.status == TriggerMessageStatus.accepted
            rounds += 1
            if migration_state(migration) not in BEFORE_IDLE_WAIT:
                break
            assert time.monotonic() < deadline, "the migration never reached its idle check"
        wait_until(
            lambda: migration_state(migration) == State.WAITING_IDLE,
            30,
            "the migration to wait for the session to end",
        )

        # Held before the Reset: the upstream's own commands, and only their answers.
        own_get_configuration(upstream1, "CP-PX", ["HeartbeatInterval", "NoSuchKey"])
        trigger = upstream1.call(
            "CP-PX",
            call.TriggerMessage(
                requested_message=MessageTrigger.status_notification, connector_id=1
            ),
            20,
        )
        assert trigger.status == TriggerMessageStatus.accepted
        start = upstream1.call(
            "CP-PX", call.RemoteStartTransaction(id_tag="UPSTREAM-TAG", connector_id=1), 20
        )
        # One session at a time: the station's own answer, not one of ours.
        assert start.status == RemoteStartStopStatus.rejected
        assert migration_state(migration) == State.WAITING_IDLE
        transaction_id = station.transaction.transaction_id
        stop = upstream1.call(
            "CP-PX", call.RemoteStopTransaction(transaction_id=transaction_id), 20
        )
        assert stop.status == RemoteStartStopStatus.accepted

        wait_batch(batch, MigrationBatch.State.FINISHED, timeout=120)
        entry = by_identity(batch_report(batch))["CP-PX"]
        assert entry["state"] == "done", entry
        assert station.connected_url == stack.target_url and station.reset_count == 1
        assert station.config[P2] == stack.target_url
        assert station.config[PRIORITY] == f"{P2},{P1}"

        # Upstream CSMS 2 saw the boot and accepted it; that is what the boot event recorded.
        assert boot_answers(upstream2, "CP-PX") == [RegistrationStatus.accepted]
        assert upstream2.boots("CP-PX")[0]["charge_point_serial_number"] == spec.serial_number
        boots = StationEvent.objects.filter(
            kind=EventKind.BOOT, station__identity="CP-PX", csms__name="csms-2"
        )
        assert [event.data.get("status") for event in boots] == ["Accepted"]
        # Upstream CSMS 1 got the stop of the session it ended, and the station's triggered
        # StatusNotification: its conversation went on unchanged.
        received1 = frames(upstream1.received("CP-PX"))
        assert any(f[0] == 2 and f[2] == "StopTransaction" for f in received1)
        assert sum(1 for f in received1 if f[0] == 2 and f[2] == "Heartbeat") >= rounds

    # Neither upstream received any of the migration's CALLs or their answers.
    assert leaks(upstream1, "CP-PX") == []
    assert leaks(upstream2, "CP-PX") == []
    # Each of upstream 1's CALLs was answered once (leaks() refuses a second answer).
    own_calls = [f for f in frames(upstream1.sent("CP-PX")) if f[0] == 2]
    answers = [f for f in frames(upstream1.received("CP-PX")) if f[0] in (3, 4)]
    assert len(answers) == len(own_calls) == 2 * rounds + 4

    # The migration's exchanges are recorded as usual, through the two proxies.
    exchanges = list(
        OcppExchange.objects.filter(migration=migration).values_list("action", "outcome", "csms")
    )
    assert exchanges == [
        ("GetConfiguration", "result", "csms-1"),
        ("ChangeConfiguration", "result", "csms-1"),
        ("ChangeConfiguration", "result", "csms-1"),
        ("Reset", "result", "csms-1"),
        ("GetConfiguration", "result", "csms-2"),
    ]
    station_row = ChargingStation.objects.get(identity="CP-PX")
    assert station_row.csms.name == "csms-2"
    states = dict(station_row.registrations.values_list("csms__name", "state"))
    assert states == {
        "csms-1": Registration.State.PENDING_REMOVAL,
        "csms-2": Registration.State.ACTIVE,
    }
