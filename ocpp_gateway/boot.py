"""A station's BootNotification as the gateway sees it, in either mode.

The gateway's own admission (the registry's verdict, the SECURITY event for other hardware)
and the BOOT event are the same whether the gateway answers the boot itself (endpoint mode)
or an upstream CSMS does (proxy mode); only who decides the final status differs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from websockets.asyncio.connection import Connection

from ocpp_gateway.connections import close_quietly
from ocpp_gateway.envelopes import EventKind
from ocpp_gateway.events import EventReporter
from ocpp_gateway.registry import OTHER_HARDWARE, BootStatus, BootVerdict, Registry

logger = logging.getLogger(__name__)

# Boot retry interval while the registry is unknown: it is usually loaded within seconds.
PENDING_INTERVAL = 5
# Policy violation: the close code a station gets after its boot was Rejected.
CLOSE_REJECTED = 1008


def now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def boot_hardware(payload: Mapping[str, Any]) -> dict[str, str]:
    """What a BootNotification (snake_case payload) says of the hardware that sent it."""
    charge_point_serial = str(payload.get("charge_point_serial_number") or "")
    charge_box_serial = str(payload.get("charge_box_serial_number") or "")
    return {
        "vendor": str(payload.get("charge_point_vendor") or ""),
        "model": str(payload.get("charge_point_model") or ""),
        "serial": charge_point_serial or charge_box_serial,
        "charge_point_serial": charge_point_serial,
        "charge_box_serial": charge_box_serial,
    }


def admit_boot(
    registry: Registry,
    reporter: EventReporter,
    identity: str,
    hardware: Mapping[str, str],
    *,
    authenticated: bool,
    address: str,
) -> BootVerdict:
    """The gateway's own verdict on a boot; a boot from other hardware is reported too."""
    serials = (hardware["charge_point_serial"], hardware["charge_box_serial"])
    verdict = registry.boot_verdict(identity, serials, authenticated=authenticated)
    if verdict.reason == OTHER_HARDWARE:
        entry = registry.entry(identity)
        reporter.report(
            EventKind.SECURITY,
            identity,
            {
                "reason": OTHER_HARDWARE,
                "expected_serial": entry.serial if entry else "",
                "serial": hardware["serial"],
                "address": address,
            },
        )
    return verdict


def close_reason(why: str) -> str:
    # A websocket close reason is at most 123 bytes.
    return f"boot rejected: {why}".encode()[:123].decode(errors="ignore")


def settle_boot(
    reporter: EventReporter,
    identity: str,
    hardware: Mapping[str, str],
    payload: Mapping[str, Any],
    status: BootStatus,
    reason: str,
) -> None:
    """What follows the final status of a boot, whoever gave it: the BOOT event (the
    hardware, and the answer the station got and why), and a warning for a boot not
    accepted."""
    reporter.report(
        EventKind.BOOT,
        identity,
        {
            **hardware,
            "firmware": str(payload.get("firmware_version") or ""),
            "status": status.value,
            "reason": reason,
        },
    )
    if status is not BootStatus.ACCEPTED:
        logger.warning("%s: boot %s (%s)", identity, status.value, reason)


@dataclass(frozen=True)
class BootAnswer:
    """The BootNotification.conf the gateway gives itself."""

    current_time: str
    interval: int
    status: BootStatus

    def payload(self) -> dict[str, Any]:
        """On the wire (camelCase)."""
        return {
            "currentTime": self.current_time,
            "interval": self.interval,
            "status": self.status.value,
        }


def answer_boot(
    reporter: EventReporter,
    identity: str,
    hardware: Mapping[str, str],
    payload: Mapping[str, Any],
    verdict: BootVerdict,
    *,
    heartbeat_interval: int,
) -> BootAnswer:
    """The gateway answering a boot itself with its own verdict: settled, and the answer."""
    settle_boot(reporter, identity, hardware, payload, verdict.status, verdict.reason)
    pending = verdict.status is BootStatus.PENDING
    return BootAnswer(
        current_time=now_iso(),
        interval=PENDING_INTERVAL if pending else heartbeat_interval,
        status=verdict.status,
    )


def close_rejected(
    connection: Connection, identity: str, reason: str, on_rejected: Callable[[str], None]
) -> asyncio.Task[None]:
    """Close a station whose boot was Rejected, and have its identity held off.

    A station retries a Rejected boot on the same socket forever: closing it (and refusing
    its handshakes for a while) lets its profile fallback take it back to its previous CSMS.
    """
    on_rejected(identity)
    return asyncio.create_task(close_quietly(connection, CLOSE_REJECTED, close_reason(reason)))
