"""The websocket server: handshake checks, one session per station, health, shutdown."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import hmac
import json
import logging
import ssl
import time
import weakref
from collections.abc import Coroutine
from dataclasses import asdict, dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import redis.asyncio as aioredis
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode
from websockets.http11 import Request, Response

from ocpp_gateway.connections import SUBPROTOCOL, ConnectionRegistry, close_quietly
from ocpp_gateway.envelopes import (
    PUBLISH_REGISTRY_TASK,
    RELAYED_ACTIONS,
    Command,
    EventKind,
    Reply,
    password_matches,
)
from ocpp_gateway.events import EventReporter, celery_sender, ingest_nudger
from ocpp_gateway.metrics import METRICS_PATH, GatewayMetrics, RefusedBecause
from ocpp_gateway.proxy import ProxySession
from ocpp_gateway.registry import Registry
from ocpp_gateway.relay import CommandRelay
from ocpp_gateway.session import StationSession
from ocpp_gateway.upstream import Upstream, UpstreamConfig, UpstreamUnavailable

logger = logging.getLogger(__name__)

HEALTH_PATH = "/health"
MAX_IDENTITY_LENGTH = 64
# How long the station holding an identity has to answer a ping before a newcomer without
# credentials may take the identity over (the old connection is then dead). Cellular links
# can take seconds to answer, so not less; the newcomer's handshake waits this long, so not
# much more (a station's own open timeout is often 10 s).
LIVENESS_TIMEOUT = 5.0
SUBSCRIBE_WAIT_SECONDS = 1.0
# At shutdown, how long the closes still under way (upstream links, replaced sessions) may
# take after the server closed: the close frames go out at once, this only bounds the wait
# for the peers' answers.
SHUTDOWN_CLOSE_TIMEOUT = 5.0
# websockets' default handshake timeout, which covers process_request (and so, in proxy
# mode, the liveness check and the upstream's connect timeout as well).
HANDSHAKE_TIMEOUT = 10.0


@dataclass(frozen=True)
class GatewayConfig:
    csms: str
    host: str
    port: int
    redis_url: str
    heartbeat_interval: int = 300
    max_frame_bytes: int = 256 * 1024
    # Websocket pings find a dead TCP connection (a station that lost power); heartbeats
    # alone would not tell the gateway. Each ping costs CPU across 10,000 stations.
    ping_interval: float = 60.0
    # Station identity -> password (HTTP Basic, OCPP 1.6 security profile 1/2). None: open.
    passwords: dict[str, str] | None = None
    certfile: str | None = None
    keyfile: str | None = None
    # Send the ingestion nudge through Celery; off only in tests of the gateway alone.
    nudge_consumer: bool = True
    # Admit any identity (a lab CSMS); otherwise only those in the published registry.
    open_admission: bool = False
    registry_refresh: float = 2.0
    # After a Rejected boot, refuse the identity's handshakes this long (seconds), so the
    # station's own profile fallback takes it back to its previous CSMS.
    rejected_hold: float = 60.0
    allowed_actions: frozenset[str] = field(default=frozenset(RELAYED_ACTIONS))
    # Proxy mode: relay each station to its own link with this upstream CSMS.
    upstream: UpstreamConfig | None = None

    @property
    def handshake_timeout(self) -> float:
        if self.upstream is None:
            return HANDSHAKE_TIMEOUT
        return max(HANDSHAKE_TIMEOUT, LIVENESS_TIMEOUT + self.upstream.connect_timeout + 2)


def load_passwords(path: Path) -> dict[str, str]:
    """Read `identity:password` lines; blank lines and # comments are skipped."""
    passwords: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        identity, sep, password = line.partition(":")
        if not sep or not identity or not password:
            raise ValueError(f"{path}:{number}: expected identity:password")
        passwords[identity] = password
    return passwords


def station_identity(path: str) -> str | None:
    """The last path segment: ws://host/<any prefix>/<identity>."""
    segment = path.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    identity = unquote(segment)
    if not identity or len(identity) > MAX_IDENTITY_LENGTH or not identity.isprintable():
        return None
    if any(ch.isspace() for ch in identity):
        return None
    return identity


def _offered_subprotocols(headers: Headers) -> list[str]:
    return [
        item.strip()
        for value in headers.get_all("Sec-WebSocket-Protocol")
        for item in value.split(",")
    ]


def _basic_credentials(headers: Headers) -> tuple[str, str] | None:
    value = headers.get("Authorization", "")
    scheme, _, encoded = value.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    return (user, password) if sep else None


class Gateway:
    def __init__(self, config: GatewayConfig, redis: aioredis.Redis) -> None:
        self.config = config
        self.redis = redis
        self.sessions: ConnectionRegistry[StationSession | ProxySession] = ConnectionRegistry()
        self.upstream = (
            Upstream(
                config.upstream,
                max_size=config.max_frame_bytes,
                ping_interval=config.ping_interval,
            )
            if config.upstream
            else None
        )
        # Handshake -> its open upstream link, until handle() takes it; a handshake that
        # fails after process_request never reaches handle(), so a watcher of the station's
        # connection closes its link as soon as that connection is gone.
        self._links: dict[ServerConnection, tuple[ClientConnection, asyncio.Task[None]]] = {}
        send = celery_sender(config.redis_url) if config.nudge_consumer else None
        self.metrics = GatewayMetrics(
            config.csms,
            stations=lambda: len(self.sessions),
            backlog=lambda: self.reporter.backlog,
            events_written=lambda: self.reporter.written,
            events_dropped=lambda: self.reporter.dropped,
        )
        self.reporter = EventReporter(
            redis,
            config.csms,
            ingest_nudger(send) if send else None,
            on_report=self.metrics.observe_event,
        )
        self.registry = Registry(
            redis,
            config.csms,
            refresh=config.registry_refresh,
            open_admission=config.open_admission,
            request_publish=functools.partial(send, PUBLISH_REGISTRY_TASK, config.csms)
            if send
            else None,
        )
        self.relay = CommandRelay(
            redis,
            config.csms,
            self._execute,
            config.allowed_actions,
            on_reply=self.metrics.command_done,
        )
        self._background: set[asyncio.Task[None]] = set()
        # Identity -> monotonic time until which its handshakes are refused (boot Rejected).
        self._held: dict[str, float] = {}
        # Handshake -> whether it passed a password check (None: none was required).
        self._authenticated: weakref.WeakKeyDictionary[ServerConnection, bool | None] = (
            weakref.WeakKeyDictionary()
        )

    async def _execute(self, command: Command) -> Reply | None:
        session = self.sessions.get(command.station)
        if session is None:
            return None
        return await session.run_command(command)

    # --- handshake: in memory only, never Redis ---------------------------------------------

    async def process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        if "Upgrade" not in request.headers:
            if request.path == HEALTH_PATH:
                return self._health(connection)
            if request.path == METRICS_PATH:
                return self._metrics(connection)
        identity = station_identity(request.path)
        if identity is None:
            self.metrics.refused(RefusedBecause.BAD_HANDSHAKE)
            return connection.respond(HTTPStatus.NOT_FOUND, "No station identity in the path.\n")
        if SUBPROTOCOL not in _offered_subprotocols(request.headers):
            self.metrics.refused(RefusedBecause.BAD_HANDSHAKE)
            return connection.respond(
                HTTPStatus.BAD_REQUEST, f"The {SUBPROTOCOL} subprotocol is required.\n"
            )
        csms = self.config.csms
        if await self.registry.admits_now(identity) is False:
            logger.warning("refused %s: not registered on CSMS %s", identity, csms)
            self.metrics.refused(RefusedBecause.UNREGISTERED)
            return connection.respond(
                HTTPStatus.FORBIDDEN, f"Station {identity} is not registered on CSMS {csms}.\n"
            )
        authenticated = self._check_credentials(identity, request)
        if authenticated is False:
            logger.warning("refused %s: bad or missing credentials", identity)
            self.metrics.refused(RefusedBecause.UNAUTHENTICATED)
            response = connection.respond(HTTPStatus.UNAUTHORIZED, "Unauthorized.\n")
            response.headers["WWW-Authenticate"] = 'Basic realm="OCPP", charset="UTF-8"'
            return response
        # The hold pushes a rejected station back to its previous CSMS; one that proves its
        # password is not held off by a rejection an impostor without it provoked.
        if self._is_held(identity) and not authenticated:
            logger.warning("refused %s: its boot was rejected, held off", identity)
            self.metrics.refused(RefusedBecause.HELD)
            return connection.respond(
                HTTPStatus.FORBIDDEN, f"Station {identity} was rejected by CSMS {csms}.\n"
            )
        live = self.sessions.get(identity)
        if live is not None and not authenticated and await live.answers_ping(LIVENESS_TIMEOUT):
            address = _address(connection)
            logger.warning("refused %s from %s: the station is connected", identity, address)
            self.metrics.refused(RefusedBecause.DUPLICATE)
            self.reporter.report(
                EventKind.SECURITY,
                identity,
                {
                    "reason": "second connection refused while the station is connected",
                    "address": address,
                },
            )
            return connection.respond(
                HTTPStatus.CONFLICT, f"Station {identity} is already connected.\n"
            )
        if self.upstream is not None:
            # Before the station's upgrade: an upstream it cannot reach through us must
            # refuse it, so that its own profile fallback works.
            try:
                link = await self.upstream.open(identity, request.headers)
            except UpstreamUnavailable as exc:
                # The detail (an OS error, an address of the upstream) is for our log only.
                logger.warning("refused %s: %s", identity, exc)
                self.metrics.refused(RefusedBecause.UPSTREAM)
                return connection.respond(exc.status, _UPSTREAM_REFUSALS[exc.status])
            if connection.transport.is_closing():
                # The station left while its link was being opened: nobody would claim the
                # link, and a station dropping in a loop would pile them up.
                logger.info("%s left during its handshake; closing its upstream link", identity)
                self._spawn(close_quietly(link, 1001, "station left during the handshake"))
                # Never sent (the connection is gone); it keeps handle() from running.
                return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "Station gone.\n")
            self._links[connection] = (link, self._spawn(self._watch_link(connection)))
        self._authenticated[connection] = authenticated
        return None

    def _count_malformed(self) -> None:
        self.metrics.refused(RefusedBecause.MALFORMED)

    def _take_link(self, connection: ServerConnection) -> ClientConnection | None:
        entry = self._links.pop(connection, None)
        if entry is None:
            return None
        link, watcher = entry
        watcher.cancel()
        return link

    async def _watch_link(self, connection: ServerConnection) -> None:
        """Close a handshake's upstream link once the station's connection is gone and
        handle() never took the link (the handshake failed after process_request)."""
        # Bounded: past the handshake timeout no handshake is still under way.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.config.handshake_timeout + 1):
                await connection.wait_closed()
        entry = self._links.pop(connection, None)  # not _take_link: it would cancel us
        if entry is not None:
            logger.info("closing an upstream link whose station's handshake did not finish")
            await close_quietly(entry[0], 1001, "station handshake failed")

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def close_leftovers(self) -> None:
        """After the server closed: close the links of handshakes that never reached
        handle() (1001, going away) and wait, bounded, for every close under way."""
        for connection in list(self._links):
            link = self._take_link(connection)
            if link is not None:
                self._spawn(close_quietly(link, 1001, "gateway shutting down"))
        if not self._background:
            return
        _, pending = await asyncio.wait(set(self._background), timeout=SHUTDOWN_CLOSE_TIMEOUT)
        if pending:
            logger.warning("%d closes not finished at shutdown; abandoned", len(pending))
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    def _is_held(self, identity: str) -> bool:
        until = self._held.get(identity)
        if until is None:
            return False
        if time.monotonic() < until:
            return True
        del self._held[identity]
        return False

    def _hold(self, identity: str) -> None:
        self._held[identity] = time.monotonic() + self.config.rejected_hold

    def _check_credentials(self, identity: str, request: Request) -> bool | None:
        """True: the right password; False: refuse; None: this station needs none."""
        expected = (self.config.passwords or {}).get(identity)
        entry = self.registry.entry(identity)
        digest = entry.password_sha256 if entry else ""
        if expected is None and not digest:
            # With --auth-file every station must authenticate, as it always did.
            return None if self.config.passwords is None else False
        credentials = _basic_credentials(request.headers)
        if credentials is None:
            return False
        user, password = credentials
        # Compare both, always, in constant time: no timing hint about which one was wrong.
        user_ok = hmac.compare_digest(user.encode(), identity.encode())
        if expected is not None:  # the file's password wins over the registry's
            password_ok = hmac.compare_digest(password.encode(), expected.encode())
        else:
            password_ok = password_matches(digest, password)
        return user_ok and password_ok

    def _metrics(self, connection: ServerConnection) -> Response:
        body, content_type = self.metrics.exposition()
        return _respond(connection, body.decode(), content_type)

    def _health(self, connection: ServerConnection) -> Response:
        body = json.dumps(
            {
                "status": "ok",
                "csms": self.config.csms,
                "stations": len(self.sessions),
                "admission": self.registry.admission.value,
                "registered": self.registry.registered,
                "redis": "ok" if self.relay.connected and self.registry.redis_ok else "down",
                "event_backlog": self.reporter.backlog,
                "mode": "proxy" if self.upstream else "endpoint",
                "upstream": self.upstream.public_url if self.upstream else None,
                # The last station link's attempt: a proxy whose upstream is down answers
                # every station 502 while the rest of this says "ok".
                "upstream_last_link": (
                    asdict(self.upstream.last_link)
                    if self.upstream and self.upstream.last_link
                    else None
                ),
            }
        )
        return _respond(connection, body + "\n", "application/json")

    # --- one connection: no Redis round trip on this path ------------------------------------

    async def handle(self, connection: ServerConnection) -> None:
        assert connection.request is not None  # handle() runs after the handshake
        identity = station_identity(connection.request.path)
        assert identity is not None  # process_request refused anything else
        address = _address(connection)
        authenticated = self._authenticated.pop(connection, None)
        session: StationSession | ProxySession
        if self.upstream is not None:
            link = self._take_link(connection)
            if link is None:  # the watcher closed it: the station's connection ended first
                await connection.close(1011, "upstream link lost during the handshake")
                return
            assert self.config.upstream is not None
            session = ProxySession(
                identity,
                connection,
                link,
                csms=self.config.csms,
                reporter=self.reporter,
                registry=self.registry,
                on_rejected=self._hold,
                heartbeat_interval=self.config.heartbeat_interval,
                call_timeout=self.config.upstream.call_timeout,
                address=address,
                authenticated=bool(authenticated),
                on_malformed=self._count_malformed,
            )
        else:
            session = StationSession(
                identity,
                connection,
                csms=self.config.csms,
                reporter=self.reporter,
                heartbeat_interval=self.config.heartbeat_interval,
                registry=self.registry,
                on_rejected=self._hold,
                address=address,
                authenticated=bool(authenticated),
                on_malformed=self._count_malformed,
            )
        stale = self.sessions.register(identity, session)
        if stale is not None:
            logger.info("%s reconnected; closing its stale connection", identity)
            self._spawn(stale.close("replaced by a new connection"))
        self.reporter.report(
            EventKind.CONNECT, identity, {"address": address, "authenticated": bool(authenticated)}
        )
        subscribing = self.relay.attach(identity)
        if subscribing is not None:
            # The SUBSCRIBE before this station's first answer: a command sent on seeing its
            # boot finds it. Bounded, so a Redis that stalls only delays, never refuses.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(subscribing), SUBSCRIBE_WAIT_SECONDS)
        try:
            await session.start()
        except ConnectionClosed:
            pass
        finally:
            current = self.sessions.unregister(identity, session)
            close_sent = connection.protocol.close_sent
            if close_sent is not None and close_sent.code == CloseCode.MESSAGE_TOO_BIG:
                self.metrics.refused(RefusedBecause.OVERSIZE)
            # A replaced connection's end says nothing about the station: it is connected.
            data = {"code": connection.close_code, "replaced": not current}
            self.reporter.report(EventKind.DISCONNECT, identity, data)  # queued, never lost
            if current:
                self.relay.detach(identity)


# What a station is told when its upstream link could not be opened (see upstream.py).
_UPSTREAM_REFUSALS = {
    HTTPStatus.BAD_GATEWAY: "Upstream CSMS unavailable.\n",
    HTTPStatus.UNAUTHORIZED: "Unauthorized by the upstream CSMS.\n",
    HTTPStatus.FORBIDDEN: "Forbidden by the upstream CSMS.\n",
    HTTPStatus.NOT_FOUND: "Not found on the upstream CSMS.\n",
}


def _respond(connection: ServerConnection, body: str, content_type: str) -> Response:
    """200 with ``body`` as ``content_type`` (respond() itself says text/plain)."""
    response = connection.respond(HTTPStatus.OK, body)
    del response.headers["Content-Type"]
    response.headers["Content-Type"] = content_type
    return response


def _address(connection: ServerConnection) -> str:
    return connection.remote_address[0] if connection.remote_address else ""


def _ssl_context(config: GatewayConfig) -> ssl.SSLContext | None:
    if not config.certfile:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(config.certfile, config.keyfile)
    return context


async def run_gateway(config: GatewayConfig, stop: asyncio.Event) -> None:
    """Serve until stop is set, then close every connection (1001) and flush events."""
    # A blocking pool waits for a free connection instead of failing under a burst; short
    # waits, so a Redis that went away only delays the background loops that use it. No
    # socket_timeout: on Python 3.11 it defers every write by a loop turn (wait_for makes a
    # task), so a station's SUBSCRIBE would go out after its boot answer; each loop bounds
    # its own calls instead (REDIS_CALL_TIMEOUT).
    pool = aioredis.BlockingConnectionPool.from_url(
        config.redis_url, max_connections=64, timeout=2, socket_connect_timeout=2
    )
    redis = aioredis.Redis(connection_pool=pool)
    gateway = Gateway(config, redis)
    background = [
        asyncio.create_task(gateway.reporter.run()),
        asyncio.create_task(gateway.relay.run()),
        asyncio.create_task(gateway.registry.run()),
    ]
    # Listen once the registry is loaded and the command channel is up, when Redis answers
    # within a few seconds: no needless Pending boot, no station that cannot get commands.
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(3):
            await gateway.registry.loaded.wait()
            await gateway.relay.ready.wait()
    async with serve(
        gateway.handle,
        config.host,
        config.port,
        subprotocols=[SUBPROTOCOL],
        process_request=gateway.process_request,
        max_size=config.max_frame_bytes,
        # OCPP frames are small; per-message deflate would triple memory per connection.
        compression=None,
        ping_interval=config.ping_interval,
        ping_timeout=config.ping_interval,
        ssl=_ssl_context(config),
        open_timeout=config.handshake_timeout,
    ) as server:
        scheme = "wss" if config.certfile else "ws"
        logger.info(
            "gateway %s listening on %s://%s:%d/", config.csms, scheme, config.host, config.port
        )
        if gateway.upstream is not None:
            logger.info(
                "proxy mode: each station relayed to %s/<identity>", gateway.upstream.public_url
            )
        await stop.wait()
        logger.info("shutting down: closing %d station connections", len(gateway.sessions))
        server.close(close_connections=True)  # close code 1001, going away
        await server.wait_closed()
        await gateway.close_leftovers()
    try:
        async with asyncio.timeout(10):
            await gateway.reporter.flush()
    except TimeoutError:
        logger.error("%d events not written before shutdown (Redis away)", gateway.reporter.backlog)
    except Exception:
        logger.exception("%d events not written before shutdown", gateway.reporter.backlog)
    for task in background:
        task.cancel()
    await asyncio.gather(*background, return_exceptions=True)
    await gateway.relay.close()
    await redis.aclose()
    await pool.aclose()
