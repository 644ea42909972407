"""Which firmware versions have the network profile keys (the migration feature)."""

from __future__ import annotations

import re

# The vendor shipped the four network keys in 4.2.85 on the 4.2 line and 3.5.54 on the 3.5
# line; every other line is treated as having them.
_FIRST_WITH_NETWORK_KEYS: dict[tuple[int, ...], tuple[int, ...]] = {
    (4, 2): (4, 2, 85),
    (3, 5): (3, 5, 54),
}

_LEADING_DIGITS = re.compile(r"\d+")


def parse_version(version: str) -> tuple[int, ...]:
    """Numeric parts of a dotted version ("4.2.9" < "4.2.85"); a part's suffix is ignored."""
    parts: list[int] = []
    for part in version.strip().split("."):
        match = _LEADING_DIGITS.match(part)
        if not match:
            break
        parts.append(int(match.group()))
    if not parts:
        raise ValueError(f"not a firmware version: {version!r}")
    return tuple(parts)


def has_network_keys(version: str) -> bool:
    """True when this firmware exposes NetworkConnectionProfile1/2 and friends."""
    parsed = parse_version(version)
    first = _FIRST_WITH_NETWORK_KEYS.get(parsed[:2])
    return first is None or parsed >= first
