"""Reads of the fleet inventory for the admin, the commands and the migrations."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.db.models import Count, Q, QuerySet

from fleet.models import ChargingStation, CsmsBackend, Registration, StationEvent
from fleet.rows import select_first


def csms_backend_get(*, name: str) -> CsmsBackend | None:
    return CsmsBackend.objects.filter(name=name).first()


def csms_backend_list() -> QuerySet[CsmsBackend]:
    """Backends with how many stations are on each and how many of those are connected."""
    return CsmsBackend.objects.annotate(
        station_count=Count("stations"),
        connected_count=Count("stations", filter=Q(stations__connected=True)),
    ).order_by("name")


def station_list(*, csms: CsmsBackend | None = None) -> QuerySet[ChargingStation]:
    stations = ChargingStation.objects.select_related("csms").order_by("identity")
    if csms is not None:
        stations = stations.filter(csms=csms)
    return stations


def station_registered_on(station_id: int, csms_id: int, *, admitted: bool = False) -> bool:
    """Whether the station has an active registration on the CSMS; with ``admitted``, one
    its gateways still admit (active, or marked for removal and not removed yet)."""
    states = Registration.ADMITTED_STATES if admitted else (Registration.State.ACTIVE,)
    # At most one registration per station and CSMS. Read in every station's pre-flight: a
    # statement built once (fleet.rows).
    row = select_first(Registration, ("state",), {"station_id": station_id, "csms_id": csms_id})
    return row is not None and row[0] in states


def station_get(*, identity: str) -> ChargingStation | None:
    return ChargingStation.objects.select_related("csms").filter(identity=identity).first()


def station_rows(*, csms: CsmsBackend | None = None) -> list[dict[str, Any]]:
    """One plain, JSON-ready dict per station (``manage.py list_stations``)."""
    return [
        {
            "identity": station.identity,
            "csms": station.csms.name if station.csms else None,
            "connected": station.connected,
            "firmware": station.firmware_version,
            "vendor": station.vendor,
            "model": station.model,
            "serial": station.serial,
            "last_boot": _iso(station.last_boot_at),
            "last_seen": _iso(station.last_seen_at),
            "connectors": station.connector_status,
        }
        for station in station_list(csms=csms)
    ]


def station_events_recent(*, station: ChargingStation, limit: int = 20) -> list[StationEvent]:
    return list(
        StationEvent.objects.filter(station=station).select_related("csms").order_by("-at")[:limit]
    )


def connector_status_summary(connector_status: dict[str, Any]) -> str:
    """'1 Available, 2 Charging (GroundFailure)': connectors in numeric order, 0 left out.

    Connector 0 stands for the whole station and repeats what the connectors say.
    """
    parts = []
    for key in sorted(connector_status, key=lambda key: (not key.isdigit(), key.zfill(6))):
        if key == "0":
            continue
        entry = connector_status[key]
        if not isinstance(entry, dict):
            continue
        error = entry.get("error_code") or ""
        suffix = f" ({error})" if error and error != "NoError" else ""
        parts.append(f"{key} {entry.get('status') or '?'}{suffix}")
    return ", ".join(parts)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None
