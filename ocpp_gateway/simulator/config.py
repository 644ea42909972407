"""The station's configuration keys and the firmware's ChangeConfiguration rules.

Pure logic, no I/O: the station decides what to do with an outcome (persist, journal).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from urllib.parse import urlsplit

from ocpp.v16.enums import ConfigurationStatus

PROFILE_1 = "NetworkConnectionProfile1"
PROFILE_2 = "NetworkConnectionProfile2"
PRIORITY = "NetworkConfigurationPriority"
PROFILE_TIMEOUT = "NetworkProfileConnectionTimeoutSec"
PROFILE_KEYS = (PROFILE_1, PROFILE_2)
NETWORK_KEYS = (PROFILE_1, PROFILE_2, PRIORITY, PROFILE_TIMEOUT)
DEFAULT_PRIORITY = f"{PROFILE_1},{PROFILE_2}"

HEARTBEAT_INTERVAL = "HeartbeatInterval"
NUMBER_OF_CONNECTORS = "NumberOfConnectors"
AUTHORIZE_REMOTE_TX = "AuthorizeRemoteTxRequests"
# OCPP 1.6 security extension: a new CentralSystemRootCertificate is accepted only when an
# installed one signed it. Read-only, as in the whitepaper's key list.
ADDITIONAL_ROOT_CHECK = "AdditionalRootCertificateCheck"

# The vendor's firmware refuses these anywhere in a value (see the migration procedure).
_FORBIDDEN = re.compile(r"[\s\"'`]")


class Kind(enum.Enum):
    TEXT = "text"
    INT = "int"
    BOOL = "bool"
    URL = "url"
    PRIORITY = "priority"


@dataclass(frozen=True, slots=True)
class KeySpec:
    name: str
    kind: Kind
    readonly: bool
    default: str


_STANDARD_KEYS = (
    KeySpec("AllowOfflineTxForUnknownId", Kind.BOOL, False, "false"),
    KeySpec("AuthorizationCacheEnabled", Kind.BOOL, False, "true"),
    KeySpec(AUTHORIZE_REMOTE_TX, Kind.BOOL, False, "false"),
    KeySpec("ClockAlignedDataInterval", Kind.INT, False, "0"),
    KeySpec("ConnectionTimeOut", Kind.INT, False, "60"),
    KeySpec("ConnectorPhaseRotation", Kind.TEXT, False, "0.RST,1.RST"),
    KeySpec("GetConfigurationMaxKeys", Kind.INT, True, "64"),
    KeySpec(HEARTBEAT_INTERVAL, Kind.INT, False, "300"),
    KeySpec("LocalAuthorizeOffline", Kind.BOOL, False, "true"),
    KeySpec("LocalPreAuthorize", Kind.BOOL, False, "false"),
    KeySpec("LocalAuthListEnabled", Kind.BOOL, False, "true"),
    KeySpec("LocalAuthListMaxLength", Kind.INT, True, "1000"),
    KeySpec("MeterValuesAlignedData", Kind.TEXT, False, "Energy.Active.Import.Register"),
    KeySpec("MeterValuesSampledData", Kind.TEXT, False, "Energy.Active.Import.Register"),
    KeySpec("MeterValueSampleInterval", Kind.INT, False, "60"),
    KeySpec(NUMBER_OF_CONNECTORS, Kind.INT, True, "1"),
    KeySpec("ResetRetries", Kind.INT, False, "3"),
    KeySpec("SendLocalListMaxLength", Kind.INT, True, "100"),
    KeySpec("StopTransactionOnEVSideDisconnect", Kind.BOOL, False, "true"),
    KeySpec("StopTransactionOnInvalidId", Kind.BOOL, False, "true"),
    KeySpec("StopTxnAlignedData", Kind.TEXT, False, ""),
    KeySpec("StopTxnSampledData", Kind.TEXT, False, ""),
    KeySpec(
        "SupportedFeatureProfiles",
        Kind.TEXT,
        True,
        "Core,FirmwareManagement,LocalAuthListManagement,Reservation,SmartCharging,RemoteTrigger",
    ),
    KeySpec("TransactionMessageAttempts", Kind.INT, False, "3"),
    KeySpec("TransactionMessageRetryInterval", Kind.INT, False, "60"),
    KeySpec("UnlockConnectorOnEVSideDisconnect", Kind.BOOL, False, "true"),
    KeySpec("WebSocketPingInterval", Kind.INT, False, "0"),
)

_NETWORK_KEYS = (
    KeySpec(PROFILE_1, Kind.URL, False, ""),
    KeySpec(PROFILE_2, Kind.URL, False, ""),
    KeySpec(PRIORITY, Kind.PRIORITY, False, DEFAULT_PRIORITY),
    KeySpec(PROFILE_TIMEOUT, Kind.INT, False, "30"),
)


_SECURITY_KEYS = (KeySpec(ADDITIONAL_ROOT_CHECK, Kind.BOOL, True, "false"),)


@cache
def key_table(with_network_keys: bool, with_security: bool = True) -> Mapping[str, KeySpec]:
    """The keys a firmware knows, shared by every station on that firmware."""
    keys = _STANDARD_KEYS + (_NETWORK_KEYS if with_network_keys else ())
    keys += _SECURITY_KEYS if with_security else ()
    return {spec.name: spec for spec in sorted(keys, key=lambda s: s.name)}


@dataclass(frozen=True, slots=True)
class Change:
    """What the firmware answers to one ChangeConfiguration, and why."""

    status: ConfigurationStatus
    reason: str | None = None

    @property
    def applies(self) -> bool:
        return self.status in (ConfigurationStatus.accepted, ConfigurationStatus.reboot_required)


class StationConfig:
    """Configuration values: shared defaults per firmware plus this station's own values.

    Only values that differ from the firmware defaults are stored per station, which keeps
    a 10,000-station fleet small.
    """

    __slots__ = ("_keys", "_values")

    def __init__(self, keys: Mapping[str, KeySpec], values: Mapping[str, str]) -> None:
        self._keys = keys
        self._values: dict[str, str] = {}
        for key, value in values.items():
            self.set(key, value)

    def knows(self, key: str) -> bool:
        return key in self._keys

    def spec(self, key: str) -> KeySpec:
        return self._keys[key]

    def get(self, key: str, default: str | None = None) -> str | None:
        """The value, whether or not the key is exposed (profiles exist on any firmware)."""
        if key in self._values:
            return self._values[key]
        spec = self._keys.get(key)
        return spec.default if spec else default

    def __getitem__(self, key: str) -> str:
        value = self.get(key)
        if value is None:
            raise KeyError(key)
        return value

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def get_int(self, key: str, default: int) -> int:
        try:
            return int(self.get(key) or default)
        except ValueError:
            return default

    def as_dict(self) -> dict[str, str]:
        """Every exposed key with its value (what GetConfiguration without keys returns)."""
        return {key: self[key] for key in self._keys}

    def set(self, key: str, value: str) -> None:
        """Store a value as is: callers validate first with `check`."""
        spec = self._keys.get(key)
        if spec is not None and spec.default == value:
            self._values.pop(key, None)
        else:
            self._values[key] = value

    def read(self, keys: Iterable[str] | None) -> tuple[list[KeySpec], list[str]]:
        """Split requested keys into known (in request order) and unknown ones."""
        if keys is None:
            return list(self._keys.values()), []
        known, unknown = [], []
        for key in keys:
            spec = self._keys.get(key)
            if spec is None:
                unknown.append(key)
            else:
                known.append(spec)
        return known, unknown

    def check(self, key: str, value: str, *, identity: str) -> Change:
        """Apply the firmware's rules to a ChangeConfiguration, without storing anything."""
        spec = self._keys.get(key)
        if spec is None:
            return Change(ConfigurationStatus.not_supported, "unknown key")
        if spec.readonly:
            return Change(ConfigurationStatus.rejected, "read-only")
        if _FORBIDDEN.search(value):
            return Change(ConfigurationStatus.rejected, "whitespace or quote in value")
        reason = _VALIDATORS[spec.kind](value, identity)
        if reason:
            return Change(ConfigurationStatus.rejected, reason)
        if spec.kind is Kind.PRIORITY:
            # The firmware reads the priority only while booting.
            return Change(ConfigurationStatus.reboot_required)
        return Change(ConfigurationStatus.accepted)


def _check_text(value: str, identity: str) -> str | None:
    return None


def _check_int(value: str, identity: str) -> str | None:
    return None if value.isdigit() else "not a non-negative integer"


def _check_bool(value: str, identity: str) -> str | None:
    return None if value.lower() in ("true", "false") else "not true or false"


def _check_url(value: str, identity: str) -> str | None:
    if value == "":
        # Step 7 of the procedure: an empty profile removes an old CSMS.
        return None
    if value.rstrip("/").endswith(identity):
        # The firmware appends its identity itself; a value ending in it would double it.
        return "value ends with the station identity"
    parts = urlsplit(value)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        return "not a ws:// or wss:// URL"
    return None


def _check_priority(value: str, identity: str) -> str | None:
    names = value.split(",")
    if len(names) != len(PROFILE_KEYS) or set(names) != set(PROFILE_KEYS):
        return f"not a comma list of {PROFILE_1} and {PROFILE_2}"
    return None


_VALIDATORS = {
    Kind.TEXT: _check_text,
    Kind.INT: _check_int,
    Kind.BOOL: _check_bool,
    Kind.URL: _check_url,
    Kind.PRIORITY: _check_priority,
}
