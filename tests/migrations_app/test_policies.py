"""The rollout policies' arithmetic: abort criteria as written and judged, the exponential
rate. (Enforced by real workers in test_rollout_policies.)"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from migrations_app.services.policies import AbortCriterion, parse_criterion, rate_now
from migrations_app.services.progress import Ended


@pytest.mark.parametrize(
    ("text", "criterion"),
    [
        ("fallback:10%:20", AbortCriterion("fallback", percent=10, min_sample=20)),
        (" Timeout : 5 ", AbortCriterion("timeout", count=5)),
        ("any:2.5%", AbortCriterion("any", percent=2.5)),
    ],
)
def test_a_criterion_reads_as_it_is_written(text, criterion):
    assert parse_criterion(text) == criterion
    assert parse_criterion(criterion.text()) == criterion


def test_a_percent_criterion_waits_for_its_sample_then_names_itself():
    criterion = parse_criterion("fallback:10%:20")
    assert criterion.verdict(Ended(17, 2, 0, {"fallback": 2})) == ""  # 19 ended
    assert criterion.verdict(Ended(19, 1, 0, {"fallback": 1})) == ""  # 5 %
    assert criterion.verdict(Ended(18, 2, 0, {"fallback": 2})) == (
        "abort criterion fallback:10%:20: 2 of 20 ended stations failed (fell back to the "
        "source) (10% >= 10%)"
    )


def test_a_count_criterion_counts_only_its_kind_and_any_counts_all():
    ended = Ended(3, 4, 0, {"timeout": 2, "rejected": 2})
    assert parse_criterion("timeout:3").verdict(ended) == ""
    assert parse_criterion("rejected:2").verdict(ended).startswith("abort criterion rejected:2: ")
    assert parse_criterion("any:4").verdict(ended) == (
        "abort criterion any:4: 4 of 7 ended stations failed"
    )


def rate(base: int, factor: float | None, every: int = 1, ceiling: int = 0) -> SimpleNamespace:
    return SimpleNamespace(
        rate_per_minute=base,
        rate_increase_factor=factor,
        rate_increase_every=every,
        rate_max_per_minute=ceiling,
    )


def test_the_exponential_rate_steps_up_to_its_ceiling():
    policy = rate(10, 1.5, every=100, ceiling=60)
    assert [rate_now(policy, done) for done in (0, 99, 100, 250, 400, 10**9)] == [
        10,
        10,
        15,
        22,
        50,
        60,
    ]
    assert rate_now(rate(10, None), 10**6) == 10  # a constant rate
    assert rate_now(rate(0, 2.0, ceiling=100), 50) == 0  # no limit stays no limit
