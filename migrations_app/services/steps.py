"""The seed's procedure, one handler per state of a station migration.

A handler looks at the migration, talks to the station if its step needs to, and says where
the migration goes next (``Next``). ``run_step`` applies that as a conditional transition, so
a handler may run twice (a redelivered task, the tick re-driving a stale station) without
moving the station twice. The one command that must never be repeated, Reset, is claimed
with a conditional update before it is sent.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from django.utils import timezone
from redis import RedisError

from fleet.redis import get_redis
from fleet.selectors import station_registered_on
from fleet.services.inventory import station_move_to_csms
from fleet.validators import csms_url_problems
from migrations_app.models import StationMigration
from migrations_app.services.exchanges import describe, station_call, status_of
from migrations_app.services.firmware import firmware_gate
from migrations_app.services.liveness import gateway_up
from migrations_app.services.plan import (
    NETWORK_KEYS,
    PRIORITY,
    MissingKeys,
    PlanError,
    configuration_values,
    plan_switch,
)
from ocpp_gateway.client import StationOffline
from ocpp_gateway.envelopes import Outcome, Reply, last_boot_key

State = StationMigration.State

# A connector in one of these has a car plugged in and (about to be) charging.
BUSY_STATUSES = frozenset({"Charging", "SuspendedEV", "SuspendedEVSE", "Preparing"})
OFFLINE_RETRY_SECONDS = 2.0
IDLE_POLL_SECONDS = 5.0


@dataclass(frozen=True)
class Next:
    """Where a handler sends the migration. ``state`` None: stay, and run again later."""

    state: str | None
    reason: str = ""
    countdown: float = 0.0
    fields: dict[str, Any] = field(default_factory=dict)
    # Runs in the transition's transaction (e.g. the inventory change that goes with it).
    apply: Callable[[], None] | None = None


class Unreachable(Exception):
    """The station could not be asked (offline, or no answer): worth trying again."""


def fail(step: str, reason: str, **fields: Any) -> Next:
    return Next(State.FAILED, reason, fields={"failed_step": step, **fields})


def _answer(reply: Reply) -> Reply:
    """The reply, unless it says nothing about what the station did (then try again)."""
    if reply.outcome in (Outcome.TIMEOUT, Outcome.DISCONNECTED):
        raise Unreachable(describe(reply))
    return reply


# --- the steps ---------------------------------------------------------------------------


def preflight(m: StationMigration) -> Next:
    step = State.PREFLIGHT
    problems = csms_url_problems(m.target_url)
    if problems:
        return fail(step, "target URL rejected: " + " ".join(problems))
    identity = m.station.identity
    if m.target_url.rstrip("/").endswith("/" + identity):
        return fail(step, "target URL must not include the station identity")
    source_url = m.source.url if m.source else ""
    if (
        urlsplit(source_url).scheme == "wss"
        and urlsplit(m.target_url).scheme == "ws"
        and not m.batch.allow_downgrade
    ):
        return fail(step, "refused: moving from wss:// to ws:// is a security downgrade")
    if m.station.csms_id is None:
        return fail(step, "the station is on no known CSMS")
    target = m.batch.target
    # The seed's prerequisite: the station is whitelisted on CSMS 2 before it is moved there;
    # the target's gateways would refuse it, and it would fall back after its reset.
    if not target.open_admission and not station_registered_on(m.station_id, target.id):
        return Next(
            State.SKIPPED,
            f"not registered on {target.name}: register it first (manage.py "
            f"import_registrations {target.name} FILE.csv, or the admin)",
        )
    skip_reason = firmware_gate(m.station.firmware_version, settings.MIGRATION_MIN_FIRMWARE)
    if skip_reason:
        return Next(State.SKIPPED, skip_reason)
    if not m.station.connected:
        raise StationOffline(identity)
    return Next(State.READING_CONFIG)


def read_config(m: StationMigration) -> Next:
    step = State.READING_CONFIG
    reply = _answer(
        station_call(m, step=step, action="GetConfiguration", payload={"key": NETWORK_KEYS})
    )
    if reply.outcome is not Outcome.RESULT:
        return fail(step, "could not read the network configuration: " + describe(reply))
    values = configuration_values(reply.payload or {})
    try:
        plan = plan_switch(values)
    except MissingKeys as exc:
        return Next(State.SKIPPED, str(exc))
    except PlanError as exc:
        return fail(step, str(exc))
    facts = {
        "config_snapshot": values,
        "active_slot": plan.active_slot,
        "free_slot": plan.free_slot,
        "original_priority": plan.original_priority,
    }
    if plan.active_slot_holds(m.target_url):
        if reply.csms == m.batch.target.name:
            return Next(
                State.DONE, "already migrated: it runs on the target's profile", fields=facts
            )
        return fail(
            step,
            f"armed but not migrated: {plan.active_slot} (first in the priority) holds the "
            f"target URL, yet the station answered through {reply.csms or 'another CSMS'}",
            **facts,
        )
    source_url = m.source.url if m.source else ""
    if source_url and plan.free_slot_holds(source_url) and not plan.active_slot_holds(source_url):
        # After a fallback the station runs on the slot that is not first: overwriting it
        # would leave it no working profile if the target then fails.
        return fail(
            step,
            f"{plan.free_slot} holds the source URL although {plan.active_slot} is first: "
            "the station may be running on it; refusing to overwrite it",
            **facts,
        )
    if m.batch.dry_run:
        writes = (
            f"{plan.free_slot} already holds it"
            if plan.free_slot_holds(m.target_url)
            else f"would write {plan.free_slot}={m.target_url}"
        )
        return Next(
            State.DONE,
            f"dry run: {writes}; would set {PRIORITY}={plan.new_priority} "
            f"(was {plan.original_priority}), then Reset Hard",
            fields=facts,
        )
    return Next(State.SETTING_URL, fields=facts)


def set_url(m: StationMigration) -> Next:
    step = State.SETTING_URL
    if m.config_snapshot.get(m.free_slot) == m.target_url:
        return Next(State.SETTING_PRIORITY, f"{m.free_slot} already holds the target URL")
    reply = _answer(
        station_call(
            m,
            step=step,
            action="ChangeConfiguration",
            payload={"key": m.free_slot, "value": m.target_url},
        )
    )
    # RebootRequired: the value is stored and takes effect at the next boot, which the
    # Reset provides (a firmware may answer it for any network profile key).
    if status_of(reply) not in ("Accepted", "RebootRequired"):
        return fail(step, f"the station did not accept the new URL ({describe(reply)})")
    return Next(State.SETTING_PRIORITY)


def set_priority(m: StationMigration) -> Next:
    step = State.SETTING_PRIORITY
    new_priority = f"{m.free_slot},{m.active_slot}"
    reply = _answer(
        station_call(
            m,
            step=step,
            action="ChangeConfiguration",
            payload={"key": PRIORITY, "value": new_priority},
        )
    )
    if status_of(reply) not in ("RebootRequired", "Accepted"):
        # A lost or odd answer may still mean the station took the value: put both back.
        restored = restore(m, step, priority=True)
        return fail(
            step, f"the station did not accept the new priority ({describe(reply)}){restored}"
        )
    return Next(State.WAITING_IDLE)


def wait_idle(m: StationMigration) -> Next:
    step = State.WAITING_IDLE
    busy = busy_connectors(m)
    if not busy:
        return Next(State.RESETTING)
    wait_until = m.wait_until or timezone.now() + timedelta(seconds=m.batch.idle_wait_seconds)
    if timezone.now() >= wait_until:
        restored = restore(m, step, priority=True)
        return fail(
            step,
            f"busy: a charging session was still in progress after "
            f"{m.batch.idle_wait_seconds}s (connectors {', '.join(busy)}){restored}",
        )
    left = (wait_until - timezone.now()).total_seconds()
    return Next(None, countdown=min(IDLE_POLL_SECONDS, left), fields={"wait_until": wait_until})


def reset(m: StationMigration) -> Next:
    step = State.RESETTING
    if m.reset_sent_at is not None:
        # Sent by an earlier run of this step. Never send a second Reset: a station that
        # already rebooted would reboot again. Wait for that run's outcome, or for the boot.
        if time.time() - m.reset_sent_at < settings.OCPP_COMMAND_TIMEOUT + 5:
            return Next(None, countdown=1.0)
        return Next(State.AWAITING_BOOT, "Reset was sent earlier; its answer was lost")
    # The idle check ran in an earlier task on ingested status: look again, just before.
    if busy_connectors(m):
        return Next(State.WAITING_IDLE, "a charging session started; waiting again")
    # A Reset into a dead target would leave the station on neither CSMS until its profile
    # timeout: hold it (the runner retries, bounded by the boot timeout, then restores).
    if not gateway_up(m.batch.target.name):
        raise Unreachable(f"no gateway of {m.batch.target.name} is up")
    claimed_at = time.time()
    claimed = StationMigration.objects.filter(
        id=m.id, state=State.RESETTING, reset_sent_at__isnull=True
    ).update(reset_sent_at=claimed_at, boot_marks=_boot_marks(m))
    if not claimed:
        return Next(None, countdown=1.0)

    def give_back_claim() -> None:
        StationMigration.objects.filter(id=m.id, reset_sent_at=claimed_at).update(
            reset_sent_at=None
        )

    try:
        reply = station_call(m, step=step, action="Reset", payload={"type": "Hard"})
    except (StationOffline, RedisError):
        give_back_claim()  # nothing reached the station
        raise
    if not reply.sent:
        give_back_claim()
        raise Unreachable(f"Reset not sent ({describe(reply)})")
    status = status_of(reply)
    if status == "Accepted":
        # No station reboots in under a second: the first look would only find nothing.
        return Next(State.AWAITING_BOOT, countdown=1.0, fields={"reset_accepted": True})
    if reply.outcome in (Outcome.TIMEOUT, Outcome.DISCONNECTED):
        # The station may be rebooting already: only its boot can tell.
        return Next(State.AWAITING_BOOT, f"Reset answer lost ({describe(reply)})", countdown=1.0)
    restored = restore(m, step, priority=True)
    return fail(step, f"the station refused the Reset ({describe(reply)}){restored}")


def verify_boot(m: StationMigration) -> Next:
    step = State.AWAITING_BOOT
    assert m.reset_sent_at is not None
    target, source = m.batch.target.name, m.source.name if m.source else ""
    target_boot = _new_boot(m, target)
    source_boot = _new_boot(m, source) if source else None
    # A boot is new when its id differs from the last one seen before the Reset: no clocks
    # compared across machines. Both new: the later one tells where the station is now.
    if target_boot and not (source_boot and source_boot["at"] > target_boot["at"]):
        return Next(State.VERIFIED, f"BootNotification on {target}")
    if source_boot:
        restored = restore(m, step, priority=True, via=source)
        return fail(
            step,
            f"the station fell back to {source}: it booted there instead of on {target}{restored}",
        )
    elapsed = time.time() - m.reset_sent_at
    if elapsed > m.batch.boot_timeout_seconds:
        restored = restore(m, step, priority=True)
        return fail(
            step,
            f"no BootNotification on {target} within {m.batch.boot_timeout_seconds}s of the "
            f"Reset{restored}",
        )
    # Poll often at first (a simulated reboot takes a second), then back off: a real
    # station takes a minute or two and a thousand of them should not flood the queue.
    return Next(None, countdown=min(max(elapsed / 4, 0.5), 5.0))


def mark_old_registration(m: StationMigration) -> Next:
    return Next(
        State.OLD_REGISTRATION_MARKED,
        apply=lambda: station_move_to_csms(
            station_id=m.station_id, source_id=m.source_id, target_id=m.batch.target_id
        ),
    )


def after_marking(m: StationMigration) -> Next:
    return Next(State.CLEANUP if m.batch.cleanup else State.DONE)


def cleanup(m: StationMigration) -> Next:
    step = State.CLEANUP
    # Through the target only: blanking the old slot of a station that is back on the
    # source would cut it off.
    reply = _answer(
        station_call(
            m,
            step=step,
            action="ChangeConfiguration",
            payload={"key": m.active_slot, "value": ""},
            via=m.batch.target.name,
        )
    )
    if status_of(reply) in ("Accepted", "RebootRequired"):
        return Next(State.DONE, f"old profile {m.active_slot} blanked")
    return Next(State.DONE, f"migrated, but blanking {m.active_slot} failed ({describe(reply)})")


# --- helpers -----------------------------------------------------------------------------


def busy_connectors(m: StationMigration) -> list[str]:
    m.station.refresh_from_db(fields=["connector_status"])
    return sorted(
        connector
        for connector, info in (m.station.connector_status or {}).items()
        if connector != "0" and (info or {}).get("status") in BUSY_STATUSES
    )


def last_boot(csms: str, identity: str) -> dict[str, Any] | None:
    raw = get_redis().hget(last_boot_key(csms), identity)
    return json.loads(raw) if raw else None


def _boot_marks(m: StationMigration) -> dict[str, str]:
    """The id of the last boot on the source and on the target, taken before the Reset."""
    marks = {}
    for csms in (m.batch.target.name, m.source.name if m.source else ""):
        boot = last_boot(csms, m.station.identity) if csms else None
        marks[csms] = boot.get("event_id", "") if boot else ""
    return marks


def _new_boot(m: StationMigration, csms: str) -> dict[str, Any] | None:
    """The station's last boot on csms if it happened after the Reset, else None."""
    boot = last_boot(csms, m.station.identity)
    if boot is None or boot.get("event_id", "") == (m.boot_marks or {}).get(csms, ""):
        return None
    return boot


def restore(m: StationMigration, step: str, *, priority: bool, via: str = "") -> str:
    """Undo what the migration wrote (priority, then the free slot); say how it went.

    Writing the original values again is harmless, so a write that may or may not have
    happened (a lost answer) is undone too. If the priority cannot be restored, the free
    slot keeps the new URL: a priority naming a blank profile would be worse.
    """
    writes = []
    if priority and m.original_priority:
        writes.append((PRIORITY, m.original_priority))
    if m.free_slot and m.config_snapshot.get(m.free_slot) != m.target_url:
        writes.append((m.free_slot, m.config_snapshot.get(m.free_slot, "")))
    if not writes:
        return ""
    problems = []
    for key, value in writes:
        try:
            reply = station_call(
                m,
                step=f"{step}:rollback",
                action="ChangeConfiguration",
                payload={"key": key, "value": value},
                via=via,
            )
        except (StationOffline, RedisError) as exc:
            problems.append(f"{key} not restored: {exc}")
            break
        if status_of(reply) not in ("Accepted", "RebootRequired"):
            problems.append(f"{key} not restored: {describe(reply)}")
            break
    if problems:
        return "; ROLLBACK INCOMPLETE: " + "; ".join(problems)
    return "; " + " and ".join(key for key, _ in writes) + " restored"


HANDLERS: dict[str, Callable[[StationMigration], Next]] = {
    State.PREFLIGHT: preflight,
    State.READING_CONFIG: read_config,
    State.SETTING_URL: set_url,
    State.SETTING_PRIORITY: set_priority,
    State.WAITING_IDLE: wait_idle,
    State.RESETTING: reset,
    State.AWAITING_BOOT: verify_boot,
    State.VERIFIED: mark_old_registration,
    State.OLD_REGISTRATION_MARKED: after_marking,
    State.CLEANUP: cleanup,
}
