"""Messages that cross Redis between the Django side and the gateways.

Plain Python on purpose: the gateway process and Django both import this module, and the
gateway must not import Django. Both sides speak OCPP as the ``ocpp`` library's dataclasses
(a request of ``ocpp.v16.call`` in a Command, a result of ``ocpp.v16.call_result`` out of a
Reply); on Redis they travel as the action's name and a snake_case payload (the dataclass's
fields), so that gateways and workers of different versions understand each other during an
upgrade. The gateway converts to camelCase on the wire.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
import uuid
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from enum import Enum, StrEnum
from typing import TYPE_CHECKING, Any, TypeVar

from ocpp.v16 import call

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

# An ocpp.v16.call_result dataclass (what Reply.result builds).
ResultT = TypeVar("ResultT", bound="DataclassInstance")

# Redis names. One place, so both sides always agree.
COMMAND_CHANNEL_PREFIX = "ocpp:cmd:"
REPLY_KEY_PREFIX = "ocpp:reply:"
CLAIM_KEY_PREFIX = "ocpp:claim:"
LAST_BOOT_KEY_PREFIX = "ocpp:boot:"
EVENT_STREAM = "ocpp:events"
EVENT_CONSUMER_GROUP = "inventory"
# The Celery task the gateway nudges when it has appended events (see fleet.tasks).
INGEST_EVENTS_TASK = "fleet.ingest_events"
# The actions the product sends to stations; a gateway relays only these (plus what its
# operator adds with --allow-action / OCPP_GATEWAY_ALLOWED_ACTIONS).
RELAYED_ACTIONS = tuple(
    request.__name__
    for request in (
        call.GetConfiguration,
        call.ChangeConfiguration,
        call.Reset,
        call.GetInstalledCertificateIds,
        # Pre-flight installs the target's root CA through the source when a batch allows it.
        call.InstallCertificate,
    )
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


def new_command_id() -> str:
    return str(uuid.uuid4())


def claim_key(command_id: str) -> str:
    """Whether a command that must reach a station at most once was published (client.py)."""
    return f"{CLAIM_KEY_PREFIX}{command_id}"


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


def payload_of(message: DataclassInstance) -> dict[str, Any]:
    """An OCPP dataclass as its snake_case payload: plain JSON values, unset fields left out
    (as the ``ocpp`` library sends it, before the camelCase of the wire)."""
    return {
        item.name: _plain(value)
        for item in fields(message)
        if (value := getattr(message, item.name)) is not None
    }


def _plain(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if is_dataclass(value) and not isinstance(value, type):
        return payload_of(value)
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items() if item is not None}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value if item is not None]
    return value


def result_of(kind: type[ResultT], payload: dict[str, Any]) -> ResultT | None:
    """A CALLRESULT payload as ``kind`` (an ocpp.v16.call_result dataclass), its enum fields
    as enums; None when the payload does not fit ``kind``. Nested objects stay dicts, as the
    ``ocpp`` library's own ChargePoint.call() leaves them."""
    types = {item.name: item.type for item in fields(kind)}
    values = {}
    for key, value in payload.items():
        if key not in types:
            return None
        field_type = types[key]
        if isinstance(field_type, type) and issubclass(field_type, Enum) and value is not None:
            try:
                value = field_type(value)
            except ValueError:
                return None
        values[key] = value
    try:
        return kind(**values)
    except TypeError:  # a required field missing
        return None


_compact_json = json.JSONEncoder(separators=(",", ":")).encode


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
    id: str = field(default_factory=new_command_id)
    # Only a gateway of this CSMS may send it ("" = whichever holds the station): a rollback
    # meant for the source must not reach the station on the target, and the other way.
    csms: str = ""

    @classmethod
    def calling(
        cls,
        station: str,
        request: DataclassInstance,
        *,
        deadline: float,
        csms: str = "",
        command_id: str = "",
    ) -> Command:
        """The command that sends ``request`` (an ocpp.v16.call dataclass) to the station,
        with ``command_id`` as its id (default: a new one)."""
        return cls(
            station=station,
            action=type(request).__name__,
            payload=payload_of(request),
            deadline=deadline,
            csms=csms,
            id=command_id or new_command_id(),
        )

    def request(self) -> DataclassInstance:
        """The ocpp.v16.call dataclass this command carries; EnvelopeError when none fits."""
        request_type = getattr(call, self.action, None)
        if not (isinstance(request_type, type) and is_dataclass(request_type)):
            raise EnvelopeError(f"unknown action {self.action!r}")
        try:
            request: DataclassInstance = request_type(**self.payload)
        except TypeError as exc:
            raise EnvelopeError(f"bad payload: {exc}") from exc
        return request

    def remaining(self, now: float | None = None) -> float:
        return self.deadline - (time.time() if now is None else now)

    def to_json(self) -> str:
        # By hand, not dataclasses.asdict (a deep copy of the payload): one per command, on
        # the sender's and the gateway's hot path. The keys are the fields, in their order.
        return _compact_json(
            {
                "station": self.station,
                "action": self.action,
                "payload": self.payload,
                "deadline": self.deadline,
                "id": self.id,
                "csms": self.csms,
            }
        )

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

    def result(self, kind: type[ResultT]) -> ResultT | None:
        """The station's CALLRESULT as ``kind``, e.g. ``reply.result(call_result.Reset)``;
        None when the outcome is not a result (or its payload does not fit ``kind``)."""
        if self.outcome is not Outcome.RESULT or not isinstance(self.payload, dict):
            return None
        return result_of(kind, self.payload)

    def to_json(self) -> str:
        # By hand, as Command.to_json: one per command on the gateway's hot path.
        return _compact_json(
            {
                "command_id": self.command_id,
                "station": self.station,
                "csms": self.csms,
                "outcome": self.outcome,
                "payload": self.payload,
                "error_code": self.error_code,
                "error_description": self.error_description,
                "sent_at": self.sent_at,
                "finished_at": self.finished_at,
                "sent": self.sent,
                "boot": self.boot,
            }
        )

    @classmethod
    def from_json(cls, raw: str | bytes) -> Reply:
        data = _load_object(raw, "reply")
        try:
            outcome = Outcome(str(data.get("outcome")))
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
            kind = EventKind(str(data.get("kind")))
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
