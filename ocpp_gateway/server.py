"""The websocket server: handshake checks, one session per station, health, shutdown."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import ssl
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from urllib.parse import unquote

import redis.asyncio as aioredis
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from ocpp_gateway.connections import ConnectionRegistry
from ocpp_gateway.envelopes import Command, EventKind, Reply
from ocpp_gateway.events import EventReporter, celery_nudger
from ocpp_gateway.relay import CommandRelay
from ocpp_gateway.session import StationSession

logger = logging.getLogger(__name__)

SUBPROTOCOL = "ocpp1.6"
HEALTH_PATH = "/health"
MAX_IDENTITY_LENGTH = 64


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
        self.registry: ConnectionRegistry[StationSession] = ConnectionRegistry()
        nudge = celery_nudger(config.redis_url) if config.nudge_consumer else None
        self.reporter = EventReporter(redis, config.csms, nudge)
        self.relay = CommandRelay(redis, config.csms, self._execute)
        self._background: set[asyncio.Task] = set()

    async def _execute(self, command: Command) -> Reply | None:
        session = self.registry.get(command.station)
        if session is None:
            return None
        return await session.run_command(command)

    # --- handshake -----------------------------------------------------------------------

    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        if request.path == HEALTH_PATH and "Upgrade" not in request.headers:
            return self._health(connection)
        identity = station_identity(request.path)
        if identity is None:
            return connection.respond(HTTPStatus.NOT_FOUND, "No station identity in the path.\n")
        if SUBPROTOCOL not in _offered_subprotocols(request.headers):
            return connection.respond(
                HTTPStatus.BAD_REQUEST, f"The {SUBPROTOCOL} subprotocol is required.\n"
            )
        if self.config.passwords is not None and not self._authorised(identity, request):
            logger.warning("refused %s: bad or missing credentials", identity)
            response = connection.respond(HTTPStatus.UNAUTHORIZED, "Unauthorized.\n")
            response.headers["WWW-Authenticate"] = 'Basic realm="OCPP", charset="UTF-8"'
            return response
        return None

    def _authorised(self, identity: str, request: Request) -> bool:
        credentials = _basic_credentials(request.headers)
        expected = (self.config.passwords or {}).get(identity)
        if credentials is None or expected is None:
            return False
        user, password = credentials
        # Compare both, always, in constant time: no timing hint about which one was wrong.
        user_ok = hmac.compare_digest(user.encode(), identity.encode())
        password_ok = hmac.compare_digest(password.encode(), expected.encode())
        return user_ok and password_ok

    def _health(self, connection: ServerConnection) -> Response:
        body = json.dumps(
            {"status": "ok", "csms": self.config.csms, "stations": len(self.registry)}
        )
        response = connection.respond(HTTPStatus.OK, body + "\n")
        del response.headers["Content-Type"]  # respond() set text/plain
        response.headers["Content-Type"] = "application/json"
        return response

    # --- one connection ------------------------------------------------------------------

    async def handle(self, connection: ServerConnection) -> None:
        identity = station_identity(connection.request.path)
        assert identity is not None  # process_request refused anything else
        session = StationSession(
            identity,
            connection,
            csms=self.config.csms,
            reporter=self.reporter,
            heartbeat_interval=self.config.heartbeat_interval,
        )
        stale = self.registry.register(identity, session)
        if stale is not None:
            logger.info("%s reconnected; closing its stale connection", identity)
            closing = asyncio.create_task(stale.close("replaced by a new connection"))
            self._background.add(closing)
            closing.add_done_callback(self._background.discard)
        address = connection.remote_address[0] if connection.remote_address else ""
        self.reporter.report(EventKind.CONNECT, identity, {"address": address})
        try:
            await self.relay.attach(identity)
            await session.start()
        except ConnectionClosed:
            pass
        finally:
            current = self.registry.unregister(identity, session)
            # A replaced connection's end says nothing about the station: it is connected.
            data = {"code": connection.close_code, "replaced": not current}
            self.reporter.report(EventKind.DISCONNECT, identity, data)  # queued, never lost
            if current:
                await self.relay.detach(identity)


def _ssl_context(config: GatewayConfig) -> ssl.SSLContext | None:
    if not config.certfile:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(config.certfile, config.keyfile)
    return context


async def run_gateway(config: GatewayConfig, stop: asyncio.Event) -> None:
    """Serve until stop is set, then close every connection (1001) and flush events."""
    # A blocking pool waits for a free connection instead of failing under a burst.
    pool = aioredis.BlockingConnectionPool.from_url(
        config.redis_url, max_connections=64, timeout=10
    )
    redis = aioredis.Redis(connection_pool=pool)
    gateway = Gateway(config, redis)
    await gateway.relay.start()
    background = [
        asyncio.create_task(gateway.reporter.run()),
        asyncio.create_task(gateway.relay.run()),
    ]
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
    ) as server:
        scheme = "wss" if config.certfile else "ws"
        logger.info(
            "gateway %s listening on %s://%s:%d/", config.csms, scheme, config.host, config.port
        )
        await stop.wait()
        logger.info("shutting down: closing %d station connections", len(gateway.registry))
        server.close(close_connections=True)  # close code 1001, going away
        await server.wait_closed()
    try:
        async with asyncio.timeout(10):
            await gateway.reporter.flush()
    except Exception:
        logger.exception("%d events not written before shutdown", gateway.reporter.backlog)
    for task in background:
        task.cancel()
    await asyncio.gather(*background, return_exceptions=True)
    await gateway.relay.close()
    await redis.aclose()
    await pool.aclose()
