"""Messages that cross Redis between the Django side and the gateways.

Plain Python on purpose: the gateway process and Django both import this module, and the
gateway must not import Django. Payloads are OCPP payloads in snake_case (as the ``ocpp``
dataclasses name their fields); the gateway converts to camelCase on the wire.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
import uuid
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

# Redis names. One place, so both sides always agree.
COMMAND_CHANNEL_PREFIX = "ocpp:cmd:"
REPLY_KEY_PREFIX = "ocpp:reply:"
LAST_BOOT_KEY_PREFIX = "ocpp:boot:"
EVENT_STREAM = "ocpp:events"
EVENT_CONSUMER_GROUP = "inventory"
# The Celery task the gateway nudges when it has appended events (see fleet.tasks).
INGEST_EVENTS_TASK = "fleet.ingest_events"
# The actions the product sends to stations; a gateway relays only these (plus what its
# operator adds with --allow-action / OCPP_GATEWAY_ALLOWED_ACTIONS).
RELAYED_ACTIONS = (
    "GetConfiguration",
    "ChangeConfiguration",
    "Reset",
    "GetInstalledCertificateIds",
    # Pre-flight installs the target's root CA through the source when a batch allows it.
    "InstallCertificate",
)
# The longest a gateway waits for one Redis call: a Redis that stopped answering (not
# refusing) must not hold the gateway's loops for long.
REDIS_CALL_TIMEOUT = 5.0
# A reply nobody collects (the caller gave up) must not stay in Redis forever.
REPLY_TTL_SECONDS = 300
# The stations registered on a CSMS, published by the Django side for its gateways
# (admission): a hash identity -> JSON {"serial": str, "password_sha256": str}, where ""
# means "any serial" / "no password"; and a meta hash {"version", "open", "published_at"}.
# A gateway polls the meta hash and reloads the registry when the version changes; when
# the meta hash is missing (Redis lost its data) it keeps what it had and asks for a
# republish with PUBLISH_REGISTRY_TASK(csms).
REGISTRY_KEY_PREFIX = "ocpp:registry:"
PUBLISH_REGISTRY_TASK = "fleet.publish_registry"


def command_channel(station: str) -> str:
    return f"{COMMAND_CHANNEL_PREFIX}{station}"


def reply_key(command_id: str) -> str:
    return f"{REPLY_KEY_PREFIX}{command_id}"


def registry_key(csms: str) -> str:
    return f"{REGISTRY_KEY_PREFIX}{csms}"


def registry_meta_key(csms: str) -> str:
    return f"{REGISTRY_KEY_PREFIX}{csms}:meta"


def last_boot_key(csms: str) -> str:
    """A hash per CSMS: station identity -> JSON of its last BootNotification."""
    return f"{LAST_BOOT_KEY_PREFIX}{csms}"


def password_digest(password: str, salt: str | None = None) -> str:
    """ "salt$sha256(salt + password)": what a registry entry keeps instead of the password.

    A fast hash on purpose: a gateway checks it on every handshake of thousands of stations,
    and station passwords (OCPP AuthorizationKey) are long machine-made secrets.
    """
    salt = salt if salt is not None else secrets.token_hex(8)
    return f"{salt}${hashlib.sha256((salt + password).encode()).hexdigest()}"


def password_matches(digest: str, password: str) -> bool:
    salt, sep, _ = digest.partition("$")
    if not sep:
        return False
    return hmac.compare_digest(password_digest(password, salt).encode(), digest.encode())


def registry_entry(serial: str = "", password_sha256: str = "") -> str:
    """One station's value in the registry hash (see REGISTRY_KEY_PREFIX)."""
    return json.dumps({"serial": serial, "password_sha256": password_sha256})


class EnvelopeError(ValueError):
    """A message on Redis that is not a well-formed envelope."""


def _load_object(raw: str | bytes, what: str) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except (TypeError, ValueError) as exc:
        raise EnvelopeError(f"{what} is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise EnvelopeError(f"{what} is not a JSON object")
    return data


def _require(data: dict[str, Any], key: str, kind: type | tuple[type, ...], what: str) -> Any:
    value = data.get(key)
    # bool is an int subclass; no envelope field is a bool.
    if isinstance(value, bool) or not isinstance(value, kind):
        raise EnvelopeError(f"{what} field {key!r} is missing or not {kind}")
    return value


@dataclass(frozen=True)
class Command:
    """One OCPP call for one station, with an absolute deadline (epoch seconds)."""

    station: str
    action: str
    payload: dict[str, Any]
    deadline: float
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    # Only a gateway of this CSMS may send it ("" = whichever holds the station): a rollback
    # meant for the source must not reach the station on the target, and the other way.
    csms: str = ""

    def remaining(self, now: float | None = None) -> float:
        return self.deadline - (time.time() if now is None else now)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> Command:
        data = _load_object(raw, "command")
        return cls(
            id=_require(data, "id", str, "command"),
            station=_require(data, "station", str, "command"),
            action=_require(data, "action", str, "command"),
            payload=_require(data, "payload", dict, "command"),
            deadline=float(_require(data, "deadline", (int, float), "command")),
            csms=data.get("csms") or "",
        )


class Outcome(StrEnum):
    RESULT = "result"  # the station answered with a CALLRESULT
    CALL_ERROR = "call_error"  # the station answered with a CALLERROR
    TIMEOUT = "timeout"  # the station did not answer before the deadline
    BAD_RESPONSE = "bad_response"  # the station answered with a payload that fails the schema
    REJECTED = "rejected"  # the gateway refused the command (bad action or payload)
    # The gateway lost the station before it could answer. With more than one receiver
    # (a stale connection on another gateway) the caller waits for the other replies.
    DISCONNECTED = "disconnected"


@dataclass(frozen=True)
class Reply:
    """The outcome of one Command, pushed by the gateway that holds the station."""

    command_id: str
    station: str
    csms: str
    outcome: Outcome
    payload: dict[str, Any] | None = None
    error_code: str = ""
    error_description: str = ""
    # When the gateway sent the OCPP call and when the answer (or the timeout) came.
    sent_at: float | None = None
    finished_at: float | None = None
    # Whether the call reached the station's socket. False only when the gateway knows it
    # did not (a Reset not sent may be sent again); unknown counts as sent.
    sent: bool = True
    # What the station's BootNotification on this connection said of its hardware (vendor,
    # model, serial, charge_point_serial, charge_box_serial); None when it connected
    # without one (a reconnect). Lets the Django side check who answered.
    boot: dict[str, Any] | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> Reply:
        data = _load_object(raw, "reply")
        try:
            outcome = Outcome(data.get("outcome"))
        except ValueError as exc:
            raise EnvelopeError(f"reply has an unknown outcome {data.get('outcome')!r}") from exc
        return cls(
            command_id=_require(data, "command_id", str, "reply"),
            station=_require(data, "station", str, "reply"),
            csms=_require(data, "csms", str, "reply"),
            outcome=outcome,
            payload=data.get("payload"),
            error_code=data.get("error_code") or "",
            error_description=data.get("error_description") or "",
            sent_at=data.get("sent_at"),
            finished_at=data.get("finished_at"),
            sent=data.get("sent") is not False,
            boot=data["boot"] if isinstance(data.get("boot"), dict) else None,
        )


class EventKind(StrEnum):
    CONNECT = "connect"
    DISCONNECT = "disconnect"
    BOOT = "boot"
    STATUS = "status"
    # Something that may be an attack: an impostor refused, a boot from other hardware.
    SECURITY = "security"


@dataclass(frozen=True)
class Event:
    """Something a station did on a gateway. ``at`` is epoch seconds at the gateway.

    ``data`` by kind: boot -> vendor, model, serial, charge_point_serial, charge_box_serial,
    firmware (BootNotification fields), status (the answer the station got: Accepted,
    Pending or Rejected) and reason (why, when not Accepted); status -> connector_id,
    status, error_code; connect -> remote address, authenticated; disconnect -> close
    code; security -> reason and what was seen.
    """

    kind: EventKind
    station: str
    csms: str
    at: float
    data: dict[str, Any] = field(default_factory=dict)
    id: str = field(default_factory=lambda: str(uuid.uuid4()))

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> Event:
        data = _load_object(raw, "event")
        try:
            kind = EventKind(data.get("kind"))
        except ValueError as exc:
            raise EnvelopeError(f"event has an unknown kind {data.get('kind')!r}") from exc
        return cls(
            id=_require(data, "id", str, "event"),
            kind=kind,
            station=_require(data, "station", str, "event"),
            csms=_require(data, "csms", str, "event"),
            at=float(_require(data, "at", (int, float), "event")),
            data=data.get("data") or {},
        )
