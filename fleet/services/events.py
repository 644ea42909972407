"""Apply the gateways' station events (Redis stream ``EVENT_STREAM``) to the inventory.

Delivery is at least once and, with several workers, in no particular order: an entry is
acknowledged only after its batch committed, so a crash re-delivers it. Applying is
therefore idempotent (``StationEvent.event_id`` is unique and a known event is skipped) and
order-independent: every field moves by the event's own time (``at``), never by arrival.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis
from django.db import DataError, IntegrityError, transaction
from django.db.models import Field, Model

from fleet.models import ChargingStation, CsmsBackend, Registration, StationEvent
from fleet.redis import as_text, get_redis
from fleet.rows import update_each
from fleet.services.registry import registry_publish_on_commit, registry_republish_missing
from fleet.signals import station_events_applied
from ocpp_gateway.envelopes import (
    EVENT_CONSUMER_GROUP,
    EVENT_STREAM,
    EnvelopeError,
    Event,
    EventKind,
)

logger = logging.getLogger(__name__)

EVENT_FIELD = b"e"
# An entry unacknowledged this long belongs to a consumer that died: a batch takes
# milliseconds, and a worker waiting on a locked SQLite gives up after 30 s.
RECLAIM_IDLE_MS = 60_000
# The answer a BootNotification got when the CSMS admitted the station.
BOOT_ACCEPTED = "Accepted"
BOOT_REJECTED = "Rejected"

# Event text fields -> station fields, truncated to the column (OCPP's own limits are lower).
_BOOT_FIELDS = {
    "vendor": "vendor",
    "model": "model",
    "serial": "serial",
    "firmware": "firmware_version",
}
_STATION_FIELDS = [
    "csms",
    "vendor",
    "model",
    "serial",
    "firmware_version",
    "connected",
    "connection_changed_at",
    "connections",
    "last_boot_at",
    "last_seen_at",
    "connector_status",
]

StreamEntry = tuple[bytes, dict[bytes, bytes] | None]


@dataclass(frozen=True)
class _Incoming:
    event: Event
    at: datetime


def events_consumer_name() -> str:
    """This process's name in the consumer group: its pending entries are its own."""
    return f"{socket.gethostname()}:{os.getpid()}"


def events_ingest(*, consumer: str, batch_size: int = 500) -> int:
    """Apply every event waiting in the stream; return how many were new to the inventory.

    Reads as ``consumer`` of ``EVENT_CONSUMER_GROUP``: first what this consumer was given
    and did not acknowledge (it died mid-batch under the same name), then what dead
    consumers left pending for over a minute, then new entries, until none is left.
    """
    client = get_redis()
    _group_ensure(client)
    seen: set[str] = set()
    applied = _drain(client, lambda: _read(client, consumer, "0", batch_size), seen)
    applied += _reclaim(client, consumer, batch_size, seen)
    applied += _drain(client, lambda: _read(client, consumer, ">", batch_size), seen)
    _consumers_forget_dead(client)
    # A gateway asks for its registry when Redis lost it; this repairs it even if no
    # gateway asked (or its request was lost with the data).
    registry_republish_missing(seen)
    return applied


# --- Redis side ---------------------------------------------------------------------------


def _group_ensure(client: redis.Redis) -> None:
    try:
        # id 0: events written before the group existed are inventory too.
        client.xgroup_create(EVENT_STREAM, EVENT_CONSUMER_GROUP, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def _read(client: redis.Redis, consumer: str, start: str, count: int) -> list[StreamEntry]:
    try:
        reply = client.xreadgroup(
            EVENT_CONSUMER_GROUP, consumer, {EVENT_STREAM: start}, count=count
        )
    except redis.ResponseError as exc:
        # The stream (and its group) was deleted since _group_ensure: start over empty.
        if "NOGROUP" not in str(exc):
            raise
        _group_ensure(client)
        return []
    # RESP2, the client's protocol: [[stream, entries]], or None when nothing is new.
    assert reply is None or isinstance(reply, list)
    return [entry for _stream, entries in reply or [] for entry in entries]


def _drain(client: redis.Redis, fetch: Callable[[], list[StreamEntry]], seen: set[str]) -> int:
    applied = 0
    while entries := fetch():
        applied += _process(client, entries, seen)
    return applied


def _reclaim(client: redis.Redis, consumer: str, count: int, seen: set[str]) -> int:
    applied = 0
    cursor: bytes | str = "0-0"
    while True:
        reply = client.xautoclaim(
            EVENT_STREAM, EVENT_CONSUMER_GROUP, consumer, RECLAIM_IDLE_MS, cursor, count=count
        )
        # Redis 7 adds a third element (ids deleted meanwhile, already dropped from the PEL).
        cursor, entries = reply[0], reply[1]
        if entries:
            logger.info("reclaimed %d event(s) left pending by a dead consumer", len(entries))
            applied += _process(client, entries, seen)
        if cursor in (b"0-0", "0-0"):
            return applied


def _process(client: redis.Redis, entries: list[StreamEntry], seen: set[str]) -> int:
    """Apply one batch and acknowledge it; add the CSMS names it came from to ``seen``."""
    incoming: list[_Incoming] = []
    for entry_id, fields in entries:
        raw = (fields or {}).get(EVENT_FIELD)
        if raw is None:
            # Deleted after another consumer applied it, or not written by a gateway.
            logger.warning("stream entry %s holds no event; skipped", entry_id.decode())
            continue
        try:
            incoming.append(_incoming_parse(raw))
        except EnvelopeError as exc:
            logger.warning(
                "stream entry %s is not a valid event (%s); skipped", entry_id.decode(), exc
            )
    seen.update(item.event.csms for item in incoming)
    applied = _events_apply_guarded(incoming)
    ids = [entry_id for entry_id, _ in entries]
    # Acknowledge only after the transaction committed: a crash in between re-delivers the
    # batch, and applying it again changes nothing. One consumer group reads this stream,
    # so an acknowledged entry is of no further use: delete it, or the stream grows forever.
    # (A second group would need trimming below the slowest group instead.)
    pipe = client.pipeline(transaction=True)
    pipe.xack(EVENT_STREAM, EVENT_CONSUMER_GROUP, *ids)
    pipe.xdel(EVENT_STREAM, *ids)
    pipe.execute()
    return applied


def _consumers_forget_dead(client: redis.Redis) -> None:
    """Delete this host's consumers whose process is gone and that hold nothing pending.

    Consumers are named host:pid, so each worker restart adds one. Only local ones can be
    known dead for sure; deleting a live consumer could drop entries it was just given.
    """
    prefix = f"{socket.gethostname()}:"
    try:
        consumers = client.xinfo_consumers(EVENT_STREAM, EVENT_CONSUMER_GROUP)
    except redis.ResponseError:
        return
    for info in consumers:
        name = as_text(info["name"])
        pid = name.removeprefix(prefix)
        if info["pending"] or not name.startswith(prefix) or not pid.isdigit():
            continue
        if not _process_alive(int(pid)):
            client.xgroup_delconsumer(EVENT_STREAM, EVENT_CONSUMER_GROUP, name)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _incoming_parse(raw: bytes | str) -> _Incoming:
    event = Event.from_json(raw)
    if not event.id or len(event.id) > _max_length(StationEvent, "event_id"):
        raise EnvelopeError(f"event id {event.id!r} is empty or too long")
    identity_max = _max_length(ChargingStation, "identity")
    if not event.station or len(event.station) > identity_max or not event.station.isprintable():
        raise EnvelopeError(f"station identity {event.station!r} is empty, too long or unprintable")
    if not event.csms:
        raise EnvelopeError("the CSMS name is empty")
    if not isinstance(event.data, dict):
        raise EnvelopeError(f"data is a {type(event.data).__name__}, not an object")
    if not math.isfinite(event.at):
        raise EnvelopeError(f"time {event.at!r} is not a number")
    try:
        at = datetime.fromtimestamp(event.at, tz=UTC)
    except (OverflowError, OSError, ValueError) as exc:
        raise EnvelopeError(f"time {event.at!r} is out of range") from exc
    return _Incoming(event=event, at=at)


# --- Database side ------------------------------------------------------------------------


def _events_apply_guarded(items: list[_Incoming]) -> int:
    try:
        return _events_apply(items)
    except (DataError, IntegrityError):
        # Something in the batch the database refuses (text PostgreSQL cannot store, a
        # backend deleted meanwhile): find it rather than lose the batch or block the stream.
        if len(items) > 1:
            return sum(_events_apply_guarded([item]) for item in items)
        logger.exception("event %s cannot be stored; skipped", items[0].event.id)
        return 0


def _events_apply(items: list[_Incoming]) -> int:
    if not items:
        return 0
    names = {item.event.csms for item in items}
    backends = {b.name: b for b in CsmsBackend.objects.filter(name__in=names)}
    known: dict[str, _Incoming] = {}
    unknown: Counter[str] = Counter()
    for item in items:
        if item.event.csms in backends:
            known.setdefault(item.event.id, item)
        else:
            unknown[item.event.csms] += 1
    for name, count in unknown.items():
        logger.warning(
            "dropped %d event(s) from CSMS %r, which is not in the inventory "
            "(add it with `manage.py add_csms`)",
            count,
            name,
        )
    if not known:
        return 0

    # Durable: the entries are acknowledged right after this block, so it must be a real
    # commit, not a savepoint inside a caller's transaction that could still roll back.
    with transaction.atomic(durable=True):
        seen = set(
            StationEvent.objects.filter(event_id__in=list(known)).values_list("event_id", flat=True)
        )
        fresh = sorted(
            (item for item in known.values() if item.event.id not in seen),
            key=lambda item: (item.at, item.event.id),
        )
        if not fresh:
            return 0
        stations = _stations_lock({item.event.station for item in fresh})
        changed: dict[int, ChargingStation] = {}
        boots: dict[tuple[int, int], datetime] = {}
        booted: set[int] = set()
        status_changed: dict[int, ChargingStation] = {}
        for item in fresh:
            station = stations[item.event.station]
            backend = backends[item.event.csms]
            if item.event.kind is EventKind.BOOT:
                # Any answer: a migration waits for a rejected or pending boot on its target
                # as much as for an accepted one.
                booted.add(station.pk)
            if not _inventory_may_change(item.event):
                if _rejection_merge(station, item, backend):
                    changed[station.pk] = station
                continue
            if _station_merge(station, item, backend):
                changed[station.pk] = station
                if item.event.kind is EventKind.STATUS:
                    status_changed[station.pk] = station
            if item.event.kind is EventKind.BOOT:
                key = (station.pk, backend.pk)
                boots[key] = max(boots.get(key, item.at), item.at)
        if changed:
            _stations_save(list(changed.values()))
        if boots:
            admitted = _registrations_activate(boots)
            registry_publish_on_commit(
                backend.name for backend in backends.values() if backend.pk in admitted
            )
        StationEvent.objects.bulk_create(
            [
                StationEvent(
                    event_id=item.event.id,
                    station_id=stations[item.event.station].pk,
                    csms=backends[item.event.csms],
                    kind=item.event.kind.value,
                    at=item.at,
                    data=item.event.data,
                )
                for item in fresh
            ],
            batch_size=500,
            # Two consumers may apply one re-delivered entry at once; both merges agree.
            ignore_conflicts=True,
        )
        _announce_on_commit(
            booted, {pk: station.connector_status for pk, station in status_changed.items()}
        )
    return len(fresh)


def _announce_on_commit(booted: set[int], connectors: dict[int, dict[str, Any]]) -> None:
    """Tell the other apps what the batch changed once it is committed (fleet.signals)."""
    if not booted and not connectors:
        return

    def send() -> None:
        results = station_events_applied.send_robust(
            sender=ChargingStation, booted=frozenset(booted), connectors=connectors
        )
        for receiver, result in results:
            if isinstance(result, Exception):
                # The events are in the inventory; whoever waited on them looks again later.
                logger.warning(
                    "receiver %r of station_events_applied raised", receiver, exc_info=result
                )

    transaction.on_commit(send)


def _stations_lock(identities: set[str]) -> dict[str, ChargingStation]:
    ordered = sorted(identities)
    existing = set(
        ChargingStation.objects.filter(identity__in=ordered).values_list("identity", flat=True)
    )
    missing = [identity for identity in ordered if identity not in existing]
    if missing:
        # A station appears with its first event of any kind, not only its boot: with
        # several consumers its connect or status may be applied before its boot, and must
        # not be lost. The boot fills in vendor, model and firmware whenever it arrives.
        ChargingStation.objects.bulk_create(
            [ChargingStation(identity=identity) for identity in missing], ignore_conflicts=True
        )
    # Insert first, then lock everything in identity order: two consumers with overlapping
    # batches take the row locks in the same order and cannot deadlock.
    return {
        station.identity: station
        for station in ChargingStation.objects.select_for_update()
        .filter(identity__in=ordered)
        .order_by("identity")
    }


def _stations_save(stations: list[ChargingStation]) -> None:
    """Write the merged fields of locked stations back, one prepared UPDATE per row."""
    update_each(ChargingStation, _STATION_FIELDS, stations)


def _registrations_activate(boots: dict[tuple[int, int], datetime]) -> set[int]:
    """An accepted boot on a CSMS means the station is registered there: make that
    registration active. Return the CSMS whose admitted set grew.

    Only a boot newer than the registration's last change counts: a late event from before
    a migration marked the old registration for removal must not bring it back.
    """
    existing = {
        (reg.station_id, reg.csms_id): reg
        for reg in Registration.objects.filter(
            station_id__in={station_id for station_id, _ in boots},
            csms_id__in={csms_id for _, csms_id in boots},
        )
    }
    new = [key for key in boots if key not in existing]
    Registration.objects.bulk_create(
        [
            Registration(
                station_id=station_id,
                csms_id=csms_id,
                state=Registration.State.ACTIVE,
                state_changed_at=boots[station_id, csms_id],
            )
            for station_id, csms_id in new
        ],
        ignore_conflicts=True,
    )
    grown = {csms_id for _, csms_id in new}
    for key, at in boots.items():
        reg = existing.get(key)
        if reg is None or reg.state == Registration.State.ACTIVE or reg.state_changed_at >= at:
            continue
        # Conditional on what we read: a migration changing it meanwhile wins.
        updated = Registration.objects.filter(
            pk=reg.pk, state=reg.state, state_changed_at=reg.state_changed_at
        ).update(state=Registration.State.ACTIVE, state_changed_at=at)
        if updated and reg.state == Registration.State.REMOVED:
            grown.add(reg.csms_id)
    return grown


def _inventory_may_change(event: Event) -> bool:
    """Whether the event may change the inventory, or is only kept as a StationEvent.

    Only a boot the CSMS accepted speaks for the station (gateways before the boot status
    sent none): a Pending or Rejected boot may come from an impostor with the identity of a
    real station, whose serial number must not overwrite the real one. A security event is
    for the audit only.
    """
    if event.kind is EventKind.SECURITY:
        return False
    if event.kind is EventKind.BOOT:
        return event.data.get("status") in (None, "", BOOT_ACCEPTED)
    return True


def _station_merge(station: ChargingStation, item: _Incoming, backend: CsmsBackend) -> bool:
    """Fold one event into the station; return whether anything changed."""
    event, at = item.event, item.at
    changed = False
    if station.last_seen_at is None or at > station.last_seen_at:
        station.last_seen_at = at
        changed = True
    if station.csms_id is None:
        # Until a boot says where it is, the CSMS that reported it is the best guess.
        station.csms = backend
        changed = True
    if event.kind is EventKind.BOOT:
        return _boot_merge(station, event.data, at, backend) or changed
    if event.kind is EventKind.STATUS:
        return _status_merge(station, event.data, at) or changed
    return _connection_merge(station, event, at, backend) or changed


def _boot_merge(
    station: ChargingStation, data: dict[str, Any], at: datetime, backend: CsmsBackend
) -> bool:
    if station.last_boot_at is not None and at < station.last_boot_at:
        return False
    station.last_boot_at = at
    station.csms = backend
    for key, attr in _BOOT_FIELDS.items():
        value = _text(data.get(key), _column_field(ChargingStation, attr).max_length)
        # An optional field left out of one boot does not erase what an earlier one said.
        if value:
            setattr(station, attr, value)
    return True


def _rejection_merge(station: ChargingStation, item: _Incoming, backend: CsmsBackend) -> bool:
    """A boot the CSMS rejected: its gateway closes that connection, which says nothing
    about where the station is. Remember the rejection so that the connection it came on
    is not taken for the station's (an impostor would otherwise make it look offline)."""
    event, at = item.event, item.at
    if event.kind is not EventKind.BOOT or event.data.get("status") != BOOT_REJECTED:
        return False
    entry = dict(station.connections.get(backend.name) or {})
    previous = _parse_time(entry.get("rejected_at"))
    if previous is not None and at <= previous:
        return False
    entry["rejected_at"] = at.isoformat()
    station.connections = {**station.connections, backend.name: entry}
    _connection_derive(station)
    return True


def _status_merge(station: ChargingStation, data: dict[str, Any], at: datetime) -> bool:
    try:
        connector = int(data["connector_id"])
    except (KeyError, TypeError, ValueError):
        return False
    if connector < 0:
        return False
    key = str(connector)
    previous = station.connector_status.get(key)
    previous_at = _parse_time(previous.get("at")) if isinstance(previous, dict) else None
    if previous_at is not None and at <= previous_at:
        return False
    station.connector_status = {
        **station.connector_status,
        key: {
            "status": _text(data.get("status"), 50),
            "error_code": _text(data.get("error_code"), 50),
            "at": at.isoformat(),
        },
    }
    return True


def _connection_merge(
    station: ChargingStation, event: Event, at: datetime, backend: CsmsBackend
) -> bool:
    if event.kind is EventKind.DISCONNECT and event.data.get("replaced"):
        # The gateway closed this socket because the station opened a new one: it says
        # nothing about whether the station is connected.
        return False
    field = "connected_at" if event.kind is EventKind.CONNECT else "disconnected_at"
    entry = dict(station.connections.get(backend.name) or {})
    previous = _parse_time(entry.get(field))
    if previous is not None and at <= previous:
        return False
    entry[field] = at.isoformat()
    station.connections = {**station.connections, backend.name: entry}
    _connection_derive(station)
    return True


def _connection_derive(station: ChargingStation) -> None:
    """Set ``connected`` from the per-CSMS connect/disconnect times.

    The CSMS with the newest connect is where the station is; only that CSMS's own
    disconnect counts. A newer disconnect from a CSMS the station has left is its old
    gateway noticing the dead socket late (a station reset without closing it), and a
    missing one (that gateway died) must not keep the station "connected" forever.
    """
    current: tuple[datetime, str] | None = None
    disconnects: list[datetime] = []
    for name, entry in station.connections.items():
        connected_at = _parse_time(entry.get("connected_at"))
        disconnected_at = _parse_time(entry.get("disconnected_at"))
        rejected_at = _parse_time(entry.get("rejected_at"))
        if rejected_at is not None and connected_at is not None and connected_at <= rejected_at:
            # The connection that carried a rejected boot: not the station's whereabouts.
            continue
        if disconnected_at is not None:
            disconnects.append(disconnected_at)
        if connected_at is not None and (current is None or (connected_at, name) > current):
            current = (connected_at, name)
    if current is None:
        station.connected = False
        if disconnects:
            station.connection_changed_at = max(disconnects)
        return
    connected_at, name = current
    disconnected_at = _parse_time(station.connections[name].get("disconnected_at"))
    if disconnected_at is not None and disconnected_at > connected_at:
        station.connected = False
        station.connection_changed_at = disconnected_at
    else:
        station.connected = True
        station.connection_changed_at = connected_at


def _parse_time(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def _column_field(model: type[Model], name: str) -> Field[Any, Any]:
    """A field of `model` stored in a column (get_field also finds reverse relations)."""
    field = model._meta.get_field(name)
    assert isinstance(field, Field), f"{model.__name__}.{name} has no column"
    return field


def _max_length(model: type[Model], name: str) -> int:
    limit = _column_field(model, name).max_length
    assert limit is not None, f"{model.__name__}.{name} has no max_length"
    return limit


def _text(value: object, limit: int | None) -> str:
    if value is None:
        return ""
    # PostgreSQL text cannot hold NUL.
    return str(value).replace("\x00", "").strip()[:limit]
