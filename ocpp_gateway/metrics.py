"""The gateway's Prometheus metrics (prometheus-client), served at GET /metrics.

Each gateway has its own registry, not the library's global one: its counters are about its
own stations, and a test may run several gateways in one process. What the gateway holds
anyway (its sessions, its event backlog) is read when scraped, not kept twice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from enum import StrEnum

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ocpp_gateway.envelopes import Event, EventKind, Reply

METRICS_PATH = "/metrics"
# From a Heartbeat answered at once to a Reset on a slow cellular link (the command
# deadline is 30 s by default).
COMMAND_SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class RefusedBecause(StrEnum):
    """Why a handshake or a frame was refused: the ``reason`` label's values."""

    MALFORMED = "malformed"  # a frame that is not OCPP-J
    BAD_HANDSHAKE = "bad_handshake"  # no identity in the path, or no ocpp1.6 subprotocol
    OVERSIZE = "oversize"  # a frame past --max-frame-bytes (closed with 1009)
    UNAUTHENTICATED = "unauthenticated"  # bad or missing credentials (401)
    UNREGISTERED = "unregistered"  # not registered on this CSMS (403)
    HELD = "held"  # its boot was Rejected a moment ago (403)
    DUPLICATE = "duplicate"  # a second connection while the station answers (409)
    UPSTREAM = "upstream"  # proxy mode: the upstream refused or is down


# (name, help, how to read it now)
_Reading = tuple[str, str, Callable[[], int]]


class _ReadWhenScraped(Collector):
    """What the gateway holds anyway, read when scraped."""

    def __init__(self, csms: str, gauges: list[_Reading], counters: list[_Reading]) -> None:
        self._csms = csms
        self._gauges = gauges
        self._counters = counters

    def collect(self) -> Iterator[Metric]:
        for name, doc, read in self._gauges:
            gauge = GaugeMetricFamily(name, doc, labels=["csms"])
            gauge.add_metric([self._csms], read())
            yield gauge
        for name, doc, read in self._counters:
            counter = CounterMetricFamily(name, doc, labels=["csms"])
            counter.add_metric([self._csms], read())
            yield counter


class GatewayMetrics:
    def __init__(
        self,
        csms: str,
        *,
        stations: Callable[[], int],
        backlog: Callable[[], int],
        events_written: Callable[[], int],
        events_dropped: Callable[[], int],
    ) -> None:
        self.csms = csms
        self.registry = registry = CollectorRegistry()
        labels = ("csms",)
        gauges = [
            ("csms_gateway_stations_connected", "Stations connected now.", stations),
            ("csms_gateway_event_backlog", "Station events not yet written to Redis.", backlog),
        ]
        counters = [
            ("csms_gateway_events_written", "Station events written to Redis.", events_written),
            (
                "csms_gateway_events_dropped",
                "Station events dropped while Redis was away and the backlog was full.",
                events_dropped,
            ),
        ]
        registry.register(_ReadWhenScraped(csms, gauges, counters))
        self._connects = Counter(
            "csms_gateway_connects", "Station connections opened.", labels, registry=self.registry
        ).labels(csms)
        self._disconnects = Counter(
            "csms_gateway_disconnects",
            "Station connections closed.",
            labels,
            registry=self.registry,
        ).labels(csms)
        self._boots = Counter(
            "csms_gateway_boot_notifications",
            "BootNotifications by the status the station got.",
            (*labels, "status"),
            registry=self.registry,
        )
        self._commands = Counter(
            "csms_gateway_commands",
            "Commands relayed from the migrations, by OCPP action and outcome.",
            (*labels, "action", "outcome"),
            registry=self.registry,
        )
        self._command_seconds = Histogram(
            "csms_gateway_command_duration_seconds",
            "From sending a command's OCPP call to the station's answer (or the deadline).",
            (*labels, "action"),
            buckets=COMMAND_SECONDS_BUCKETS,
            registry=self.registry,
        )
        self._refused = Counter(
            "csms_gateway_refused",
            "Handshakes and frames refused, by reason.",
            (*labels, "reason"),
            registry=self.registry,
        )
        # Each reason shows as 0 before it first happens: an alert on a rate needs a series.
        for reason in RefusedBecause:
            self._refused.labels(csms, reason.value)

    def observe_event(self, event: Event) -> None:
        """Count what a reported station event says (the reporter calls this)."""
        if event.kind is EventKind.CONNECT:
            self._connects.inc()
        elif event.kind is EventKind.DISCONNECT:
            self._disconnects.inc()
        elif event.kind is EventKind.BOOT:
            self._boots.labels(self.csms, str(event.data.get("status", ""))).inc()

    def command_done(self, action: str, reply: Reply) -> None:
        self._commands.labels(self.csms, action, reply.outcome.value).inc()
        if reply.sent_at is not None and reply.finished_at is not None:
            seconds = max(reply.finished_at - reply.sent_at, 0.0)
            self._command_seconds.labels(self.csms, action).observe(seconds)

    def refused(self, reason: RefusedBecause) -> None:
        self._refused.labels(self.csms, reason.value).inc()

    def exposition(self) -> tuple[bytes, str]:
        """The text exposition format and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
