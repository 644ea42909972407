"""Proxy mode: the gateway's own OCPP-J connection to the upstream CSMS, one per station."""

from __future__ import annotations

import base64
import logging
import ssl
import time
from dataclasses import dataclass
from http import HTTPStatus
from urllib.parse import quote

from websockets.asyncio.client import ClientConnection, connect
from websockets.datastructures import Headers
from websockets.exceptions import InvalidHandshake, InvalidStatus, InvalidURI

from ocpp_gateway.connections import SUBPROTOCOL

logger = logging.getLogger(__name__)

# Refusals of the upstream that say something about the station itself (its credentials,
# its registration): the station gets the same status, as if it had connected directly.
# Anything else (the upstream down, broken, slow) is the gateway's failure to reach it: 502.
# (server._UPSTREAM_REFUSALS has the body a station gets for each.)
PASSED_ON_STATUSES = frozenset(
    {HTTPStatus.UNAUTHORIZED, HTTPStatus.FORBIDDEN, HTTPStatus.NOT_FOUND}
)


@dataclass(frozen=True)
class UpstreamConfig:
    url: str  # ws[s]://host/path; a station's link is url/<identity>
    # Station identity -> password for the upstream (HTTP Basic); None or a missing
    # identity: the station's own Authorization header is passed on unchanged.
    credentials: dict[str, str] | None = None
    ca_file: str | None = None  # trusted for a wss:// upstream instead of the system's CAs
    connect_timeout: float = 5.0
    # The deadline of one upstream CALL to the station, waiting for the call slot included.
    call_timeout: float = 30.0


class UpstreamUnavailable(Exception):
    """The upstream could not be reached (or refused): the station's handshake is refused."""

    def __init__(
        self, why: str, status: HTTPStatus = HTTPStatus.BAD_GATEWAY, *, shown: str = ""
    ) -> None:
        super().__init__(why)
        self.status = status
        # What /health may say (anyone who reaches the port can read it): no OS error text
        # with the upstream's internal address.
        self.shown = shown or why


def url_without_credentials(url: str) -> str:
    """``url`` with any user:password@ taken out (fit for /health, logs and reports).

    Cut by hand rather than rebuilt from urlsplit(): that raises on some malformed URLs
    (an unclosed IPv6 bracket) and its .port on a port out of range, and a URL shown in an
    error message about exactly that must still not show the password. The userinfo ends
    at the last '@' of the authority, as in urlsplit (a password may contain '@').
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    end = min((i for i in map(rest.find, "/?#") if i >= 0), default=len(rest))
    authority, tail = rest[:end], rest[end:]
    if "@" not in authority:
        return url
    return f"{scheme}://{authority.rpartition('@')[2]}{tail}"


def station_url(base: str, identity: str) -> str:
    return f"{base.rstrip('/')}/{quote(identity, safe='')}"


def client_ssl_context(config: UpstreamConfig) -> ssl.SSLContext | None:
    if not config.url.startswith("wss://"):
        return None
    context = ssl.create_default_context(cafile=config.ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@dataclass(frozen=True)
class LinkAttempt:
    """How the last attempt to open a station's link to the upstream went."""

    at: float  # epoch seconds
    ok: bool
    error: str = ""


class Upstream:
    """Opens station links to one upstream CSMS."""

    def __init__(self, config: UpstreamConfig, *, max_size: int, ping_interval: float) -> None:
        self.config = config
        # parse_args refuses credentials in the URL: left in, websockets would add a second
        # Authorization header from them beside the station's.
        self._base_url = url_without_credentials(config.url)
        # /health tells from it whether stations can get through now: a gateway answering
        # "ok" while every handshake gets 502 would fool a monitor.
        self.last_link: LinkAttempt | None = None
        self._ssl = client_ssl_context(config)
        self._max_size = max_size
        self._ping_interval = ping_interval

    @property
    def public_url(self) -> str:
        return self._base_url

    def _authorization(self, identity: str, station_headers: Headers) -> str | None:
        """The one Authorization the upstream gets: the station's entry in the upstream
        credentials file, else the station's own header (none without either)."""
        password = (self.config.credentials or {}).get(identity)
        if password is not None:
            return _basic(identity, password)
        return station_headers.get("Authorization")

    async def open(self, identity: str, station_headers: Headers) -> ClientConnection:
        """The station's link to the upstream, open, or UpstreamUnavailable within the
        connect timeout (the station's own handshake waits for this)."""
        try:
            connection = await self._open(identity, station_headers)
        except UpstreamUnavailable as exc:
            self.last_link = LinkAttempt(at=time.time(), ok=False, error=exc.shown)
            raise
        self.last_link = LinkAttempt(at=time.time(), ok=True)
        return connection

    async def _open(self, identity: str, station_headers: Headers) -> ClientConnection:
        url = station_url(self._base_url, identity)
        headers = {}
        authorization = self._authorization(identity, station_headers)
        if authorization:
            headers["Authorization"] = authorization
        try:
            connection = await connect(
                url,
                subprotocols=[SUBPROTOCOL],
                additional_headers=headers,
                open_timeout=self.config.connect_timeout,
                ssl=self._ssl,
                max_size=self._max_size,
                # OCPP frames are small; per-message deflate would triple memory per link.
                compression=None,
                ping_interval=self._ping_interval,
                ping_timeout=self._ping_interval,
                # websockets would otherwise follow HTTP(S)_PROXY / ALL_PROXY from the
                # environment: a proxy set for something else would silently sit in every
                # station's path (and see its credentials on a ws:// upstream).
                proxy=None,
            )
        except InvalidStatus as exc:
            code = exc.response.status_code
            passed_on = HTTPStatus(code) if code in PASSED_ON_STATUSES else HTTPStatus.BAD_GATEWAY
            raise UpstreamUnavailable(f"upstream refused: HTTP {code}", passed_on) from exc
        except TimeoutError as exc:
            raise UpstreamUnavailable(
                f"upstream not reached within {self.config.connect_timeout:g}s"
            ) from exc
        except (OSError, InvalidHandshake, InvalidURI) as exc:
            raise UpstreamUnavailable(
                f"upstream unreachable: {exc}", shown="upstream unreachable"
            ) from exc
        if connection.subprotocol != SUBPROTOCOL:
            await connection.close(1002, f"{SUBPROTOCOL} required")
            raise UpstreamUnavailable(f"upstream did not accept the {SUBPROTOCOL} subprotocol")
        return connection
