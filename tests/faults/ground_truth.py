"""The fault tests' judge: what each station itself holds, compared with what we reported.

A report may only say "done" for a station that is connected to the target with the
target's profile first, and "failed", "skipped" or "cancelled" for one that is back on the
source with its original priority (unless its reason admits the rollback is incomplete).
No station may have accepted more than one Reset, and none may be left on neither CSMS.
``judge`` makes every one of these checks; the fault tests call it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from migrations_app.models import OcppExchange
from ocpp_gateway.simulator.config import PRIORITY
from ocpp_gateway.simulator.fleet import Fleet
from ocpp_gateway.simulator.station import SimulatedStation

ROLLBACK_INCOMPLETE = "ROLLBACK INCOMPLETE"
ENDED = frozenset({"done", "failed", "skipped", "cancelled"})


@dataclass(frozen=True)
class Truth:
    identity: str
    online: bool
    connected_url: str | None
    first_profile_url: str
    resets: int

    @classmethod
    def of(cls, station: SimulatedStation) -> Truth:
        first_slot = (station.config.get(PRIORITY) or "").split(",")[0]
        return cls(
            identity=station.identity,
            online=station.online,
            connected_url=station.connected_url,
            first_profile_url=station.config.get(first_slot) or "",
            resets=station.reset_count,
        )

    def on(self, url: str) -> bool:
        return self.online and self.connected_url == url


def differences(
    report: dict, fleet: Fleet, *, source_url: str, target_url: str, settle: float = 30.0
) -> list[str]:
    """Every way the report differs from the stations' truth; [] when it tells the truth.

    Waits up to ``settle`` seconds for stations to come back online first: a station that
    was just reset or whose gateway just restarted is still on its way.
    """
    deadline = time.monotonic() + settle
    while time.monotonic() < deadline and not all(station.online for station in fleet):
        time.sleep(0.2)
    problems = []
    reported = {entry["identity"]: entry for entry in report["stations"]}
    for station in fleet:
        entry = reported.get(station.identity)
        if entry is None:
            continue  # not part of this batch
        problems += _judge(entry, Truth.of(station), source_url, target_url)
    return problems


def judge(report: dict, fleet: Fleet, stack, *, rollback_through: str | None = "csms-2") -> None:
    """Assert the report tells the stations' truth: no station reset twice, no difference
    between the report and where each station is, and (unless ``rollback_through`` is None)
    no rollback command *sent* through that CSMS's gateway (the target). A rollback its
    gateway refused without sending (it holds the station but the command is addressed to
    the source's gateway) is recorded with sent=False and does not count."""
    assert resets_sent_twice(fleet) == []
    problems = differences(report, fleet, source_url=stack.source_url, target_url=stack.target_url)
    assert problems == [], problems
    if rollback_through is not None:
        sent = OcppExchange.objects.filter(
            step__endswith=":rollback", csms=rollback_through, sent=True
        )
        assert list(sent.values_list("migration__station__identity", "action", "outcome")) == []


def resets_sent_twice(fleet: Fleet) -> list[str]:
    return [station.identity for station in fleet if station.reset_count > 1]


def _judge(entry: dict, truth: Truth, source_url: str, target_url: str) -> list[str]:
    who, state, reason = truth.identity, entry["state"], entry.get("reason") or ""
    problems = []
    if truth.resets > 1:
        problems.append(f"{who}: accepted {truth.resets} Resets")
    if state not in ENDED:
        return [*problems, f"{who}: not ended ({state})"]
    if not truth.online:
        problems.append(f"{who}: reported {state} but the station is on neither CSMS")
    if state == "done":
        if not truth.on(target_url) or truth.first_profile_url != target_url:
            problems.append(
                f"{who}: reported done but it is on {truth.connected_url} with "
                f"{truth.first_profile_url!r} first"
            )
        return problems
    if not reason:
        problems.append(f"{who}: {state} without a reason")
    if state == "skipped" and truth.resets:
        problems.append(f"{who}: reported skipped but it was reset")
    if ROLLBACK_INCOMPLETE in reason:
        return problems
    if not truth.on(source_url) or truth.first_profile_url != source_url:
        problems.append(
            f"{who}: reported {state} ({reason}) but it is on {truth.connected_url} with "
            f"{truth.first_profile_url!r} first"
        )
    return problems
