"""A station's BootNotification as the gateway sees it, in either mode.

The gateway's own admission (the registry's verdict, the SECURITY event for other hardware)
and the BOOT event are the same whether the gateway answers the boot itself (endpoint mode)
or an upstream CSMS does (proxy mode); only who decides the final status differs.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from ocpp_gateway.envelopes import EventKind
from ocpp_gateway.events import EventReporter
from ocpp_gateway.registry import OTHER_HARDWARE, BootStatus, BootVerdict, Registry

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


def report_boot(
    reporter: EventReporter,
    identity: str,
    hardware: Mapping[str, str],
    payload: Mapping[str, Any],
    status: BootStatus,
    reason: str,
) -> None:
    """The BOOT event: the hardware, and the answer the station got (and why)."""
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


def close_reason(why: str) -> str:
    # A websocket close reason is at most 123 bytes.
    return f"boot rejected: {why}".encode()[:123].decode(errors="ignore")
