from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from fleet.selectors import connector_status_summary, csms_backend_get, station_rows

# (header, row key) of the human table, left to right.
_COLUMNS = [
    ("IDENTITY", "identity"),
    ("CSMS", "csms"),
    ("CONNECTED", "connected"),
    ("FIRMWARE", "firmware"),
    ("VENDOR", "vendor"),
    ("MODEL", "model"),
    ("LAST BOOT", "last_boot"),
    ("LAST SEEN", "last_seen"),
    ("CONNECTORS", "connectors"),
]


class Command(BaseCommand):
    help = "List the charging stations in the inventory."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--csms", metavar="NAME", help="Only stations now on this CSMS.")
        parser.add_argument(
            "--json",
            dest="as_json",
            action="store_true",
            help="Print a JSON array instead of a table.",
        )

    def handle(self, *args: Any, csms: str | None, as_json: bool, **options: Any) -> None:
        backend = None
        if csms is not None:
            backend = csms_backend_get(name=csms)
            if backend is None:
                raise CommandError(f"No CSMS backend named {csms!r}.", returncode=2)
        rows = station_rows(csms=backend)
        self.stdout.write(json.dumps(rows, indent=2) if as_json else _table(rows))


def _table(rows: list[dict[str, Any]]) -> str:
    cells = [[header for header, _ in _COLUMNS]]
    for row in rows:
        cells.append([_cell(row[key]) for _, key in _COLUMNS])
    widths = [max(len(line[i]) for line in cells) for i in range(len(_COLUMNS))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in cells
    ]
    noun = "station" if len(rows) == 1 else "stations"
    lines.append(f"{len(rows)} {noun}")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict):
        return connector_status_summary(value) or "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, str) and len(value) > 19 and value[10:11] == "T":
        # ISO 8601 timestamps: seconds are enough in a table (all UTC).
        return value[:19].replace("T", " ")
    return str(value) or "-"
