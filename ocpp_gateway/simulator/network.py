"""Network profiles as the firmware reads them at boot, and one websocket connection attempt."""

from __future__ import annotations

import base64
import ssl
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import quote, urlsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import WebSocketException

from ocpp_gateway.connections import SUBPROTOCOL
from ocpp_gateway.simulator.config import DEFAULT_PRIORITY, PRIORITY, PROFILE_KEYS, StationConfig

# What a failed attempt can raise: refused/unreachable (OSError), open_timeout (TimeoutError),
# a refused handshake such as 401/404 (WebSocketException), or our own ConnectError.
CONNECT_ERRORS = (OSError, TimeoutError, WebSocketException)


class ConnectError(ConnectionError):
    """The handshake succeeded but the station will not use the connection."""


@dataclass(frozen=True, slots=True)
class Profile:
    name: str
    url: str


def boot_profiles(config: StationConfig) -> tuple[Profile, ...]:
    """The profiles to try, in priority order, skipping empty ones.

    Read once per boot: the firmware applies priority and URL changes only when it reboots.
    """
    priority = (config.get(PRIORITY) or DEFAULT_PRIORITY).split(",")
    names = [name for name in priority if name in PROFILE_KEYS]
    # A priority naming one profile still leaves the other as a last resort.
    names += [name for name in PROFILE_KEYS if name not in names]
    profiles = (Profile(name, config.get(name) or "") for name in names)
    return tuple(profile for profile in profiles if profile.url)


def station_uri(url: str, identity: str) -> str:
    """The profile URL holds the CSMS endpoint; the station appends its own identity."""
    return f"{url.rstrip('/')}/{quote(identity, safe='')}"


def basic_auth(identity: str, password: str) -> str:
    token = base64.b64encode(f"{identity}:{password}".encode()).decode("ascii")
    return f"Basic {token}"


@lru_cache(maxsize=64)
def tls_context(trusted_roots: tuple[str, ...]) -> ssl.SSLContext:
    """What a wss:// profile is verified against: the station's installed roots only, as
    firmware does (a missing CSMS root is a failed handshake); none installed: the system's
    trust store. Shared by every station with the same roots.

    An installed root is a trust anchor even when another root signed it (a root rolled
    over under AdditionalRootCertificateCheck): the chain need not reach a self-signed one.
    """
    if not trusted_roots:
        return ssl.create_default_context()
    context = ssl.create_default_context(cadata="\n".join(trusted_roots))
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    return context


async def open_connection(
    url: str,
    identity: str,
    *,
    trusted_roots: tuple[str, ...] = (),
    password: str | None,
    user_agent: str,
    open_timeout: float,
    close_timeout: float,
) -> ClientConnection:
    """One attempt to open the OCPP websocket; raises one of CONNECT_ERRORS on failure."""
    headers = {"Authorization": basic_auth(identity, password)} if password else None
    # websockets refuses an ssl context for a ws:// URL (None is no TLS).
    tls = tls_context(trusted_roots) if urlsplit(url).scheme == "wss" else None
    ws = await connect(
        station_uri(url, identity),
        subprotocols=[SUBPROTOCOL],
        additional_headers=headers,
        user_agent_header=user_agent,
        # Frames are tiny; deflate would triple the memory of each connection.
        compression=None,
        # A simulator must reach the URL it is given, not an HTTP(S)_PROXY from the env.
        proxy=None,
        open_timeout=open_timeout,
        close_timeout=close_timeout,
        # Liveness comes from OCPP Heartbeat (a timeout there drops the connection), which
        # saves a ping timer per station.
        ping_interval=None,
        max_queue=8,
        ssl=tls,
    )
    if ws.subprotocol != SUBPROTOCOL:
        await ws.close()
        raise ConnectError(f"server did not select subprotocol {SUBPROTOCOL}")
    # The request is kept only for inspection; its headers cost ~2 KiB per station. (The
    # response must stay: websockets reads it to tell whether the handshake is done.)
    ws.request = None
    return ws
