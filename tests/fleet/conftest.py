from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import redis

from fleet.models import CsmsBackend
from ocpp_gateway.envelopes import EVENT_STREAM, Event, EventKind
from tests.simulator.certs import Ca, make_root, make_self_signed_leaf

# A fixed base time: tests reason about "earlier" and "later", never about the clock.
T0 = time.time() - 3600


@pytest.fixture
def alpha(db) -> CsmsBackend:
    return CsmsBackend.objects.create(name="alpha", url="ws://alpha.example.com/ocpp")


@pytest.fixture
def beta(db) -> CsmsBackend:
    return CsmsBackend.objects.create(name="beta", url="wss://beta.example.com/ocpp")


EventFactory = Callable[..., Event]


@pytest.fixture
def make_event() -> EventFactory:
    """Build an envelope like the gateway's; ``at`` is seconds after T0."""

    def make(kind: EventKind, station: str, csms: str = "alpha", at: float = 0, **data) -> Event:
        if kind is EventKind.BOOT:
            data = {"vendor": "Acme", "model": "AC22", "serial": "", "firmware": "1.0", **data}
        if kind is EventKind.STATUS:
            data = {"connector_id": 1, "status": "Available", "error_code": "NoError", **data}
        return Event(kind=kind, station=station, csms=csms, at=T0 + at, data=data)

    return make


@pytest.fixture
def publish(redis_client: redis.Redis) -> Callable[..., list[bytes | str]]:
    """XADD envelopes the way the gateway does; returns the entry ids."""

    def publish(*events: Event) -> list[bytes | str]:
        return [redis_client.xadd(EVENT_STREAM, {"e": event.to_json()}) for event in events]

    return publish


@pytest.fixture(scope="session")
def root_ca() -> Ca:
    return make_root("CSMS 2 Root CA")


@pytest.fixture(scope="session")
def leaf() -> Ca:
    return make_self_signed_leaf("csms-2.example.com")
