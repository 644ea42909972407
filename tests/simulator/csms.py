"""A small in-test central system: a real websockets server speaking OCPP 1.6 through `ocpp`.

It answers what stations send and lets a test call a connected station.
"""

from __future__ import annotations

import asyncio
import itertools
import ssl
from collections.abc import Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from ocpp.routing import after, on
from ocpp.v16 import ChargePoint, call_result
from ocpp.v16.datatypes import IdTagInfo
from ocpp.v16.enums import Action, AuthorizationStatus, RegistrationStatus
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from devstack.processes import free_port, wait_until_async
from ocpp_gateway.simulator import Timing

T = TypeVar("T")


@dataclass
class Message:
    identity: str
    action: str
    payload: dict[str, Any] = field(default_factory=dict)


class _Station(ChargePoint):
    """The central system's side of one station connection."""

    def __init__(self, identity: str, ws: ServerConnection, csms: CentralSystem) -> None:
        super().__init__(identity, ws, response_timeout=5)
        self.csms = csms

    def _note(self, action: str, payload: dict[str, Any]) -> None:
        self.csms.messages.append(Message(self.id, action, payload))

    @on(Action.boot_notification)
    def on_boot_notification(self, **payload: Any) -> call_result.BootNotification:
        self._note("BootNotification", payload)
        return call_result.BootNotification(
            current_time=datetime.now(UTC).isoformat(),
            interval=self.csms.heartbeat_interval,
            status=self.csms.boot_status,
        )

    @after(Action.boot_notification)
    async def after_boot_notification(self, **_: Any) -> None:
        if self.csms.close_after_rejecting and self.csms.boot_status is RegistrationStatus.rejected:
            # As a proxy in front of a rejecting CSMS does: the close right behind the answer.
            await self._connection.close(4003, "boot rejected")

    @on(Action.heartbeat)
    def on_heartbeat(self, **payload: Any) -> call_result.Heartbeat:
        self._note("Heartbeat", payload)
        return call_result.Heartbeat(current_time=datetime.now(UTC).isoformat())

    @on(Action.status_notification)
    def on_status_notification(self, **payload: Any) -> call_result.StatusNotification:
        self._note("StatusNotification", payload)
        return call_result.StatusNotification()

    @on(Action.start_transaction)
    def on_start_transaction(self, **payload: Any) -> call_result.StartTransaction:
        self._note("StartTransaction", payload)
        return call_result.StartTransaction(
            transaction_id=next(self.csms.transaction_ids),
            id_tag_info=IdTagInfo(status=AuthorizationStatus.accepted),
        )

    @on(Action.stop_transaction)
    def on_stop_transaction(self, **payload: Any) -> call_result.StopTransaction:
        self._note("StopTransaction", payload)
        return call_result.StopTransaction()

    @on(Action.meter_values)
    def on_meter_values(self, **payload: Any) -> call_result.MeterValues:
        self._note("MeterValues", payload)
        return call_result.MeterValues()


class CentralSystem:
    """`async with CentralSystem() as csms:` serves ws://127.0.0.1:<port>/ocpp/<identity>."""

    def __init__(self, *, heartbeat_interval: int = 300, tls: ssl.SSLContext | None = None) -> None:
        self.heartbeat_interval = heartbeat_interval
        self.tls = tls
        self.boot_status = RegistrationStatus.accepted
        self.close_after_rejecting = False
        self.messages: list[Message] = []
        self.stations: dict[str, _Station] = {}
        self.transaction_ids = itertools.count(1000)
        self._server: Server | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"{'wss' if self.tls else 'ws'}://127.0.0.1:{port}/ocpp"

    async def __aenter__(self) -> CentralSystem:
        self._server = await serve(
            self._handle,
            "127.0.0.1",
            0,
            subprotocols=[Subprotocol("ocpp1.6")],
            compression=None,
            ssl=self.tls,
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _handle(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        path = ws.request.path
        identity = path.rsplit("/", 1)[-1]
        station = _Station(identity, ws, self)
        self.stations[identity] = station
        headers = ws.request.headers
        self.messages.append(
            Message(
                identity,
                "connect",
                {
                    "path": path,
                    "subprotocol": ws.subprotocol,
                    "authorization": headers.get("Authorization"),
                },
            )
        )
        try:
            await station.start()
        except ConnectionClosed:
            pass
        finally:
            if self.stations.get(identity) is station:
                del self.stations[identity]
            self.messages.append(Message(identity, "disconnect", {"code": ws.close_code}))

    def seen(self, identity: str, action: str) -> list[dict[str, Any]]:
        return [m.payload for m in self.messages if m.identity == identity and m.action == action]

    def seen_all(self, action: str) -> list[dict[str, Any]]:
        return [m.payload for m in self.messages if m.action == action]

    async def call(self, identity: str, payload: Any) -> Any:
        """Send a request to a connected station; CALLERRORs raise (never a silent None)."""
        station = await wait_until_async(
            lambda: self.stations.get(identity), 10, f"{identity} connected"
        )
        assert station is not None
        return await station.call(payload, suppress=False)


# Short delays so reboots and fallbacks take a fraction of a second in tests.
FAST = Timing(
    reboot_delay=0.1,
    retry_interval=0.1,
    reconnect_delay=0.1,
    max_round_backoff=0.5,
    response_timeout=5.0,
    open_timeout=2.0,
    close_timeout=1.0,
)


def run(coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
    """Run one test scenario on a fresh event loop, with a deadline for the whole of it."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


def closed_port_url() -> str:
    """A ws:// URL where nothing listens (connection refused)."""
    return f"ws://127.0.0.1:{free_port()}/ocpp"
