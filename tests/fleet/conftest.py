from __future__ import annotations

import datetime
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fleet.models import CsmsBackend
from ocpp_gateway.envelopes import EVENT_STREAM, Event, EventKind

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
def publish(redis_client: redis.Redis) -> Callable[..., list[bytes]]:
    """XADD envelopes the way the gateway does; returns the entry ids."""

    def publish(*events: Event) -> list[bytes]:
        return [redis_client.xadd(EVENT_STREAM, {"e": event.to_json()}) for event in events]

    return publish


@dataclass(frozen=True)
class Certificate:
    pem: str
    der: bytes
    key_pem: str
    sha256: str  # colon-separated upper-case hex, as the command and the admin show it


def make_certificate(common_name: str, *, ca: bool = True) -> Certificate:
    """A self-signed certificate, a CA one unless ``ca`` is False (real X.509, no files)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    return Certificate(
        pem=certificate.public_bytes(serialization.Encoding.PEM).decode(),
        der=certificate.public_bytes(serialization.Encoding.DER),
        key_pem=key_pem,
        sha256=certificate.fingerprint(hashes.SHA256()).hex(":").upper(),
    )


@pytest.fixture(scope="session")
def root_ca() -> Certificate:
    return make_certificate("CSMS 2 Root CA")


@pytest.fixture(scope="session")
def leaf() -> Certificate:
    return make_certificate("csms-2.example.com", ca=False)
