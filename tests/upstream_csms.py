"""An upstream CSMS that is not our code, for proxy-mode tests.

A central system written with the ``ocpp`` library (``ocpp.v16.ChargePoint`` on the server
side) serving real sockets on 127.0.0.1, in a background thread of the test process so a
test can read what it received and make it send its own CALLs::

    with UpstreamCsms.start(boot_status="Accepted", reject={"CP-9"}) as upstream:
        start_gateway("csms-1", "--open", "--upstream", upstream.url)
        ...
        upstream.wait_connected("CP-1", 10)
        upstream.boots("CP-1")          # the BootNotification payloads it got (camelCase)
        upstream.received("CP-1")       # every raw frame it got from the station's link
        upstream.call("CP-1", call.GetConfiguration(key=["X"]), timeout=5)

Every wait is bounded; the server stops at the end of the ``with`` block.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import contextlib
import itertools
import json
import logging
import ssl
import threading
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote

from ocpp.exceptions import InternalError
from ocpp.routing import on
from ocpp.v16 import ChargePoint, call_result
from ocpp.v16.datatypes import IdTagInfo
from ocpp.v16.enums import Action, AuthorizationStatus, DataTransferStatus, RegistrationStatus
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from devstack.processes import wait_until

logger = logging.getLogger(__name__)

SUBPROTOCOL = Subprotocol("ocpp1.6")
_transaction_ids = itertools.count(1000)


def _now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


@dataclass
class Link:
    """One websocket connection a station (through the proxy) opened to the upstream."""

    identity: str
    path: str
    headers: dict[str, str]  # a header sent twice shows once here: see authorizations
    subprotocol: str | None
    connection: ServerConnection
    side: _CentralSystem | None = None
    close_code: int | None = None
    close_reason: str | None = None
    closed: threading.Event = field(default_factory=threading.Event)
    authorizations: list[str] = field(default_factory=list)  # every Authorization header


class _CentralSystem(ChargePoint):
    """The upstream's side of one link: answers like a plain OCPP 1.6 central system."""

    def __init__(self, identity: str, connection: ServerConnection, owner: UpstreamCsms):
        super().__init__(identity, connection)
        self._owner = owner

    async def route_message(self, raw_msg: str) -> None:
        self._owner._record(self._owner._received, self.id, raw_msg)
        await super().route_message(raw_msg)

    async def _send(self, message: str) -> None:
        self._owner._record(self._owner._sent, self.id, message)
        await super()._send(message)

    @on(Action.boot_notification)
    async def on_boot_notification(self, **kwargs: Any) -> call_result.BootNotification:
        self._owner._record(self._owner._boots, self.id, kwargs)
        delay = self._owner.boot_delay_of(self.id)
        if delay:
            await asyncio.sleep(delay)  # a slow CSMS (this link reads nothing meanwhile)
        error = self._owner.boot_error_of(self.id)
        if error:
            raise InternalError(description=error)  # answered with a CALLERROR
        status = self._owner.boot_status_of(self.id)
        return call_result.BootNotification(
            current_time=_now_iso(), interval=self._owner.heartbeat_interval, status=status
        )

    @on(Action.heartbeat)
    def on_heartbeat(self) -> call_result.Heartbeat:
        return call_result.Heartbeat(current_time=_now_iso())

    @on(Action.status_notification)
    def on_status_notification(self, **_: Any) -> call_result.StatusNotification:
        return call_result.StatusNotification()

    @on(Action.authorize)
    def on_authorize(self, id_tag: str) -> call_result.Authorize:
        return call_result.Authorize(id_tag_info=IdTagInfo(status=AuthorizationStatus.accepted))

    @on(Action.start_transaction)
    def on_start_transaction(self, **_: Any) -> call_result.StartTransaction:
        return call_result.StartTransaction(
            transaction_id=next(_transaction_ids),
            id_tag_info=IdTagInfo(status=AuthorizationStatus.accepted),
        )

    @on(Action.stop_transaction)
    def on_stop_transaction(self, **_: Any) -> call_result.StopTransaction:
        return call_result.StopTransaction(
            id_tag_info=IdTagInfo(status=AuthorizationStatus.accepted)
        )

    @on(Action.meter_values)
    def on_meter_values(self, **_: Any) -> call_result.MeterValues:
        return call_result.MeterValues()

    @on(Action.data_transfer)
    def on_data_transfer(self, **_: Any) -> call_result.DataTransfer:
        return call_result.DataTransfer(status=DataTransferStatus.unknown_vendor_id)

    @on(Action.diagnostics_status_notification)
    def on_diagnostics_status(self, **_: Any) -> call_result.DiagnosticsStatusNotification:
        return call_result.DiagnosticsStatusNotification()

    @on(Action.firmware_status_notification)
    def on_firmware_status(self, **_: Any) -> call_result.FirmwareStatusNotification:
        return call_result.FirmwareStatusNotification()

    @on(Action.security_event_notification)
    def on_security_event(self, **_: Any) -> call_result.SecurityEventNotification:
        return call_result.SecurityEventNotification()


class UpstreamCsms:
    """A real OCPP 1.6J central system on a free 127.0.0.1 port, run in a thread."""

    def __init__(
        self,
        *,
        boot_status: str = "Accepted",
        reject: Collection[str] = (),
        passwords: Mapping[str, str] | None = None,
        ssl_context: ssl.SSLContext | None = None,
        heartbeat_interval: int = 300,
        path: str = "/ocpp",
    ) -> None:
        self.default_boot_status = RegistrationStatus(boot_status)
        self._boot_status: dict[str, RegistrationStatus] = {
            identity: RegistrationStatus.rejected for identity in reject
        }
        self._boot_errors: dict[str, str] = {}
        self._handshake_delays: dict[str, float] = {}
        self._boot_delays: dict[str, float] = {}
        # identity -> password: when given, a link must carry HTTP Basic for it (else 401).
        self._passwords = dict(passwords) if passwords is not None else None
        self._ssl = ssl_context
        self.heartbeat_interval = heartbeat_interval
        self._path = path.rstrip("/")
        self._lock = threading.Lock()
        self._received: dict[str, list[Any]] = {}
        self._sent: dict[str, list[Any]] = {}
        self._boots: dict[str, list[Any]] = {}
        self._links: dict[str, list[Link]] = {}
        self._refused: dict[str, list[int]] = {}
        self._handshakes: dict[str, list[str]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self.port = 0

    # --- lifecycle ------------------------------------------------------------------------

    @classmethod
    def start(cls, **kwargs: Any) -> UpstreamCsms:
        """Create and start one; stop it with .stop() or use it as a context manager."""
        return cls(**kwargs)._start()

    def _start(self) -> UpstreamCsms:
        self._thread = threading.Thread(target=self._thread_main, name="upstream-csms", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the upstream CSMS did not start within 10 s")
        if self._failure is not None:
            raise RuntimeError("the upstream CSMS failed to start") from self._failure
        return self

    def stop(self, timeout: float = 10) -> None:
        if self._loop is None or self._stop is None or self._thread is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop already ended
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise RuntimeError(f"the upstream CSMS did not stop within {timeout} s")

    def __enter__(self) -> UpstreamCsms:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """The base URL a proxy appends /<identity> to."""
        scheme = "wss" if self._ssl else "ws"
        return f"{scheme}://127.0.0.1:{self.port}{self._path}"

    def _thread_main(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported to start(); a test must not hang on it
            self._failure = exc
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with serve(
            self._handle,
            "127.0.0.1",
            0,
            subprotocols=[SUBPROTOCOL],
            process_request=self._process_request,
            ssl=self._ssl,
            compression=None,
        ) as server:
            self.port = _port_of(server)
            self._ready.set()
            await self._stop.wait()
            server.close(close_connections=True)
            await server.wait_closed()

    # --- configuration while running -------------------------------------------------------

    def set_boot_status(self, identity: str, status: str) -> None:
        """What this CSMS answers to identity's next BootNotification."""
        with self._lock:
            self._boot_status[identity] = RegistrationStatus(status)

    def set_boot_error(self, identity: str, description: str | None) -> None:
        """Answer identity's next BootNotifications with a CALLERROR (None: stop doing so)."""
        with self._lock:
            if description:
                self._boot_errors[identity] = description
            else:
                self._boot_errors.pop(identity, None)

    def set_handshake_delay(self, identity: str, seconds: float) -> None:
        """Answer identity's websocket handshakes this much later (a slow upstream)."""
        with self._lock:
            self._handshake_delays[identity] = seconds

    def set_boot_delay(self, identity: str, seconds: float) -> None:
        """Answer identity's next BootNotifications this much later."""
        with self._lock:
            self._boot_delays[identity] = seconds

    def boot_delay_of(self, identity: str) -> float:
        with self._lock:
            return self._boot_delays.get(identity, 0.0)

    def boot_error_of(self, identity: str) -> str | None:
        with self._lock:
            return self._boot_errors.get(identity)

    def boot_status_of(self, identity: str) -> RegistrationStatus:
        with self._lock:
            return self._boot_status.get(identity, self.default_boot_status)

    # --- what happened ----------------------------------------------------------------------

    def boots(self, identity: str) -> list[dict[str, Any]]:
        """The BootNotification payloads received from identity (snake_case keys)."""
        with self._lock:
            return list(self._boots.get(identity, ()))

    def received(self, identity: str) -> list[str]:
        """Every raw frame received on identity's links, in order."""
        with self._lock:
            return list(self._received.get(identity, ()))

    def sent(self, identity: str) -> list[str]:
        """Every raw frame this CSMS sent on identity's links, in order."""
        with self._lock:
            return list(self._sent.get(identity, ()))

    def received_frames(self, identity: str) -> list[list[Any]]:
        """received(), parsed: [2, id, action, payload] / [3, id, payload] / [4, ...]."""
        return [json.loads(raw) for raw in self.received(identity)]

    def links(self, identity: str) -> list[Link]:
        """Every connection identity's proxy opened here, oldest first."""
        with self._lock:
            return list(self._links.get(identity, ()))

    def refused(self, identity: str) -> list[int]:
        """HTTP statuses of the handshakes for identity this CSMS refused (bad credentials)."""
        with self._lock:
            return list(self._refused.get(identity, ()))

    def handshakes(self, identity: str) -> list[str]:
        """The paths of identity's websocket handshakes this CSMS began, accepted or not."""
        with self._lock:
            return list(self._handshakes.get(identity, ()))

    def connected(self, identity: str) -> bool:
        links = self.links(identity)
        return bool(links) and not links[-1].closed.is_set()

    def wait_connected(self, identity: str, timeout: float) -> Link:
        return wait_until(
            lambda: self.connected(identity) and self.links(identity)[-1],
            timeout,
            f"{identity} connected to the upstream CSMS",
        )

    def wait_boots(self, identity: str, count: int, timeout: float) -> list[dict[str, Any]]:
        return wait_until(
            lambda: (boots := self.boots(identity)) and len(boots) >= count and boots,
            timeout,
            f"{count} BootNotification(s) of {identity} at the upstream CSMS",
        )

    # --- acting on a station ------------------------------------------------------------------

    def call(self, identity: str, request: Any, timeout: float = 10) -> Any:
        """Send this CSMS's own CALL (an ocpp.v16.call dataclass) to the station.

        Returns the call_result dataclass; raises the OCPPError of a CALLERROR, TimeoutError
        when no answer came in time, LookupError when the station has no live link.
        """
        return self.call_soon(identity, request, timeout).result(timeout + 5)

    def call_soon(
        self, identity: str, request: Any, timeout: float = 10
    ) -> concurrent.futures.Future:
        """call() without waiting: the Future of its answer (or exception)."""
        return self._submit(self._call(identity, request, response_timeout=timeout))

    def send_raw(self, identity: str, frame: str) -> None:
        """Send any text frame on identity's current link (a hand-made CALL, a bad frame)."""
        self._submit(self._send_raw(identity, frame)).result(10)

    def close(self, identity: str, code: int = 1000, reason: str = "") -> None:
        """Close identity's current link from this side (an upstream restart, say)."""
        self._submit(self._close(identity, code, reason)).result(10)

    def _submit(self, coroutine: Any) -> concurrent.futures.Future:
        assert self._loop is not None, "start() first"
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    def _current_side(self, identity: str) -> _CentralSystem:
        links = self.links(identity)
        if not links or links[-1].closed.is_set() or links[-1].side is None:
            raise LookupError(f"{identity} has no live link to the upstream CSMS")
        return links[-1].side

    async def _call(self, identity: str, request: Any, *, response_timeout: float) -> Any:
        side = self._current_side(identity)
        side._response_timeout = response_timeout
        return await side.call(request, suppress=False)

    async def _send_raw(self, identity: str, frame: str) -> None:
        await self._current_side(identity)._send(frame)

    async def _close(self, identity: str, code: int, reason: str) -> None:
        links = self.links(identity)
        if links:
            await links[-1].connection.close(code, reason)

    # --- the server ---------------------------------------------------------------------------

    def _record(self, store: dict[str, list[Any]], identity: str, item: Any) -> None:
        with self._lock:
            store.setdefault(identity, []).append(item)

    async def _process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        identity = _identity(request.path)
        self._record(self._handshakes, identity, request.path)
        with self._lock:
            delay = self._handshake_delays.get(identity, 0.0)
        if delay:
            await asyncio.sleep(delay)
        if self._passwords is None:
            return None
        expected = self._passwords.get(identity)
        if expected is None or _basic(request.headers.get("Authorization", "")) != (
            identity,
            expected,
        ):
            self._record(self._refused, identity, HTTPStatus.UNAUTHORIZED)
            return connection.respond(HTTPStatus.UNAUTHORIZED, "Unauthorized.\n")
        return None

    async def _handle(self, connection: ServerConnection) -> None:
        request = connection.request
        assert request is not None  # the handler runs after the handshake
        identity = _identity(request.path)
        link = Link(
            identity=identity,
            path=request.path,
            headers=dict(request.headers.raw_items()),
            subprotocol=connection.subprotocol,
            connection=connection,
            authorizations=request.headers.get_all("Authorization"),
        )
        link.side = _CentralSystem(identity, connection, self)
        self._record(self._links, identity, link)
        try:
            await link.side.start()
        except ConnectionClosed:
            pass
        finally:
            link.close_code = connection.close_code
            link.close_reason = connection.close_reason
            link.closed.set()


def _identity(path: str) -> str:
    return unquote(path.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1])


def _basic(value: str) -> tuple[str, str] | None:
    scheme, _, encoded = value.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, sep, password = base64.b64decode(encoded.strip()).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return (user, password) if sep else None


def _port_of(server: Server) -> int:
    return next(iter(server.sockets)).getsockname()[1]


@contextlib.contextmanager
def upstream_csms(**kwargs: Any) -> Iterator[UpstreamCsms]:
    """UpstreamCsms.start(**kwargs) for the duration of the block."""
    with UpstreamCsms.start(**kwargs) as upstream:
        yield upstream
