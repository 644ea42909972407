"""What a simulated station is (its spec and behaviour switches) and how a fleet is built."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from ocpp_gateway.certificates import CertificateError, certificate_pem, load_certificates
from ocpp_gateway.simulator.config import DEFAULT_PRIORITY
from ocpp_gateway.simulator.firmware import parse_version

# BootNotification's schema limits (OCPP 1.6 CiString20/25/50).
_MAX_VENDOR = 20
_MAX_MODEL = 20
_MAX_SERIAL = 25
_MAX_FIRMWARE = 50


@dataclass(frozen=True, slots=True)
class Behaviour:
    """Deviations from the well-behaved firmware, for a chosen subset of the fleet."""

    reject_url_writes: bool = False
    reject_reset: bool = False
    # Answers Accepted instead of RebootRequired; the priority still takes effect at the next
    # boot, like a firmware that misreports the status.
    accept_priority_without_reboot: bool = False
    # Only the URLs the station was installed with can be reached (no CSMS 2 root
    # certificate, a firewall...): anything else fails until the profile timeout.
    target_unreachable: bool = False
    # A session in progress from power-on; it ends after charging_seconds (None: never).
    charging: bool = False
    charging_seconds: float | None = None
    # Goes offline for good drop_offline_after seconds after its first accepted boot.
    drop_offline: bool = False
    drop_offline_after: float = 0.0
    # After an accepted boot on a URL it was not installed with, loses that URL this many
    # seconds later (the connection drops and the URL stays unreachable): its profile order
    # takes it back to the previous CSMS. None: never.
    fall_back_after: float | None = None
    # Reboots by itself (a new BootNotification) this many seconds after each accepted boot.
    boot_loop: float | None = None
    # After a connection drop that was not a reset, reconnects without a BootNotification:
    # real firmware boots only at power-on.
    reconnect_without_boot: bool = False
    # Firmware without the OCPP 1.6 security extension: GetInstalledCertificateIds and
    # InstallCertificate answer CALLERROR NotImplemented, no AdditionalRootCertificateCheck.
    no_security_extension: bool = False
    # Applies the first InstallCertificate but its answer never reaches the CSMS (lost on
    # the way): the CSMS sees a timeout although the root is installed.
    lose_install_certificate_answer: bool = False

    def __post_init__(self) -> None:
        if self.fall_back_after is not None and not self.fall_back_after >= 0:
            raise ValueError("fall_back_after must be >= 0 seconds")
        if self.boot_loop is not None and not self.boot_loop > 0:
            raise ValueError("boot_loop must be > 0 seconds")


@dataclass(frozen=True, slots=True)
class StationSpec:
    """One station as installed: identity, firmware and initial network profiles."""

    identity: str
    url: str
    url2: str = ""
    priority: str = DEFAULT_PRIORITY
    firmware: str = "4.2.85"
    vendor: str = "SimVendor"
    model: str = "SimCharger"
    serial_number: str = ""
    connectors: int = 1
    profile_timeout: int = 30
    password: str | None = None
    # CentralSystemRootCertificates installed at the factory: PEM texts (one certificate
    # each after normalising; a PEM with several counts as several). A wss:// profile is
    # verified against these (none: the system's trust store).
    root_certificates: tuple[str, ...] = ()
    # The AdditionalRootCertificateCheck key (security extension): a new root is accepted
    # only when an installed root signed it.
    additional_root_certificate_check: bool = False
    behaviour: Behaviour = field(default_factory=Behaviour)

    def __post_init__(self) -> None:
        if not self.identity or "/" in self.identity:
            raise ValueError(f"bad station identity {self.identity!r}")
        parse_version(self.firmware)
        if len(self.vendor) > _MAX_VENDOR or len(self.model) > _MAX_MODEL:
            raise ValueError("vendor and model are at most 20 characters (OCPP 1.6)")
        if len(self.firmware) > _MAX_FIRMWARE:
            raise ValueError("firmware version is at most 50 characters (OCPP 1.6)")
        if self.connectors < 1:
            raise ValueError("a station has at least one connector")
        if self.profile_timeout < 0:
            raise ValueError("profile timeout must be >= 0")
        if not self.serial_number:
            object.__setattr__(self, "serial_number", f"SN-{self.identity}"[-_MAX_SERIAL:])
        if self.root_certificates:
            object.__setattr__(
                self, "root_certificates", normalise_roots(tuple(self.root_certificates))
            )


@cache
def normalise_roots(pems: tuple[str, ...]) -> tuple[str, ...]:
    """One PEM per certificate; cached, so a fleet given the same roots shares one tuple."""
    try:
        return tuple(certificate_pem(cert) for pem in pems for cert in load_certificates(pem))
    except CertificateError as exc:
        raise ValueError(f"root certificate: {exc}") from None


@dataclass(frozen=True, slots=True)
class Timing:
    """Process-wide delays and timeouts, in seconds."""

    reboot_delay: float = 1.0
    # Between two connection attempts to the same profile.
    retry_interval: float = 0.5
    # After a connection dropped without a Reset.
    reconnect_delay: float = 1.0
    # Cap of the backoff after every profile failed in a row.
    max_round_backoff: float = 30.0
    response_timeout: float = 30.0
    open_timeout: float = 10.0
    close_timeout: float = 2.0
    # BootNotification retry when the CSMS answered Pending/Rejected with interval 0.
    boot_retry_default: float = 10.0


def parse_ids(text: str, count: int) -> frozenset[int]:
    """1-based station indexes from "1,5,10-12" or "all"."""
    text = text.strip()
    if text.lower() == "all":
        return frozenset(range(1, count + 1))
    indexes: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        first, sep, last = part.partition("-")
        try:
            low = int(first)
            high = int(last) if sep else low
        except ValueError:
            raise ValueError(f"not an index or range: {part!r}") from None
        if low < 1 or high < low:
            raise ValueError(f"bad range: {part!r}")
        indexes.update(range(low, high + 1))
    if not indexes:
        raise ValueError("no station indexes given")
    return frozenset(indexes)


def parse_ids_with_seconds(text: str, count: int) -> tuple[frozenset[int], float | None]:
    """ "IDS" or "IDS:SECONDS" as used by --charging and --drop-offline."""
    ids, sep, seconds = text.rpartition(":")
    if not sep:
        return parse_ids(text, count), None
    try:
        value = float(seconds)
    except ValueError:
        raise ValueError(f"not a number of seconds: {seconds!r}") from None
    if value < 0:
        raise ValueError("seconds must be >= 0")
    return parse_ids(ids, count), value


def parse_firmware_mix(text: str) -> list[tuple[str, int]]:
    """ "4.2.85:90,4.2.9:10" → [("4.2.85", 90), ("4.2.9", 10)]."""
    mix = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        version, sep, weight = part.rpartition(":")
        if not sep or not version:
            raise ValueError(f"expected VERSION:WEIGHT, got {part!r}")
        parse_version(version)
        if not weight.isdigit():
            raise ValueError(f"weight must be a whole number in {part!r}")
        mix.append((version, int(weight)))
    if not mix or sum(weight for _, weight in mix) == 0:
        raise ValueError("the firmware mix needs at least one positive weight")
    return mix


def assign_firmware(mix: Sequence[tuple[str, int]], count: int) -> list[str]:
    """Deterministic, evenly interleaved assignment of versions by weight.

    Smooth weighted round robin: any prefix of the fleet has close to the requested shares,
    so a canary wave of the first stations sees the same mix as the whole fleet.
    """
    total = sum(weight for _, weight in mix)
    credit = [0] * len(mix)
    versions = []
    for _ in range(count):
        for i, (_, weight) in enumerate(mix):
            credit[i] += weight
        best = max(range(len(mix)), key=lambda i: credit[i])
        credit[best] -= total
        versions.append(mix[best][0])
    return versions


def identity_for(prefix: str, index: int, count: int) -> str:
    return f"{prefix}{index:0{max(4, len(str(count)))}d}"


_BEHAVIOUR_FIELDS = {f.name for f in dataclasses.fields(Behaviour)}
_SECONDS_BEHAVIOURS = {"charging_seconds", "drop_offline_after", "fall_back_after", "boot_loop"}
_SPEC_FIELDS = {f.name for f in dataclasses.fields(StationSpec)} - {"behaviour"}


def behaviour_from_json(data: Mapping[str, Any], base: Behaviour | None = None) -> Behaviour:
    """Behaviour overrides from a spec file; "charging" and "drop_offline" take seconds too."""
    changes: dict[str, Any] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in _BEHAVIOUR_FIELDS:
            raise ValueError(f"unknown behaviour {key!r}")
        if name == "charging" and _is_seconds(value):
            changes.update(charging=True, charging_seconds=float(value))
        elif name == "drop_offline" and _is_seconds(value):
            changes.update(drop_offline=True, drop_offline_after=float(value))
        elif isinstance(getattr(Behaviour(), name), bool) and not isinstance(value, bool):
            raise ValueError(f"behaviour {key!r} takes true or false, not {value!r}")
        elif name in _SECONDS_BEHAVIOURS and not (value is None or _is_seconds(value)):
            raise ValueError(f"behaviour {key!r} takes seconds, not {value!r}")
        else:
            changes[name] = value
    return dataclasses.replace(base or Behaviour(), **changes)


def _is_seconds(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def apply_overrides(
    specs: Iterable[StationSpec], entries: Sequence[Mapping[str, Any]], *, template: StationSpec
) -> list[StationSpec]:
    """Merge spec-file entries into a fleet.

    An entry whose identity is already in the fleet replaces the fields it names; any other
    entry adds a station built from `template`.
    """
    fleet = {spec.identity: spec for spec in specs}
    for entry in entries:
        if not isinstance(entry, Mapping) or "identity" not in entry:
            raise ValueError(f"each spec entry needs an identity: {entry!r}")
        fields = {k.replace("-", "_"): v for k, v in entry.items()}
        behaviour = fields.pop("behaviour", None) or fields.pop("behaviours", None) or {}
        unknown = set(fields) - _SPEC_FIELDS
        if unknown:
            raise ValueError(f"unknown spec fields {sorted(unknown)} in {entry!r}")
        base = fleet.get(fields["identity"])
        if base is None:
            base = dataclasses.replace(template, identity=fields["identity"], serial_number="")
        fields["behaviour"] = behaviour_from_json(behaviour, base.behaviour)
        if "root_certificates" in fields:
            fields["root_certificates"] = read_roots(fields["root_certificates"])
        fleet[fields["identity"]] = dataclasses.replace(base, **fields)
    return list(fleet.values())


def read_roots(entries: object) -> tuple[str, ...]:
    """Root certificates from a spec entry or the command line: PEM texts or PEM file paths."""
    if isinstance(entries, str):
        entries = [entries]
    if not isinstance(entries, list | tuple):
        raise ValueError(f"root_certificates takes a list of PEM texts or files: {entries!r}")
    pems = []
    for entry in entries:
        if not isinstance(entry, str):
            raise ValueError(f"root certificate entry is not text: {entry!r}")
        pems.append(entry if "-----BEGIN" in entry else Path(entry).read_text())
    return tuple(pems)


def load_spec_file(path: str | Path) -> list[dict[str, Any]]:
    data = json.loads(Path(path).read_text())
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of station entries")
    return data
