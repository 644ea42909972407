"""Rollout policies the drive applies beside the controls: the exponential rate and the
abort criteria by failure kind. (The schedule and the approvals gate the drive in
services.batches; approving and promoting are controls, services.controls.)

An abort criterion is written ``KIND:THRESHOLD[:MIN_SAMPLE]``, the same in the CLI
(``--pause-when``), the admin form (one a line) and the batch page: ``fallback:10%:20``
pauses once 10 % of at least 20 ended stations fell back to the source, ``timeout:5`` once
5 timed out. KIND is a StationMigration.FailureKind or ``any``. Like the brake, the
criteria judge the stations ended since the last resume: a resume means "go on despite
what paused it".
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from migrations_app.models import MigrationBatch, StationMigration
from migrations_app.services.progress import Ended

Kind = StationMigration.FailureKind
ANY_KIND = "any"
KINDS = (*Kind.values, ANY_KIND)


@dataclass(frozen=True)
class AbortCriterion:
    """Pause the batch when ``kind`` failures reach ``percent`` of the ended stations, or
    ``count`` of them, once at least ``min_sample`` stations have ended."""

    kind: str
    percent: float | None = None
    count: int | None = None
    min_sample: int = 1

    def problems(self) -> list[str]:
        problems = []
        if self.kind not in KINDS:
            problems.append(f"abort criterion {self.text()}: the kind must be one of {_kinds()}")
        if (self.percent is None) == (self.count is None):
            problems.append(f"abort criterion {self.text()}: give a percent or a count")
        if self.percent is not None and not 0 < self.percent <= 100:
            problems.append(f"abort criterion {self.text()}: the percent must be over 0, up to 100")
        if self.count is not None and self.count < 1:
            problems.append(f"abort criterion {self.text()}: the count must be at least 1")
        if self.min_sample < 1:
            problems.append(f"abort criterion {self.text()}: the minimum sample must be at least 1")
        return problems

    def text(self) -> str:
        """The criterion as it is written (parse_criterion reads it back)."""
        threshold = f"{self.percent:g}%" if self.percent is not None else str(self.count)
        sample = f":{self.min_sample}" if self.min_sample != 1 else ""
        return f"{self.kind}:{threshold}{sample}"

    def verdict(self, ended: Ended) -> str:
        """Why the batch must pause, or "" when this criterion does not hold."""
        if ended.total < self.min_sample:
            return ""
        failed = ended.failed if self.kind == ANY_KIND else ended.failed_by_kind.get(self.kind, 0)
        what = "failed" if self.kind == ANY_KIND else f"failed ({Kind(self.kind).label})"
        if self.percent is not None:
            share = 100 * failed / ended.total if ended.total else 0.0
            if not failed or share < self.percent:
                return ""
            return (
                f"abort criterion {self.text()}: {failed} of {ended.total} ended stations "
                f"{what} ({share:.0f}% >= {self.percent:g}%)"
            )
        assert self.count is not None  # problems() requires one of the two
        if failed < self.count:
            return ""
        return f"abort criterion {self.text()}: {failed} of {ended.total} ended stations {what}"


def parse_criterion(text: str) -> AbortCriterion:
    """``KIND:THRESHOLD[:MIN_SAMPLE]`` (THRESHOLD ``N%`` or ``N``); ValueError says why."""
    parts = [part.strip() for part in text.strip().split(":")]
    if len(parts) not in (2, 3) or not all(parts):
        raise ValueError(
            f"abort criterion {text.strip()!r} must read KIND:THRESHOLD[:MIN_SAMPLE], "
            "e.g. fallback:10%:20 or timeout:5"
        )
    kind, threshold = parts[0].lower(), parts[1]
    try:
        if threshold.endswith("%"):
            criterion = AbortCriterion(kind, percent=float(threshold[:-1]))
        else:
            criterion = AbortCriterion(kind, count=int(threshold))
        if len(parts) == 3:
            criterion = AbortCriterion(
                kind, criterion.percent, criterion.count, min_sample=int(parts[2])
            )
    except ValueError:
        raise ValueError(
            f"abort criterion {text.strip()!r}: the threshold is a number with or without %, "
            "the minimum sample a whole number"
        ) from None
    problems = criterion.problems()
    if problems:
        raise ValueError("; ".join(problems))
    return criterion


def criteria_of(record: Any) -> list[AbortCriterion]:
    """The criteria of a batch (its JSON) or of BatchOptions (AbortCriterion instances)."""
    return [
        criterion if isinstance(criterion, AbortCriterion) else AbortCriterion(**criterion)
        for criterion in record.abort_criteria or ()
    ]


def criteria_record(criteria: tuple[AbortCriterion, ...]) -> list[dict[str, Any]]:
    return [asdict(criterion) for criterion in criteria]


def abort_verdict(batch: Any, ended: Ended) -> str:
    """The first criterion of the batch that holds, as a pause reason; "" when none."""
    for criterion in criteria_of(batch):
        reason = criterion.verdict(ended)
        if reason:
            return reason
    return ""


def _kinds() -> str:
    return ", ".join(KINDS)


class _RatePolicy(Protocol):
    """A batch or its options (read only)."""

    @property
    def rate_per_minute(self) -> int: ...
    @property
    def rate_increase_factor(self) -> float | None: ...
    @property
    def rate_increase_every(self) -> int: ...
    @property
    def rate_max_per_minute(self) -> int: ...


def rate_now(policy: _RatePolicy, done: int) -> int:
    """Starts per minute allowed once ``done`` stations are done (0: no limit).

    The exponential rate (AWS IoT Jobs' exponentialRate): the base rate times the factor
    once for every ``rate_increase_every`` stations done, up to the maximum.
    """
    base = policy.rate_per_minute
    factor = policy.rate_increase_factor
    if not base or factor is None or policy.rate_increase_every < 1:
        return base
    steps = done // policy.rate_increase_every
    ceiling = max(policy.rate_max_per_minute, base)
    # In logarithms: factor ** steps overflows a float long before a batch runs out.
    if steps * math.log(factor) >= math.log(ceiling / base):
        return ceiling
    return min(ceiling, math.floor(base * factor**steps))


def rate_problems(policy: _RatePolicy) -> list[str]:
    if policy.rate_increase_factor is None:
        if policy.rate_increase_every or policy.rate_max_per_minute:
            return [
                "the rate's increase and maximum need an increase factor (a constant rate has none)"
            ]
        return []
    problems = []
    if policy.rate_increase_factor <= 1:
        problems.append("the rate's increase factor must be over 1")
    if not policy.rate_per_minute:
        problems.append("an increasing rate needs a starting rate (starts per minute over 0)")
    if policy.rate_increase_every < 1:
        problems.append("an increasing rate needs the stations done between increases (>= 1)")
    if policy.rate_max_per_minute <= policy.rate_per_minute:
        problems.append("an increasing rate needs a maximum above the starting rate")
    return problems


def when_text(at: datetime) -> str:
    """A moment as the batch page, the CLI and the reasons show it: in UTC, to the minute."""
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def schedule_ended(batch: MigrationBatch, now: datetime) -> datetime | None:
    """The end of the batch's schedule once it has passed (None before it, or without one):
    past it no station starts, and none that is not armed yet goes on."""
    end = batch.ends_at
    return end if end is not None and now >= end else None
