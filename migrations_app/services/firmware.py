"""Which firmware has the network profile keys (from the vendor's procedure)."""

from __future__ import annotations

import re

_NUMBERS = re.compile(r"\d+")


def version_parts(version: str) -> tuple[int, ...]:
    """'4.2.85-rc1' -> (4, 2, 85): numbers compared part by part, so 4.2.9 < 4.2.85."""
    core = version.strip().lstrip("vV").split("-", 1)[0].split("+", 1)[0]
    return tuple(int(part) for part in _NUMBERS.findall(core))


def firmware_gate(version: str, minimums: dict[str, str]) -> str | None:
    """The reason a station must be skipped, or None to go on.

    ``minimums`` maps a version line ("4.2") to its first version with the keys ("4.2.85").
    Versions on other lines go on: step 1 then decides by the keys the station reports.
    """
    parts = version_parts(version)
    if not parts:
        return None
    for line, minimum in minimums.items():
        line_parts = version_parts(line)
        if parts[: len(line_parts)] == line_parts and parts < version_parts(minimum):
            return (
                f"firmware {version} is older than {minimum}, the first {line}.x version "
                "with network connection profiles"
            )
    return None
