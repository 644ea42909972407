"""What each station did: kept in memory on the station and appended to a JSON-lines file."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any


@dataclass(frozen=True, slots=True)
class Event:
    t: float
    event: str
    data: dict[str, Any]

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def as_dict(self, station: str) -> dict[str, Any]:
        return {"t": round(self.t, 6), "station": station, "event": self.event, **self.data}


class Journal:
    """One JSON-lines file shared by every station of a fleet; no file means memory only."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path else None
        self._file: IO[str] | None = None

    def open(self) -> None:
        if self.path and self._file is None:
            # Line buffered, so a demo can tail the file and a killed process loses nothing
            # that was already recorded; events are rare next to heartbeats.
            self._file = open(self.path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115

    def write(self, station: str, event: Event) -> None:
        if self._file is not None:
            self._file.write(json.dumps(event.as_dict(station), separators=(",", ":")) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_journal(path: str | Path) -> list[dict[str, Any]]:
    """All lines of a journal file, for tests and tools."""
    with open(path, encoding="utf-8") as file:
        return [json.loads(line) for line in file if line.strip()]
