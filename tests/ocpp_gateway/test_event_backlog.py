"""The event queue while Redis is away: bounded, routine events dropped first."""

from __future__ import annotations

import redis.asyncio as aioredis

from ocpp_gateway.envelopes import EventKind
from ocpp_gateway.events import EventReporter


def test_a_full_backlog_drops_routine_events_before_boots_and_security_events():
    # Nothing is written here (run() is not started): only the queue's policy is exercised.
    reporter = EventReporter(aioredis.Redis(port=1), "csms-1", max_backlog=100)
    for n in range(10):
        reporter.report(EventKind.BOOT, f"CP{n}", {})
        reporter.report(EventKind.SECURITY, f"CP{n}", {})
    for n in range(200):
        reporter.report(EventKind.STATUS, f"CP{n}", {"n": n})
    assert reporter.backlog <= 100
    kinds = [event.kind for event in reporter._queue]
    assert kinds.count(EventKind.BOOT) == 10 and kinds.count(EventKind.SECURITY) == 10
    statuses = [event.data["n"] for event in reporter._queue if event.kind is EventKind.STATUS]
    assert statuses == sorted(statuses) and statuses[-1] == 199  # the oldest went first
    assert reporter.dropped == 220 - reporter.backlog

    for n in range(100):  # nothing routine left to drop: the oldest events go
        reporter.report(EventKind.BOOT, f"CP-LATE{n}", {})
    assert reporter.backlog <= 100
    assert reporter._queue[-1].station == "CP-LATE99"
