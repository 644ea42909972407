"""Which stations a batch takes: a list of identities (a file), filters, or both.

The command and the admin's preview use the same filters; what a selection leaves out is
counted and the identities it could not find are listed, never silently dropped.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from django.db.models import QuerySet

from fleet.models import ChargingStation
from migrations_app.services.firmware import version_parts

IDENTITY_COLUMN = "identity"
# Past this many, a list of identities is cut in messages (the batch records them all).
LISTED_IN_MESSAGES = 20
_LOOKUP_CHUNK = 500


class SelectionError(ValueError):
    """The selection cannot be read or applied; the message says why."""


@dataclass(frozen=True)
class StationFilters:
    """Narrow a selection by what the stations reported in their BootNotification."""

    vendor: str = ""
    model: str = ""
    firmware_at_least: str = ""

    def __post_init__(self) -> None:
        for name in ("vendor", "model", "firmware_at_least"):
            object.__setattr__(self, name, (getattr(self, name) or "").strip())

    def __bool__(self) -> bool:
        return bool(self.vendor or self.model or self.firmware_at_least)

    def problems(self) -> list[str]:
        if self.firmware_at_least and not version_parts(self.firmware_at_least):
            return [f"firmware version {self.firmware_at_least!r} has no version number"]
        return []

    def matches(self, station: ChargingStation) -> bool:
        return self.matches_values(station.vendor, station.model, station.firmware_version)

    def matches_values(self, vendor: str, model: str, firmware_version: str) -> bool:
        """Vendor and model ignore case; firmware compares part by part (4.2.9 < 4.2.85),
        and a station whose firmware has no number cannot be shown to match."""
        if self.vendor and (vendor or "").casefold() != self.vendor.casefold():
            return False
        if self.model and (model or "").casefold() != self.model.casefold():
            return False
        if self.firmware_at_least:
            version = version_parts(firmware_version or "")
            return bool(version) and version >= version_parts(self.firmware_at_least)
        return True

    def record(self) -> dict[str, str]:
        """The filters set, as MigrationBatch.selection keeps them."""
        return {name: value for name, value in asdict(self).items() if value}

    def describe(self) -> str:
        return selection_filters_text(self.record())


@dataclass
class Selection:
    """The stations chosen, and what the batch records of how."""

    stations: list[ChargingStation]
    # Identities asked for (a file, the command line) that no station has.
    not_found: list[str] = field(default_factory=list)
    # Stations found or on the source CSMS that the filters left out.
    filtered_out: int = 0
    filters: StationFilters = field(default_factory=StationFilters)
    stations_file: str = ""

    def record(self) -> dict[str, Any]:
        """What MigrationBatch.selection keeps (empty for a plain selection)."""
        record: dict[str, Any] = {}
        if self.stations_file:
            record["stations_file"] = self.stations_file
        if self.filters:
            record["filters"] = self.filters.record()
            record["filtered_out"] = self.filtered_out
        if self.not_found:
            record["not_found"] = self.not_found
        return record

    def notes(self) -> list[str]:
        """One line per thing the operator should know about the selection."""
        notes = []
        if self.not_found:
            notes.append(
                f"{len(self.not_found)} station(s) not found, left out: " + listed(self.not_found)
            )
        if self.filters:
            notes.append(
                f"the filters ({self.filters.describe()}) left out {self.filtered_out} "
                f"station(s); {len(self.stations)} match"
            )
        return notes


def selection_filters_text(filters: dict[str, str]) -> str:
    """Recorded filters in words: 'vendor Acme, firmware at least 4.2.85'."""
    labels = {"vendor": "vendor", "model": "model", "firmware_at_least": "firmware at least"}
    return ", ".join(f"{labels.get(name, name)} {value}" for name, value in filters.items())


def listed(identities: list[str]) -> str:
    shown = ", ".join(identities[:LISTED_IN_MESSAGES])
    more = len(identities) - LISTED_IN_MESSAGES
    return shown + (f" and {more} more" if more > 0 else "")


def read_identities(text: str) -> list[str]:
    """Identities from a stations file: one a line (blank lines and # comments skipped),
    or a CSV whose header has an ``identity`` column. Duplicates are kept once."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return []
    header = next(csv.reader([lines[0]]))
    columns = [cell.strip().lower() for cell in header]
    if IDENTITY_COLUMN in columns:
        index = columns.index(IDENTITY_COLUMN)
        identities = [
            row[index].strip()
            for row in csv.reader(io.StringIO("\n".join(lines[1:])))
            if len(row) > index
        ]
    elif len(header) > 1:
        raise SelectionError(
            f"the CSV has no {IDENTITY_COLUMN!r} column (its header: {', '.join(header)})"
        )
    else:
        identities = [line.strip() for line in lines if not line.lstrip().startswith("#")]
    return list(dict.fromkeys(identity for identity in identities if identity))


def read_stations_file(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8-sig") as handle:
            text = handle.read()
    except OSError as exc:
        raise SelectionError(f"cannot read the stations file {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise SelectionError(f"the stations file {path} is not UTF-8 text ({exc})") from exc
    identities = read_identities(text)
    if not identities:
        raise SelectionError(f"the stations file {path} lists no station")
    return identities


def select_stations(
    *,
    stations: QuerySet[ChargingStation],
    identities: Iterable[str] | None = None,
    filters: StationFilters | None = None,
    stations_file: str = "",
) -> Selection:
    """The stations of ``stations`` (narrowed to ``identities`` when given) that match the
    filters, in identity order."""
    filters = filters or StationFilters()
    problems = filters.problems()
    if problems:
        raise SelectionError("; ".join(problems))
    not_found: list[str] = []
    if identities is None:
        candidates = list(stations)
    else:
        wanted = list(dict.fromkeys(identities))
        candidates = []
        # In chunks: a file of thousands is past the bound parameters SQLite takes.
        for start in range(0, len(wanted), _LOOKUP_CHUNK):
            candidates += stations.filter(identity__in=wanted[start : start + _LOOKUP_CHUNK])
        found = {station.identity for station in candidates}
        not_found = [identity for identity in wanted if identity not in found]
    chosen = sorted(filter(filters.matches, candidates), key=lambda s: s.identity)
    return Selection(
        stations=chosen,
        not_found=not_found,
        filtered_out=len(candidates) - len(chosen),
        filters=filters,
        stations_file=stations_file,
    )


def selection_summary(selection: dict[str, Any]) -> str:
    """A recorded selection in a few words, for the batch's history ('' for a plain one)."""
    parts = []
    if selection.get("stations_file"):
        parts.append(f"from {selection['stations_file']}")
    if selection.get("filters"):
        filters = selection_filters_text(selection["filters"])
        parts.append(f"filters {filters} left out {selection['filtered_out']}")
    if selection.get("not_found"):
        parts.append(f"{len(selection['not_found'])} not found")
    return f" ({'; '.join(parts)})" if parts else ""
