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
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from django.conf import settings
from django.db import transaction
from django.utils import timezone
from ocpp import exceptions as ocpp_errors
from ocpp.v16 import call, call_result
from ocpp.v16.enums import (
    CertificateStatus,
    CertificateUse,
    ChargePointStatus,
    ConfigurationStatus,
    GetInstalledCertificateStatus,
    RegistrationStatus,
    ResetStatus,
    ResetType,
)
from redis import RedisError

from fleet.models import ChargingStation, StationEvent
from fleet.redis import get_redis
from fleet.rows import select_first, select_value
from fleet.selectors import station_registered_on
from fleet.services.inventory import station_move_to_csms
from fleet.services.registry import registry_republish_missing
from fleet.validators import csms_url_problems
from migrations_app.models import StationMigration
from migrations_app.services.exchanges import describe, record_taken_back, station_call
from migrations_app.services.firmware import firmware_gate
from migrations_app.services.liveness import gateway_up
from migrations_app.services.plan import (
    ADDITIONAL_ROOT_CHECK,
    CONFIG_KEYS,
    PRIORITY,
    PROFILE_TIMEOUT,
    MissingKeys,
    NetworkPlan,
    PlanError,
    configuration_values,
    plan_switch,
)
from ocpp_gateway.certificates import (
    CertificateError,
    CertificateHashData,
    identifies,
    issued_by_one_of,
    load_certificate,
)
from ocpp_gateway.client import (
    ClaimLapsed,
    CommandNotSent,
    CommandRevoked,
    StationOffline,
    claim_command,
    revoke_command,
)
from ocpp_gateway.envelopes import EventKind, Outcome, Reply, last_boot_key

State = StationMigration.State
Kind = StationMigration.FailureKind

# A connector in one of these has a car plugged in and (about to be) charging.
BUSY_STATUSES = frozenset(
    {
        ChargePointStatus.charging,
        ChargePointStatus.suspended_ev,
        ChargePointStatus.suspended_evse,
        ChargePointStatus.preparing,
    }
)
OFFLINE_RETRY_SECONDS = 2.0
# With the boot records lost (Redis came back empty) no event says where the station went:
# it is asked, at most this often.
LOST_RECORDS_POLL_SECONDS = 5.0
# A timer set for a deadline runs a little after it, not a hair before.
DEADLINE_MARGIN_SECONDS = 0.1
# Settle time beyond the station's NetworkProfileConnectionTimeoutSec, and that timeout
# when the station did not report it (a usual firmware default).
SETTLE_MARGIN_SECONDS = 5.0
DEFAULT_PROFILE_TIMEOUT = 30.0
MAX_PROFILE_TIMEOUT = 3600.0
# A claim younger than this is not taken back: the run that took it may still be publishing.
RESET_CLAIM_GRACE_SECONDS = 2.0
# How long Redis keeps a Reset's claim: past any wait for a dead worker's steps to be re-run
# (a claim that expired can no longer tell that it was never published: the boot is waited for).
RESET_CLAIM_TTL_SECONDS = 24 * 3600
# Answers other than a result that still prove the station is on the gateway that sent them.
_ANSWERED = (Outcome.CALL_ERROR, Outcome.BAD_RESPONSE)
# A ChangeConfiguration the station took. RebootRequired: the value is stored and takes
# effect at the next boot, which the Reset provides (a firmware may answer it for any
# network profile key).
_TAKEN = frozenset({ConfigurationStatus.accepted, ConfigurationStatus.reboot_required})


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


def fail(step: str, reason: str, kind: str, **fields: Any) -> Next:
    """To failed at ``step``; ``kind`` is its StationMigration.FailureKind."""
    return Next(State.FAILED, reason, fields={"failed_step": step, "failure_kind": kind, **fields})


def _answer(reply: Reply) -> Reply:
    """The reply, unless it says nothing about what the station did (then try again)."""
    if reply.outcome in (Outcome.TIMEOUT, Outcome.DISCONNECTED):
        raise Unreachable(describe(reply))
    return reply


def _taken(reply: Reply) -> bool:
    """Whether the station took the ChangeConfiguration (stored it, now or at the reboot)."""
    result = reply.result(call_result.ChangeConfiguration)
    return result is not None and result.status in _TAKEN


# --- the steps ---------------------------------------------------------------------------


def preflight(m: StationMigration) -> Next:
    step = State.PREFLIGHT
    problems = csms_url_problems(m.target_url)
    if problems:
        return fail(step, "target URL rejected: " + " ".join(problems), Kind.REFUSED)
    identity = m.station.identity
    if m.target_url.rstrip("/").endswith("/" + identity):
        return fail(step, "target URL must not include the station identity", Kind.REFUSED)
    source_url = m.source.url if m.source else ""
    if (
        urlsplit(source_url).scheme == "wss"
        and urlsplit(m.target_url).scheme == "ws"
        and not m.batch.allow_downgrade
    ):
        return fail(
            step, "refused: moving from wss:// to ws:// is a security downgrade", Kind.REFUSED
        )
    if m.station.csms_id is None:
        return fail(step, "the station is on no known CSMS", Kind.REFUSED)
    target = m.batch.target
    # The seed's prerequisite: the station is whitelisted on CSMS 2 before it is moved there;
    # the target's gateways would refuse it, and it would fall back after its reset.
    if not target.open_admission and not station_registered_on(m.station_id, target.id):
        return Next(
            State.SKIPPED,
            f"not registered on {target.name}: register it first (manage.py "
            f"import_registrations {target.name} FILE.csv, or the admin)",
        )
    source = m.source
    if (
        source
        and not source.open_admission
        and not station_registered_on(m.station_id, source.id, admitted=True)
    ):
        # Its way back: a station that cannot stay on the target falls back to the source,
        # whose gateways would refuse it, and it would be on neither CSMS.
        return Next(
            State.SKIPPED,
            f"not registered on {source.name}, where it is now: a fall back after the Reset "
            f"would be refused there (register it on {source.name} first)",
        )
    skip_reason = firmware_gate(m.station.firmware_version, settings.MIGRATION_MIN_FIRMWARE)
    if skip_reason:
        return Next(State.SKIPPED, skip_reason)
    if not m.station.connected:
        raise StationOffline(identity)
    return Next(State.READING_CONFIG)


def read_config(m: StationMigration) -> Next:
    step = State.READING_CONFIG
    reply = _answer(station_call(m, step=step, request=call.GetConfiguration(key=CONFIG_KEYS)))
    result = reply.result(call_result.GetConfiguration)
    if result is None:
        return fail(
            step, "could not read the network configuration: " + describe(reply), Kind.REJECTED
        )
    values = configuration_values(result)
    try:
        plan = plan_switch(values)
    except MissingKeys as exc:
        return Next(State.SKIPPED, str(exc))
    except PlanError as exc:
        return fail(step, str(exc), Kind.REFUSED)
    facts = {
        "config_snapshot": values,
        "expected_hardware": expected_hardware(m.station),
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
            Kind.REFUSED,
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
            Kind.REFUSED,
            **facts,
        )
    if root_ca_check_needed(m):
        return Next(State.CHECKING_ROOT_CA, fields=facts)
    return _armable(m, plan, fields=facts)


def _armable(m: StationMigration, plan: NetworkPlan, *, reason: str = "", **next_: Any) -> Next:
    """Every check passed: arm the station (step 2), or say what a dry run would do."""
    if m.batch.dry_run:
        writes = (
            f"{plan.free_slot} already holds it"
            if plan.free_slot_holds(m.target_url)
            else f"would write {plan.free_slot}={m.target_url}"
        )
        return Next(
            State.DONE,
            (f"{reason}; " if reason else "")
            + f"dry run: {writes}; would set {PRIORITY}={plan.new_priority} "
            f"(was {plan.original_priority}), then Reset Hard",
            **next_,
        )
    return Next(State.SETTING_URL, reason, **next_)


# --- the root certificate (the seed's second prerequisite) -------------------------------
#
# A station moved to a wss:// CSMS must trust that CSMS's root CA, or its TLS handshake
# fails and it falls back after its profile timeout. For a target whose root CA is known,
# ask the station what it has installed (OCPP 1.6 security extension), through the source,
# before anything is written.

ROOT_CERTIFICATE = CertificateUse.central_system_root_certificate
# CALLERRORs of a firmware that lacks the security extension's messages.
NO_EXTENSION_ERRORS = frozenset(
    {ocpp_errors.NotImplementedError.code, ocpp_errors.NotSupportedError.code}
)


def root_ca_check_needed(m: StationMigration) -> bool:
    return urlsplit(m.target_url).scheme == "wss" and bool(m.batch.target.root_ca_pem.strip())


def check_root_ca(m: StationMigration) -> Next:
    step = State.CHECKING_ROOT_CA
    target = m.batch.target
    plan = NetworkPlan(
        active_slot=m.active_slot,
        free_slot=m.free_slot,
        original_priority=m.original_priority,
        values=m.config_snapshot,
    )
    try:
        root = load_certificate(target.root_ca_pem)
    except CertificateError as exc:
        return fail(
            step, f"the root CA certificate of {target.name} cannot be read: {exc}", Kind.REFUSED
        )
    serial = format(root.serial_number, "x")
    named = f"the root CA certificate of {target.name} (serial {serial})"
    reply = _installed_roots(m)
    if reply.outcome is Outcome.CALL_ERROR and reply.error_code in NO_EXTENSION_ERRORS:
        return _without_extension(m, plan, reply)
    installed = _hash_data(reply)
    if installed is None:
        return fail(
            step,
            "could not read the installed root certificates: " + describe(reply),
            Kind.REJECTED,
        )
    additional_check = m.config_snapshot.get(ADDITIONAL_ROOT_CHECK, "").strip().lower() == "true"
    if any(identifies(data, root) for data in installed):
        # Installed by an earlier run of this step whose answer was lost: the same warning.
        ours = (
            additional_check
            and m.exchanges.filter(action=call.InstallCertificate.__name__).exists()
        )
        fields = {"warnings": _root_replaced_warnings(m, named)} if ours else {}
        return _armable(m, plan, reason=f"{named} is installed", fields=fields)
    if additional_check and not issued_by_one_of(root, installed):
        # The firmware would reject the install, and the station cannot work with the target.
        return Next(
            State.SKIPPED,
            f"{named} is not installed, and {ADDITIONAL_ROOT_CHECK} is true: the station "
            "accepts only a root signed by one of its installed root certificates, and no "
            "installed root signed it",
        )
    if not m.batch.install_root_ca:
        return Next(
            State.SKIPPED,
            f"{named} is not installed on the station: install it first (or allow it: "
            "migrate_fleet --install-root-ca)",
        )
    if m.batch.dry_run:
        return _armable(m, plan, reason=f"{named} is not installed: would install it")
    return _install_root(
        m, plan, root=root, root_pem=target.root_ca_pem, named=named, replaces=additional_check
    )


def _root_replaced_warnings(m: StationMigration, named: str) -> list[str]:
    """The report's warning for a root installed under AdditionalRootCertificateCheck."""
    source = m.source.name if m.source else "the source"
    warning = (
        f"{named} was installed under {ADDITIONAL_ROOT_CHECK}: the station keeps one root "
        f"certificate, so it replaced the one it had, which the station removes once it has "
        f"connected using the new one; moving it back to a wss:// {source} will need "
        f"{source}'s root certificate reinstalled first"
    )
    return [*[w for w in m.warnings if w != warning], warning]


def _installed_roots(m: StationMigration) -> Reply:
    return _answer(
        station_call(
            m,
            step=State.CHECKING_ROOT_CA,
            request=call.GetInstalledCertificateIds(certificate_type=ROOT_CERTIFICATE),
            via=_source_name(m),
        )
    )


def _install_root(
    m: StationMigration,
    plan: NetworkPlan,
    *,
    root: x509.Certificate,
    root_pem: str,
    named: str,
    replaces: bool,
) -> Next:
    # InstallCertificate is safe to repeat: a re-run after a lost answer finds the root in
    # GetInstalledCertificateIds first, or installs it again.
    reply = _answer(
        station_call(
            m,
            step=State.CHECKING_ROOT_CA,
            request=call.InstallCertificate(
                certificate_type=ROOT_CERTIFICATE, certificate=root_pem.strip()
            ),
            via=_source_name(m),
        )
    )
    answer = reply.result(call_result.InstallCertificate)
    if answer is None or answer.status is not CertificateStatus.accepted:
        return Next(
            State.SKIPPED,
            f"{named} is not installed, and installing it failed "
            f"(InstallCertificate: {describe(reply)})",
        )
    check = _installed_roots(m)
    installed = _hash_data(check)
    if installed is None or not any(identifies(data, root) for data in installed):
        seen = "not listed" if installed is not None else describe(check)
        return Next(
            State.SKIPPED,
            f"{named} was not installed: InstallCertificate was Accepted, but the station "
            f"does not list it afterwards ({seen})",
        )
    fields = {"warnings": _root_replaced_warnings(m, named)} if replaces else {}
    return _armable(
        m, plan, reason=f"{named} installed (InstallCertificate) and verified", fields=fields
    )


def _without_extension(m: StationMigration, plan: NetworkPlan, reply: Reply) -> Next:
    missing = (
        f"the station does not support the OCPP 1.6 security extension "
        f"(GetInstalledCertificateIds: {describe(reply)}): the root CA certificate of "
        f"{m.batch.target.name} cannot be checked"
    )
    if m.batch.security_extension != m.batch.SecurityExtension.PROCEED:
        return Next(State.SKIPPED, f"{missing} (batch option: require)")
    warning = f"{missing}; proceeding as the batch allows"
    return _armable(m, plan, reason=warning, fields={"warnings": [*m.warnings, warning]})


def _hash_data(reply: Reply) -> list[CertificateHashData] | None:
    """The root certificates a GetInstalledCertificateIds answer lists; None: no answer."""
    result = reply.result(call_result.GetInstalledCertificateIds)
    if result is None:
        return None
    if result.status is GetInstalledCertificateStatus.not_found:
        return []
    found = []
    for entry in result.certificate_hash_data or []:
        try:
            found.append(CertificateHashData.from_payload(entry))
        except (CertificateError, AttributeError):
            continue  # one malformed entry does not hide the others
    return found


def _source_name(m: StationMigration) -> str:
    # Before the switch the station is on its source: only that CSMS may ask it.
    return m.source.name if m.source else ""


def set_url(m: StationMigration) -> Next:
    step = State.SETTING_URL
    if m.config_snapshot.get(m.free_slot) == m.target_url:
        return Next(State.SETTING_PRIORITY, f"{m.free_slot} already holds the target URL")
    reply = _answer(
        station_call(
            m, step=step, request=call.ChangeConfiguration(key=m.free_slot, value=m.target_url)
        )
    )
    if not _taken(reply):
        return fail(
            step, f"the station did not accept the new URL ({describe(reply)})", Kind.REJECTED
        )
    return Next(State.SETTING_PRIORITY)


def set_priority(m: StationMigration) -> Next:
    step = State.SETTING_PRIORITY
    new_priority = f"{m.free_slot},{m.active_slot}"
    reply = _answer(
        station_call(
            m, step=step, request=call.ChangeConfiguration(key=PRIORITY, value=new_priority)
        )
    )
    if not _taken(reply):
        # A lost or odd answer may still mean the station took the value: put both back.
        restored = restore(m, step, priority=True)
        return fail(
            step,
            f"the station did not accept the new priority ({describe(reply)}){restored}",
            Kind.REJECTED,
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
            Kind.BUSY,
        )
    # The StatusNotification that leaves no connector busy wakes it (wakes.py); the timer
    # is for the idle limit.
    left = (wait_until - timezone.now()).total_seconds()
    return Next(None, countdown=wait_timer(left), fields={"wait_until": wait_until})


def wait_timer(seconds: float) -> float:
    """When a waiting step looks again on its own: at its deadline, ``seconds`` away.

    The events it waits for wake it (migrations_app.services.wakes); its own timer is for
    the deadline, and makes up for a wake that was lost (a worker killed between ingesting
    and waking). Capped at MIGRATION_WAIT_TIMER_SECONDS and at half the step lease: every
    look touches the migration, so a waiting station never looks stale to redrive_stale,
    and a countdown stays far below the broker's visibility timeout (1 h), past which a
    held task is delivered again.
    """
    cap = min(settings.MIGRATION_WAIT_TIMER_SECONDS, settings.MIGRATION_STEP_LEASE_SECONDS / 2)
    return max(0.0, min(seconds + DEADLINE_MARGIN_SECONDS, cap))


def reset(m: StationMigration) -> Next:
    step = State.RESETTING
    if m.reset_sent_at is not None and (earlier := _earlier_reset(m)) is not None:
        return earlier
    # The idle check ran in an earlier task on ingested status: look again, just before.
    if busy_connectors(m):
        return Next(State.WAITING_IDLE, "a charging session started; waiting again")
    # A Reset into a dead target would leave the station on neither CSMS until its profile
    # timeout: hold it (the runner retries, bounded by the boot timeout, then restores).
    if not gateway_up(m.batch.target.name):
        raise Unreachable(f"no gateway of {m.batch.target.name} is up")
    # After Redis lost its data the target's gateways keep a copy that may predate this
    # station's registration, with nothing to reload: publish it before the Reset sends the
    # station there (a gateway checks a refusal against Redis first).
    registry_republish_missing([m.batch.target.name])
    claimed_at = time.time()
    client = get_redis()
    command_id = claim_command(client, ttl=RESET_CLAIM_TTL_SECONDS)
    claimed = StationMigration.objects.filter(
        id=m.id, state=State.RESETTING, reset_sent_at__isnull=True
    ).update(
        reset_sent_at=claimed_at,
        reset_command_id=command_id,
        boot_marks=_boot_marks(m),
        # What verification found belongs to one Reset (a retried migration starts afresh).
        settle_until=None,
        verify_failure="",
    )
    if not claimed:
        revoke_command(client, command_id)  # another run claimed it: this id is never sent
        return Next(None, countdown=1.0)

    def give_back_claim() -> None:
        StationMigration.objects.filter(
            id=m.id, state=State.RESETTING, reset_command_id=command_id
        ).update(reset_sent_at=None, reset_command_id="")

    try:
        reply = station_call(
            m, step=step, request=call.Reset(type=ResetType.hard), claimed_id=command_id
        )
    except CommandRevoked:
        # A run that took this one for dead took the claim back: the Reset is its to send.
        return Next(None, countdown=1.0)
    except (StationOffline, ClaimLapsed):
        give_back_claim()  # nothing reached the station
        raise
    except CommandNotSent:
        # Nothing reached Redis, by the client's account; the claim confirms it before the
        # station is given back (a Redis that cannot answer leaves it to _earlier_reset).
        if revoke_command(client, command_id):
            give_back_claim()
        raise
    except RedisError:
        # Redis failed around the publish (recorded as such): the station may be rebooting,
        # or the Reset may never have left. The claim tells which once Redis answers again
        # (_earlier_reset); the station stays claimed meanwhile.
        return Next(None, countdown=1.0)
    if not reply.sent:
        give_back_claim()
        raise Unreachable(f"Reset not sent ({describe(reply)})")
    result = reply.result(call_result.Reset)
    if result is not None and result.status is ResetStatus.accepted:
        # No station reboots in under a second: the first look would only find nothing.
        return Next(State.AWAITING_BOOT, countdown=1.0, fields={"reset_accepted": True})
    if reply.outcome in (Outcome.TIMEOUT, Outcome.DISCONNECTED):
        # The station may be rebooting already: only its boot can tell.
        return Next(State.AWAITING_BOOT, f"Reset answer lost ({describe(reply)})", countdown=1.0)
    restored = restore(m, step, priority=True)
    return fail(step, f"the station refused the Reset ({describe(reply)}){restored}", Kind.REJECTED)


def _earlier_reset(m: StationMigration) -> Next | None:
    """The Reset an earlier run of this step claimed: wait for its outcome, or None when it
    never reached a gateway (its worker died before publishing it, or Redis failed first)
    and is taken back, for this run to send. Never a second Reset: a station that rebooted
    would reboot again."""
    assert m.reset_sent_at is not None
    claimed = m.reset_command_id
    age = time.time() - m.reset_sent_at
    # A live run publishes within milliseconds of its claim: a younger claim is left to it.
    if claimed and age >= RESET_CLAIM_GRACE_SECONDS and revoke_command(get_redis(), claimed):
        if not StationMigration.objects.filter(
            id=m.id, state=State.RESETTING, reset_command_id=claimed
        ).update(reset_sent_at=None, reset_command_id=""):
            return Next(None, countdown=1.0)  # the claim changed meanwhile: look again
        record_taken_back(m, State.RESETTING, call.Reset(type=ResetType.hard), claimed)
        m.reset_sent_at, m.reset_command_id = None, ""
        return None
    if age < settings.OCPP_COMMAND_TIMEOUT + 5:
        return Next(None, countdown=1.0)
    if not StationMigration.objects.filter(id=m.id, reset_command_id=claimed).exists():
        return Next(None, countdown=1.0)  # read before the claim was given back: look again
    return Next(State.AWAITING_BOOT, "Reset may have been sent earlier; its answer was lost")


# --- verification ------------------------------------------------------------------------
#
# "Verified" is what the old registration is removed on, so it means all of: the target
# accepted the boot, the boot came from the hardware the source knew, the station was still
# on the target after a settle time, and it answered through the target with the new
# profile first. From the Reset on, a rollback only ever goes through the source: a station
# found on the target is migrated (or left as it is, and the reason says so).


def verify_boot(m: StationMigration) -> Next:
    step = State.AWAITING_BOOT
    assert m.reset_sent_at is not None
    target, source = m.batch.target.name, m.source.name if m.source else ""
    boots = _boots_since_reset(m)
    failure = m.verify_failure or (_refusal(m, boots.target) if boots.target else "")
    # A boot is new when its id differs from the last one seen before the Reset: no clocks
    # compared with the worker's. Both new: the later one tells where the station is now.
    if boots.source and not (boots.target and boots.target["at"] > boots.source["at"]):
        # A target that refused the boot sent it back; otherwise it went back on its own.
        kind = Kind.REJECTED if failure else Kind.FALLBACK
        if not failure:
            failure = (
                f"the station fell back to {source} after booting on {target}"
                if boots.target or m.settle_until
                else f"the station fell back to {source}: it booted there instead of on {target}"
            )
        return fail(step, failure + _restore_via_source(m), kind)
    if failure:
        return _await_on_source(m, boots, failure)
    if boots.target:
        if boots.target.get("status") == RegistrationStatus.pending:
            return _pending(m, boots.target)
        return _settle(m, record_lost=False)
    if m.settle_until:
        # Found on the target by asking it, its boot record lost: it is settling there.
        return _settle(m, record_lost=True)
    if boots.records_lost or _boot_timed_out(m):
        # No record of a boot, maybe because Redis lost them: only the station can tell.
        # An answer through the source means little before the boot timeout (it may not
        # have rebooted yet); through the target it means it booted there.
        where = _locate(m)
        if where and where == target:
            return _settle(m, record_lost=True)
        if where and where == source and _boot_timed_out(m):
            return fail(
                step,
                f"the station is still on {source} {m.batch.boot_timeout_seconds}s after the "
                f"Reset (no BootNotification on {target} recorded){_restore_via_source(m)}",
                Kind.FALLBACK,
            )
    if _boot_timed_out(m):
        return fail(
            step,
            f"no BootNotification on {target} within {m.batch.boot_timeout_seconds}s of the "
            f"Reset{_restore_via_source(m)}",
            Kind.TIMEOUT,
        )
    return Next(None, countdown=_boot_timer(m, records_lost=boots.records_lost))


def _refusal(m: StationMigration, boot: dict[str, Any]) -> str:
    """Why the target's boot cannot verify the migration, or "" (it may: accepted, pending)."""
    # Records from before the status was kept were all Accepted.
    status = boot.get("status") or RegistrationStatus.accepted
    if status == RegistrationStatus.pending:
        return ""
    mismatch = hardware_mismatch(m.expected_hardware, boot)
    if status == RegistrationStatus.accepted:
        failure = f"other hardware booted on {m.batch.target.name} as {m.station.identity}"
    else:
        verdict = "rejected" if status == RegistrationStatus.rejected else f"answered {status} to"
        failure = (
            f"the target {verdict} the BootNotification ({boot.get('reason') or 'no reason given'})"
        )
        if not mismatch:
            return failure
        failure += ", which came from other hardware"
    if not mismatch:
        return ""
    return _record_impostor(m, boot, f"{failure} ({mismatch}); recorded as a security event")


def _pending(m: StationMigration, boot: dict[str, Any]) -> Next:
    """The target answered Pending (it does not know the station yet): wait for its verdict."""
    if not _boot_timed_out(m):
        # Its next boot (the target's verdict) wakes it.
        return Next(None, countdown=_boot_timer(m, records_lost=False))
    reason = boot.get("reason") or "no reason given"
    return fail(
        State.AWAITING_BOOT,
        f"the target still answered the BootNotification Pending ({reason}) "
        f"{m.batch.boot_timeout_seconds}s after the Reset{_restore_via_source(m)}",
        Kind.TIMEOUT,
    )


def _await_on_source(m: StationMigration, boots: Boots, failure: str) -> Next:
    """The migration failed: wait for the station on the source to restore it there.

    The target refused the station (or another station holds its identity there), so its
    profile fallback takes it back to the source within its NetworkProfileConnectionTimeoutSec.
    """
    source = m.source.name if m.source else ""
    found_on_source = boots.records_lost and source and _locate(m) == source
    if found_on_source or _boot_timed_out(m):
        # The target's refusal is the cause, wherever the station went afterwards.
        return fail(State.AWAITING_BOOT, failure + _restore_via_source(m), Kind.REJECTED)
    # Its boot on the source wakes it.
    return Next(
        None,
        countdown=_boot_timer(m, records_lost=boots.records_lost),
        fields={"verify_failure": failure},
    )


def _settle(m: StationMigration, *, record_lost: bool) -> Next:
    """Accepted on the target by the same hardware: confirm it stayed after the settle time.

    The settle is a timer: staying is what it checks. A fall back meanwhile is a boot on
    the source, which wakes the step and fails it at once (verify_boot).
    """
    now = timezone.now()
    settle_until = m.settle_until or now + timedelta(seconds=settle_seconds(m))
    if now < settle_until:
        left = (settle_until - now).total_seconds()
        return Next(None, countdown=wait_timer(left), fields={"settle_until": settle_until})
    return _confirm(m, record_lost=record_lost)


def _confirm(m: StationMigration, *, record_lost: bool) -> Next:
    step = State.AWAITING_BOOT
    target, source = m.batch.target.name, m.source.name if m.source else ""
    try:
        reply = station_call(
            m, step=step, request=call.GetConfiguration(key=[PRIORITY]), via=target
        )
    except StationOffline:
        reply = None
    on_target = reply is not None and reply.csms == target
    mismatch = (
        hardware_mismatch(m.expected_hardware, reply.boot)
        if reply is not None and on_target and reply.boot
        else ""
    )
    if mismatch:
        # Whoever answers is not the station that booted on the source (its boot record
        # may be lost, or it took the identity over since): never verified.
        assert reply is not None and reply.boot is not None
        failure = _record_impostor(
            m,
            reply.boot,
            f"other hardware answers through {target} as {m.station.identity} ({mismatch}); "
            "recorded as a security event",
        )
        return Next(None, countdown=OFFLINE_RETRY_SECONDS, fields={"verify_failure": failure})
    config = reply.result(call_result.GetConfiguration) if reply is not None else None
    if config is not None and on_target:
        priority = configuration_values(config).get(PRIORITY, "")
        if priority.split(",")[0].strip() == m.free_slot:
            seen = (
                f"boot record lost; confirmed through the target: found on {target}"
                if record_lost
                else f"BootNotification accepted on {target}"
            )
            return Next(
                State.VERIFIED,
                f"{seen}; still there after {settle_seconds(m):g}s and answering "
                f"{PRIORITY}={priority} through it",
            )
        return fail(
            step,
            f"the station answers through {target} with {PRIORITY}={priority!r}, not "
            f"{m.free_slot} first; ROLLBACK INCOMPLETE: never sent through the target",
            Kind.REJECTED,
        )
    if reply is not None and on_target and reply.outcome in _ANSWERED:
        return fail(
            step,
            f"the station is on {target} but did not tell its priority ({describe(reply)}); "
            "ROLLBACK INCOMPLETE: never sent through the target",
            Kind.REJECTED,
        )
    silent_on_target = on_target and reply is not None and reply.outcome is Outcome.TIMEOUT
    # Not on the target (any more): find it.
    if not silent_on_target and source and _locate(m) == source:
        return fail(
            step,
            f"the station fell back to {source} after booting on {target}" + _restore_via_source(m),
            Kind.FALLBACK,
        )
    if _boot_timed_out(m):
        seen = describe(reply) if reply is not None else "offline"
        return fail(
            step,
            f"not reachable through {target} after settling ({seen}){_restore_via_source(m)}",
            Kind.OFFLINE,
        )
    return Next(None, countdown=OFFLINE_RETRY_SECONDS)


def _locate(m: StationMigration) -> str:
    """Ask the station through whichever gateway holds it; the CSMS that answered, or ""."""
    try:
        reply = station_call(
            m,
            step=f"{State.AWAITING_BOOT}:locate",
            request=call.GetConfiguration(key=[PRIORITY]),
        )
    except StationOffline:
        return ""
    return reply.csms if reply.outcome in (Outcome.RESULT, *_ANSWERED) else ""


def _restore_via_source(m: StationMigration) -> str:
    """Undo the priority after the Reset (through the source, as every rollback)."""
    return restore(m, State.AWAITING_BOOT, priority=True)


def _boot_timed_out(m: StationMigration) -> bool:
    assert m.reset_sent_at is not None
    return time.time() - m.reset_sent_at > m.batch.boot_timeout_seconds


def _boot_timer(m: StationMigration, *, records_lost: bool) -> float:
    """Until the boot timeout: a boot on the target or the source wakes the step sooner.

    Without boot records (lost with Redis's data) no boot will come for a station that
    already booted: it is asked where it is (``_locate``) every few seconds instead.
    """
    assert m.reset_sent_at is not None
    left = m.reset_sent_at + m.batch.boot_timeout_seconds - time.time()
    return min(wait_timer(left), LOST_RECORDS_POLL_SECONDS) if records_lost else wait_timer(left)


def settle_seconds(m: StationMigration) -> float:
    """How long the station must stay on the target (MIGRATION_SETTLE_SECONDS, None: its
    own NetworkProfileConnectionTimeoutSec plus a margin: the time a fallback takes)."""
    if settings.MIGRATION_SETTLE_SECONDS is not None:
        return float(settings.MIGRATION_SETTLE_SECONDS)
    try:
        timeout = float(m.config_snapshot.get(PROFILE_TIMEOUT, DEFAULT_PROFILE_TIMEOUT))
    except (TypeError, ValueError):
        timeout = DEFAULT_PROFILE_TIMEOUT
    if not 0 <= timeout <= MAX_PROFILE_TIMEOUT:  # also NaN: a value no firmware means
        timeout = DEFAULT_PROFILE_TIMEOUT
    return timeout + SETTLE_MARGIN_SECONDS


# --- same hardware -----------------------------------------------------------------------


def expected_hardware(station: ChargingStation) -> dict[str, str]:
    """What the source knew of the station (only what it knew is compared later)."""
    known = {"vendor": station.vendor, "model": station.model, "serial": station.serial}
    return {key: value for key, value in known.items() if value}


def hardware_seen(boot: dict[str, Any]) -> dict[str, str]:
    serial = boot.get("charge_point_serial") or boot.get("charge_box_serial") or boot.get("serial")
    return {
        "vendor": _field_text(boot.get("vendor")),
        "model": _field_text(boot.get("model")),
        "serial": _field_text(serial),
    }


def hardware_mismatch(expected: dict[str, str], boot: dict[str, Any]) -> str:
    """How the boot's hardware differs from what was expected; "" when it does not."""
    seen = hardware_seen(boot)
    return "; ".join(
        f"{key} {seen[key]!r}, expected {value!r}"
        for key, value in sorted(expected.items())
        if key in seen and seen[key] != value
    )


def _field_text(value: object) -> str:
    # As the inventory stores it (fleet.services.events): stripped, no NUL, 50 characters.
    return "" if value is None else str(value).replace("\x00", "").strip()[:50]


def _record_impostor(m: StationMigration, boot: dict[str, Any], failure: str) -> str:
    """Record the boot from other hardware as a security event, once; return the failure."""
    with transaction.atomic():
        # Conditional: a re-driven step must not record the same impostor twice.
        first = StationMigration.objects.filter(
            id=m.id, state=State.AWAITING_BOOT, verify_failure=""
        ).update(verify_failure=failure)
        if first:
            StationEvent.objects.create(
                event_id=str(uuid.uuid4()),
                station_id=m.station_id,
                csms=m.batch.target,
                kind=EventKind.SECURITY.value,
                at=timezone.now(),
                data={
                    "reason": "boot from other hardware during a migration",
                    "status": boot.get("status") or RegistrationStatus.accepted,
                    "expected": m.expected_hardware,
                    "seen": hardware_seen(boot),
                    "boot_event_id": boot.get("event_id", ""),
                    "migration_id": m.id,
                },
            )
    return failure


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
            request=call.ChangeConfiguration(key=m.active_slot, value=""),
            via=m.batch.target.name,
        )
    )
    if _taken(reply):
        return Next(State.DONE, f"old profile {m.active_slot} blanked")
    return Next(State.DONE, f"migrated, but blanking {m.active_slot} failed ({describe(reply)})")


# --- helpers -----------------------------------------------------------------------------


def busy_connectors(m: StationMigration) -> list[str]:
    # What ingestion last wrote: the migration's copy may be older than the last session.
    m.station.connector_status = select_value(ChargingStation, "connector_status", m.station_id)
    return connectors_busy(m.station.connector_status or {})


def connectors_busy(connector_status: dict[str, Any]) -> list[str]:
    """The connectors (not 0, the station itself) with a car plugged in, from the inventory."""
    return sorted(
        connector
        for connector, info in connector_status.items()
        if connector != "0" and (info or {}).get("status") in BUSY_STATUSES
    )


def last_boot(csms: str, identity: str) -> dict[str, Any] | None:
    raw = get_redis().hget(last_boot_key(csms), identity)
    return json.loads(raw) if raw else None


@dataclass(frozen=True)
class Boots:
    """The station's newest boot since the Reset on the target and on the source."""

    target: dict[str, Any] | None
    source: dict[str, Any] | None
    # Redis no longer holds a boot it held before the Reset: it lost its data.
    records_lost: bool


def _boot_csms(m: StationMigration) -> list[tuple[str, int]]:
    pairs = [(m.batch.target.name, m.batch.target_id)]
    if m.source is not None:
        pairs.append((m.source.name, m.source.id))
    return pairs


def _boot_marks(m: StationMigration) -> dict[str, dict[str, Any]]:
    """The last boot on the target and on the source (id and time), taken before the Reset."""
    marks = {}
    for name, csms_id in _boot_csms(m):
        boot = last_boot(name, m.station.identity) or _stored_boot(m.station_id, csms_id)
        marks[name] = {"event_id": boot["event_id"], "at": boot["at"]} if boot else {}
    return marks


def _mark(m: StationMigration, csms: str) -> tuple[str, float | None]:
    mark = (m.boot_marks or {}).get(csms)
    if isinstance(mark, dict):
        return mark.get("event_id", ""), mark.get("at")
    return mark or "", None  # a mark taken before marks kept their time


def _boots_since_reset(m: StationMigration) -> Boots:
    found: dict[str, dict[str, Any] | None] = {}
    lost = False
    for name, csms_id in _boot_csms(m):
        event_id, at = _mark(m, name)
        boot = last_boot(name, m.station.identity)
        lost = lost or (boot is None and bool(event_id))
        if not _is_new(boot, event_id, at):
            # The Redis hash is a fast path. The durable record of a boot is its StationEvent
            # row, written by ingestion and keyed by the gateway's event id: the database is
            # backed up and replicated with the rest of the inventory, which a Redis stream
            # with AOF would not be, and ingestion already writes it. It lags Redis by the
            # time ingestion takes, so it is read only when Redis has nothing new.
            boot = _stored_boot(m.station_id, csms_id)
            if not _is_new(boot, event_id, at):
                boot = None
        found[name] = boot
    return Boots(
        target=found[m.batch.target.name],
        source=found.get(m.source.name) if m.source is not None else None,
        records_lost=lost,
    )


def _is_new(boot: dict[str, Any] | None, mark_id: str, mark_at: float | None) -> bool:
    if boot is None or boot.get("event_id", "") == mark_id:
        return False
    # A stored row may be older than the mark (taken from Redis, ahead of ingestion).
    return mark_at is None or float(boot.get("at", 0)) > mark_at


def _stored_boot(station_id: int, csms_id: int) -> dict[str, Any] | None:
    """The station's last boot on that CSMS as ingested, in the Redis record's shape."""
    # Read on every verification pass that Redis has nothing new for (benchmarks/README.md,
    # issue 9): a statement built once.
    row = select_first(
        StationEvent,
        ("event_id", "at", "data"),
        {"station_id": station_id, "csms_id": csms_id, "kind": EventKind.BOOT},
        order_by="-at",
    )
    if row is None:
        return None
    event_id, at, data = row
    return {**(data if isinstance(data, dict) else {}), "at": at.timestamp(), "event_id": event_id}


def restore(m: StationMigration, step: str, *, priority: bool) -> str:
    """Undo what the migration wrote (priority, then the free slot); say how it went.

    Always through the source: before the Reset that is where the station is, and after it
    a station that answers through the target is migrated, never rolled back there.
    Writing the original values again is harmless, so a write that may or may not have
    happened (a lost answer) is undone too. If the priority cannot be restored, the free
    slot keeps the new URL: a priority naming a blank profile would be worse.
    """
    if m.source is None:
        return "; ROLLBACK INCOMPLETE: no source CSMS to send it through"
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
                request=call.ChangeConfiguration(key=key, value=value),
                via=m.source.name,
            )
        except (StationOffline, RedisError) as exc:
            problems.append(f"{key} not restored: {exc}")
            break
        if not _taken(reply):
            problems.append(f"{key} not restored: {describe(reply)}")
            break
    if problems:
        return "; ROLLBACK INCOMPLETE: " + "; ".join(problems)
    return "; " + " and ".join(key for key, _ in writes) + " restored"
