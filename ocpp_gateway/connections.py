"""The live station connections of one gateway process."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Generic, TypeVar

from websockets.asyncio.connection import Connection
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

# What the gateway, its upstream links and the simulated stations speak.
SUBPROTOCOL = Subprotocol("ocpp1.6")

Session = TypeVar("Session")


class ConnectionRegistry(Generic[Session]):
    def __init__(self) -> None:
        self._sessions: dict[str, Session] = {}

    def register(self, identity: str, session: Session) -> Session | None:
        """Make session the station's current one; return the stale one it replaces."""
        stale = self._sessions.get(identity)
        self._sessions[identity] = session
        return stale

    def unregister(self, identity: str, session: Session) -> bool:
        """Forget the session if it is still the current one (a replaced one is not)."""
        if self._sessions.get(identity) is session:
            del self._sessions[identity]
            return True
        return False

    def get(self, identity: str) -> Session | None:
        return self._sessions.get(identity)

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, identity: str) -> bool:
        return identity in self._sessions


async def answers_ping(connection: Connection, within: float) -> bool:
    """Whether a websocket connection is alive: it answers a ping in time."""
    try:
        pong = await connection.ping()
        async with asyncio.timeout(within):
            await pong
    except (TimeoutError, ConnectionClosed, ConnectionError):
        return False
    return True


async def close_quietly(connection: Connection, code: int, reason: str) -> None:
    """Close a websocket; one already closed (or closing) is fine."""
    with contextlib.suppress(ConnectionClosed, ConnectionError):
        await connection.close(code, reason)
