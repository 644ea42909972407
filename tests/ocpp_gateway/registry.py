"""Publish a CSMS's admission registry the way the Django side does: the Redis hashes."""

from __future__ import annotations

import time
from collections.abc import Mapping

import redis
from redis.typing import EncodableT, FieldT

from devstack.processes import wait_until
from ocpp_gateway.envelopes import (
    EVENT_STREAM,
    Event,
    EventKind,
    password_digest,
    registry_entry,
    registry_key,
    registry_meta_key,
)


def publish_registry(
    client: redis.Redis,
    csms: str,
    serials: Mapping[str, str],
    *,
    passwords: Mapping[str, str] | None = None,
    open_admission: bool = False,
) -> None:
    """Register identity -> serial ("" = any) on csms, with optional passwords."""
    passwords = passwords or {}
    entries: dict[FieldT, EncodableT] = {
        identity: registry_entry(
            serial, password_digest(passwords[identity]) if identity in passwords else ""
        )
        for identity, serial in serials.items()
    }
    pipe = client.pipeline(transaction=True)
    pipe.delete(registry_key(csms))
    if entries:
        pipe.hset(registry_key(csms), mapping=entries)
    meta: dict[FieldT, EncodableT] = {
        "version": str(time.time_ns()),
        "open": "1" if open_admission else "0",
        "published_at": str(time.time()),
    }
    pipe.hset(registry_meta_key(csms), mapping=meta)
    pipe.execute()


def stream_events(client: redis.Redis) -> list[Event]:
    events = []
    for _, fields in client.xrange(EVENT_STREAM) or []:
        assert fields is not None  # only a deleted entry has none, and XRANGE skips those
        events.append(Event.from_json(fields[b"e"]))
    return events


def events_of(client: redis.Redis, kind: EventKind, count: int, timeout: float = 5) -> list[Event]:
    """The stream's events of a kind, once at least count of them are there (batched writes)."""

    def found() -> list[Event]:
        events = [event for event in stream_events(client) if event.kind is kind]
        return events if len(events) >= count else []

    return wait_until(found, timeout, f"{count} {kind} events in the stream")
