"""GET /metrics of a real gateway process, parsed with prometheus-client's own parser."""

from __future__ import annotations

import asyncio
import json
import urllib.request

import pytest
from ocpp.v16 import call
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.typing import Subprotocol

from devstack.processes import wait_until
from ocpp_gateway.client import send_command
from ocpp_gateway.envelopes import Outcome
from tests.ocpp_gateway.registry import publish_registry
from tests.ocpp_gateway.stations import station_on
from tests.ocpp_gateway.test_gateway import http_base

OCPP16 = Subprotocol("ocpp1.6")


def scrape(ws_url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels but csms): value}, every sample labelled csms-1."""
    with urllib.request.urlopen(f"{http_base(ws_url)}/metrics", timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=")
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = dict(sample.labels)
            assert labels.pop("csms") == "csms-1", sample
            samples[(sample.name, tuple(sorted(labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_connections_boots_commands_and_refusals(start_gateway, redis_client):
    base = start_gateway("csms-1", "--open", "--max-frame-bytes", "1024")
    before = scrape(base)
    assert value(before, "csms_gateway_stations_connected") == 0
    # Every refusal reason is a series from the start, so a rate alert has one to read.
    assert ("csms_gateway_refused_total", (("reason", "oversize"),)) in before

    async def scenario() -> dict:
        async with station_on(base, "CP1"):
            for _ in range(2):
                reply = await asyncio.to_thread(
                    send_command, redis_client, "CP1", call.GetConfiguration(key=["x"]), timeout=5
                )
                assert reply.outcome is Outcome.RESULT
            reply = await asyncio.to_thread(
                send_command, redis_client, "CP1", call.ClearCache(), timeout=5
            )
            assert reply.outcome is Outcome.REJECTED
            during = scrape(base)
        async with connect(f"{base}/CP2", subprotocols=[OCPP16]) as ws:
            await ws.send('[2, "abc", "BootNotification"]')  # no payload
            json.loads(await asyncio.wait_for(ws.recv(), 5))
            await ws.send(json.dumps([2, "x", "DataTransfer", {"vendorId": "v" * 4096}]))
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 5)
        with pytest.raises(InvalidStatus):
            async with connect(f"{base}/CP3"):  # no ocpp1.6 subprotocol
                pass
        return during

    during = asyncio.run(scenario())
    assert value(during, "csms_gateway_stations_connected") == 1
    assert value(during, "csms_gateway_boot_notifications_total", status="Accepted") == 1
    get = {"action": "GetConfiguration"}
    assert value(during, "csms_gateway_commands_total", **get, outcome="result") == 2
    assert (
        value(during, "csms_gateway_commands_total", action="ClearCache", outcome="rejected") == 1
    )
    assert value(during, "csms_gateway_command_duration_seconds_count", **get) == 2
    assert value(during, "csms_gateway_command_duration_seconds_bucket", **get, le="+Inf") == 2

    def settled() -> dict | None:
        after = scrape(base)
        done = value(after, "csms_gateway_disconnects_total") == 2
        return after if done and value(after, "csms_gateway_stations_connected") == 0 else None

    after = wait_until(settled, 10, "both stations' disconnects in /metrics")
    assert value(after, "csms_gateway_connects_total") == 2
    assert value(after, "csms_gateway_refused_total", reason="malformed") == 1
    assert value(after, "csms_gateway_refused_total", reason="oversize") == 1
    assert value(after, "csms_gateway_refused_total", reason="bad_handshake") == 1
    assert value(after, "csms_gateway_event_backlog") == 0
    assert value(after, "csms_gateway_events_written_total") >= 5  # 2 connects, boot, 2 ends


def test_metrics_count_refused_handshakes_by_reason(start_gateway, redis_client):
    publish_registry(redis_client, "csms-1", {"CP-LOCKED": ""}, passwords={"CP-LOCKED": "pw"})
    base = start_gateway("csms-1")  # admits only the registered station, with its password

    async def refused(identity: str) -> int:
        with pytest.raises(InvalidStatus) as refusal:
            async with connect(f"{base}/{identity}", subprotocols=[OCPP16]):
                pass
        return refusal.value.response.status_code

    assert asyncio.run(refused("CP-STRANGER")) == 403
    assert asyncio.run(refused("CP-LOCKED")) == 401  # no credentials
    samples = scrape(base)
    assert value(samples, "csms_gateway_refused_total", reason="unregistered") == 1
    assert value(samples, "csms_gateway_refused_total", reason="unauthenticated") == 1
    assert value(samples, "csms_gateway_connects_total") == 0
