"""Proxy mode: a real gateway process in front of an upstream CSMS that is not our code.

The upstream is tests.upstream_csms (the ``ocpp`` library's central system, real sockets);
stations are the simulator, or a raw websocket client where a test needs a station that
answers late, never, or sends frames by hand.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import socket
import urllib.request
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from ocpp.exceptions import GenericError
from ocpp.v16 import call
from ocpp.v16.enums import MessageTrigger
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from devstack.processes import free_port, wait_until
from ocpp_gateway.client import send_command
from ocpp_gateway.envelopes import EventKind, Outcome
from ocpp_gateway.simulator import Fleet, StationSpec, Timing
from tests.ocpp_gateway.registry import events_of, publish_registry, stream_events
from tests.ocpp_gateway.stations import station_on
from tests.upstream_csms import UpstreamCsms

FAST = Timing(reboot_delay=0.3, retry_interval=0.2, reconnect_delay=0.3)
BOOT = {"chargePointVendor": "RawVendor", "chargePointModel": "R1", "firmwareVersion": "1.0"}


@pytest.fixture
def upstream():
    with UpstreamCsms.start() as csms:
        yield csms


@pytest.fixture
def proxy(start_gateway, upstream):
    """start(*extra) -> the ws base URL of a gateway proxying to the upstream fixture."""

    def start(*extra: str, csms: str = "csms-1", to: str | None = None) -> str:
        return start_gateway(csms, "--upstream", to or upstream.url, *extra)

    return start


def health(ws_url: str) -> dict:
    base = ws_url.replace("ws://", "http://").rsplit("/", 1)[0]
    with urllib.request.urlopen(f"{base}/health", timeout=5) as response:
        return json.load(response)


class RawStation:
    """A station speaking OCPP-J by hand: every frame it gets is queued for the test."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.frames: asyncio.Queue[list[Any]] = asyncio.Queue(maxsize=100)
        self.seen: list[list[Any]] = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for raw in self.ws:
                frame = json.loads(raw)
                self.seen.append(frame)
                await self.frames.put(frame)

    async def next(self, within: float = 5) -> list[Any]:
        async with asyncio.timeout(within):
            return await self.frames.get()

    async def call(self, unique_id: str, action: str, payload: dict, within: float = 5) -> list:
        """Send a CALL and return the answer frame with that id (other frames stay queued)."""
        await self.ws.send(json.dumps([2, unique_id, action, payload]))
        skipped = []
        try:
            async with asyncio.timeout(within):
                while True:
                    frame = await self.frames.get()
                    if frame[0] in (3, 4) and frame[1] == unique_id:
                        return frame
                    skipped.append(frame)
        finally:
            for frame in skipped:
                self.frames.put_nowait(frame)

    async def answer(self, unique_id: str, payload: dict) -> None:
        await self.ws.send(json.dumps([3, unique_id, payload]))

    async def close_code(self, within: float = 5) -> int | None:
        async with asyncio.timeout(within):
            await self.ws.wait_closed()
        return self.ws.close_code


@contextlib.asynccontextmanager
async def raw_station(base: str, identity: str, **kwargs: Any) -> AsyncIterator[RawStation]:
    kwargs.setdefault("subprotocols", ["ocpp1.6"])
    async with connect(f"{base}/{identity}", open_timeout=10, **kwargs) as ws:
        station = RawStation(ws)
        try:
            yield station
        finally:
            station._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await station._reader


def boots_in_stream(redis_client, identity: str) -> list[dict]:
    return [
        e.data
        for e in stream_events(redis_client)
        if e.kind is EventKind.BOOT and e.station == identity
    ]


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# --- booting through the proxy ---------------------------------------------------------------


def test_a_station_boots_through_the_proxy_and_the_upstreams_answer_is_recorded(
    proxy, upstream, redis_client
):
    base = proxy("--open")
    body = wait_until(lambda: (b := health(base))["redis"] == "ok" and b, 5, "redis ok in /health")
    assert (body["mode"], body["upstream"]) == ("proxy", upstream.url)
    spec = StationSpec("CP-1", url=base, vendor="Acme", model="AC22", serial_number="SN-1")
    with Fleet([spec], timing=FAST) as fleet:
        wait_until(lambda: fleet["CP-1"].online, 10, "the station online")
        link = upstream.wait_connected("CP-1", 5)
        assert link.path == "/ocpp/CP-1" and link.subprotocol == "ocpp1.6"
        (boot,) = upstream.boots("CP-1")
        assert (boot["charge_point_vendor"], boot["charge_point_serial_number"]) == ("Acme", "SN-1")
        (event,) = wait_until(lambda: boots_in_stream(redis_client, "CP-1"), 5, "the boot event")
        assert (event["status"], event["reason"], event["serial"]) == ("Accepted", "", "SN-1")
        # What the station sent reached the upstream unchanged, and the other way round.
        assert upstream.received_frames("CP-1")[0][2] == "BootNotification"
        reply = send_command(redis_client, "CP-1", call.GetConfiguration(key=["X"]), timeout=5)
        assert reply.outcome is Outcome.RESULT and reply.boot["serial"] == "SN-1"
        last_link = health(base)["upstream_last_link"]
        assert (last_link["ok"], last_link["error"]) == (True, "")


def test_a_pending_upstream_answer_is_what_the_station_gets_and_commands_wait(
    proxy, upstream, redis_client
):
    base = proxy("--open")
    upstream.set_boot_status("CP-P", "Pending")

    async def scenario():
        async with station_on(base, "CP-P") as station:
            assert station.boot_result.status == "Pending"
            reply = await asyncio.to_thread(
                send_command, redis_client, "CP-P", call.GetConfiguration(), timeout=5
            )
            assert reply.outcome is Outcome.REJECTED and not reply.sent

    asyncio.run(scenario())
    (event,) = wait_until(lambda: boots_in_stream(redis_client, "CP-P"), 5, "the boot event")
    assert (event["status"], event["reason"]) == ("Pending", "upstream CSMS answered Pending")


def test_a_command_during_a_re_boot_waits_for_the_upstreams_answer_and_goes(
    proxy, upstream, redis_client
):
    base = proxy("--open")

    async def scenario():
        async with raw_station(base, "CP-RB") as station:
            assert (await station.call("b1", "BootNotification", BOOT))[2]["status"] == "Accepted"
            # A re-boot (as after the upstream's TriggerMessage) the upstream answers late.
            upstream.set_boot_delay("CP-RB", 1.5)
            await station.ws.send(json.dumps([2, "b2", "BootNotification", BOOT]))
            await asyncio.to_thread(upstream.wait_boots, "CP-RB", 2, 5)  # forwarded, unanswered
            ours = asyncio.create_task(
                asyncio.to_thread(
                    send_command, redis_client, "CP-RB", call.GetConfiguration(), timeout=10
                )
            )
            answer = await station.next(10)
            assert answer[:2] == [3, "b2"] and answer[2]["status"] == "Accepted"
            command = await station.next(10)  # after the boot's answer, never before it
            assert command[0] == 2 and command[1].startswith("csmsm-")
            await station.answer(command[1], {"configurationKey": []})
            return await ours

    reply = asyncio.run(scenario())
    assert reply.outcome is Outcome.RESULT and reply.sent


def test_a_boot_the_upstream_answers_with_a_callerror_leaves_the_station_not_accepted(
    proxy, upstream, redis_client
):
    base = proxy("--open")
    upstream.set_boot_error("CP-E", "database down")

    async def scenario():
        async with raw_station(base, "CP-E") as station:
            answer = await station.call("b1", "BootNotification", BOOT)
            assert answer[:3] == [4, "b1", "InternalError"]  # passed on unchanged
            return await asyncio.to_thread(
                send_command, redis_client, "CP-E", call.GetConfiguration(), timeout=5
            )

    reply = asyncio.run(scenario())
    assert reply.outcome is Outcome.REJECTED and not reply.sent
    (event,) = wait_until(lambda: boots_in_stream(redis_client, "CP-E"), 5, "the boot event")
    assert event["status"] == "Pending" and "CALLERROR" in event["reason"]


def test_an_upstream_rejection_closes_the_station_1008_and_holds_it_off(
    start_gateway, redis_client
):
    with UpstreamCsms.start(reject={"CP-R"}) as upstream:
        base = start_gateway("csms-1", "--open", "--upstream", upstream.url)

        async def scenario():
            async with raw_station(base, "CP-R") as station:
                answer = await station.call("b1", "BootNotification", BOOT)
                assert answer[0] == 3 and answer[2]["status"] == "Rejected"
                assert await station.close_code() == 1008
            with pytest.raises(InvalidStatus) as refused:
                async with raw_station(base, "CP-R"):
                    pass
            assert refused.value.response.status_code == 403

        asyncio.run(scenario())
        assert len(upstream.boots("CP-R")) == 1 and len(upstream.links("CP-R")) == 1
    (event,) = wait_until(lambda: boots_in_stream(redis_client, "CP-R"), 5, "the boot event")
    assert (event["status"], event["reason"]) == ("Rejected", "upstream CSMS answered Rejected")


# --- the call slot: the upstream's CALLs and ours, each with its own answers ---------------


def test_upstream_calls_and_injected_commands_run_together_each_getting_its_own_answers(
    proxy, upstream, redis_client
):
    base = proxy("--open")
    spec = StationSpec("CP-1", url=base, url2="ws://csms-2.example.com/ocpp")
    with Fleet([spec], timing=FAST) as fleet:
        wait_until(lambda: fleet["CP-1"].online, 10, "the station online")
        upstream.wait_connected("CP-1", 5)

        def ours(n: int):
            key = "NetworkConnectionProfile2" if n % 2 else "HeartbeatInterval"
            return key, send_command(
                redis_client, "CP-1", call.GetConfiguration(key=[key]), timeout=10
            )

        def theirs(n: int):
            if n == 0:
                return "remote", upstream.call("CP-1", call.RemoteStartTransaction(id_tag="T1"))
            if n == 1:
                trigger = call.TriggerMessage(requested_message=MessageTrigger.status_notification)
                return "trigger", upstream.call("CP-1", trigger)
            return "config", upstream.call("CP-1", call.GetConfiguration(key=["ConnectorType"]))

        with ThreadPoolExecutor(max_workers=12) as pool:
            mine = [pool.submit(ours, n) for n in range(6)]
            upstreams = [pool.submit(theirs, n) for n in range(5)]
            mine_done = [future.result(20) for future in mine]
            upstream_done = [future.result(20) for future in upstreams]
        for key, reply in mine_done:
            assert reply.outcome is Outcome.RESULT, reply
            (entry,) = reply.payload["configuration_key"]
            assert entry["key"] == key and entry["value"] == fleet["CP-1"].config[key]
        answers = dict(upstream_done[:2])
        assert answers["remote"].status == "Accepted" and answers["trigger"].status == "Accepted"
        for kind, answer in upstream_done[2:]:
            assert kind == "config" and answer.unknown_key == ["ConnectorType"]
        # The station's own CALLs that followed reached the upstream too.
        wait_until(
            lambda: any(
                f[0] == 2 and f[2] == "StartTransaction" for f in upstream.received_frames("CP-1")
            ),
            5,
            "the StartTransaction at the upstream",
        )
    received = upstream.received("CP-1")
    assert not any("csmsm-" in raw for raw in received)
    assert not any("NetworkConnectionProfile2" in raw for raw in received)
    assert not any("HeartbeatInterval" in raw for raw in received)
    # Every frame the upstream sent got exactly one answer.
    asked = [json.loads(raw)[1] for raw in upstream.sent("CP-1") if json.loads(raw)[0] == 2]
    answered = [f[1] for f in upstream.received_frames("CP-1") if f[0] in (3, 4)]
    assert sorted(asked) == sorted(answered)


def test_injected_wire_ids_fit_ocpp_j_and_their_answers_stay_with_the_bridge(
    proxy, upstream, redis_client
):
    base = proxy("--open")

    async def scenario():
        async with raw_station(base, "CP-W") as station:
            assert (await station.call("b1", "BootNotification", BOOT))[2]["status"] == "Accepted"

            async def answer_three():
                ids = []
                for _ in range(3):
                    frame = await station.next()
                    assert frame[0] == 2 and frame[2] == "GetConfiguration"
                    ids.append(frame[1])
                    await station.answer(frame[1], {"configurationKey": [], "unknownKey": ["K"]})
                return ids

            answering = asyncio.create_task(answer_three())
            replies = await asyncio.gather(
                *(
                    asyncio.to_thread(
                        send_command,
                        redis_client,
                        "CP-W",
                        call.GetConfiguration(key=["K"]),
                        timeout=5,
                    )
                    for _ in range(3)
                )
            )
            ids = await answering
            return ids, replies

    ids, replies = asyncio.run(scenario())
    assert all(reply.outcome is Outcome.RESULT for reply in replies)
    assert {reply.command_id for reply in replies}.isdisjoint(ids)  # wire ids are the gateway's
    assert len(set(ids)) == 3, ids  # distinct
    for wire_id in ids:  # "csmsm-" + 30 lowercase hex: 36 characters, OCPP-J's limit
        assert re.fullmatch(r"csmsm-[0-9a-f]{30}", wire_id) and len(wire_id) == 36, wire_id
    assert not any(i in raw for raw in upstream.received("CP-W") for i in ids)


def test_frames_whose_message_id_is_not_a_string_are_never_relayed(proxy, upstream, redis_client):
    base = proxy("--open")

    async def scenario():
        async with raw_station(base, "CP-N") as station:
            # A boot with a numeric id: relayed, it would pass the gateway's admission unseen.
            refused = await station.call(7, "BootNotification", BOOT)
            assert refused[:3] == [4, 7, "FormationViolation"]
            await station.answer(9, {})  # an answer to nothing: dropped
            assert (await station.call("b1", "BootNotification", BOOT))[2]["status"] == "Accepted"
            # The upstream's CALL with a numeric id would skip the call slot and its deadline.
            await asyncio.to_thread(
                upstream.send_raw, "CP-N", json.dumps([2, 42, "GetConfiguration", {}])
            )
            errors = await asyncio.to_thread(
                wait_until,
                lambda: [f for f in upstream.received_frames("CP-N") if f[0] == 4],
                5,
                "the gateway's CALLERROR to the upstream",
            )
            assert errors[0][:3] == [4, 42, "FormationViolation"]
            # The slot stayed free: a command goes through at once.
            ours = asyncio.create_task(
                asyncio.to_thread(
                    send_command, redis_client, "CP-N", call.GetConfiguration(), timeout=5
                )
            )
            command = await station.next()
            assert command[0] == 2 and command[1].startswith("csmsm-")
            await station.answer(command[1], {"configurationKey": []})
            return await ours, station.seen

    reply, seen = asyncio.run(scenario())
    assert reply.outcome is Outcome.RESULT
    assert not any(frame[1] == 42 for frame in seen)  # never delivered to the station
    assert [f[1] for f in upstream.received_frames("CP-N")] == ["b1", 42]
    assert len(upstream.boots("CP-N")) == 1


def test_an_upstream_call_behind_a_slow_command_is_errored_and_never_delivered(
    proxy, upstream, redis_client
):
    base = proxy("--open", "--upstream-call-timeout", "1")

    async def scenario():
        async with raw_station(base, "CP-S") as station:
            await station.call("b1", "BootNotification", BOOT)
            ours = asyncio.create_task(
                asyncio.to_thread(
                    send_command, redis_client, "CP-S", call.GetConfiguration(), timeout=10
                )
            )
            slow = await station.next()
            assert slow[1].startswith("csmsm-")
            # Ours holds the slot; the upstream's CALL waits for it past its deadline.
            with pytest.raises(GenericError) as errored:
                await asyncio.to_thread(upstream.call, "CP-S", call.GetConfiguration(key=["X"]), 5)
            assert "not delivered" in errored.value.description
            await station.answer(slow[1], {"configurationKey": []})
            assert (await ours).outcome is Outcome.RESULT
            # A second command after it: the errored CALL would have come before it.
            follow = asyncio.create_task(
                asyncio.to_thread(
                    send_command, redis_client, "CP-S", call.GetConfiguration(), timeout=5
                )
            )
            frame = await station.next()
            assert frame[1].startswith("csmsm-")
            await station.answer(frame[1], {"configurationKey": []})
            assert (await follow).outcome is Outcome.RESULT
            return station.seen

    seen = asyncio.run(scenario())
    upstream_calls = [json.loads(raw)[1] for raw in upstream.sent("CP-S") if raw.startswith("[2")]
    assert upstream_calls and not any(frame[1] in upstream_calls for frame in seen)


def test_a_station_that_never_answers_the_upstream_gets_it_errored_and_its_late_answer_dropped(
    proxy, upstream
):
    base = proxy("--open", "--upstream-call-timeout", "1")

    async def scenario():
        async with raw_station(base, "CP-L") as station:
            await station.call("b1", "BootNotification", BOOT)
            asking = asyncio.create_task(
                asyncio.to_thread(upstream.call, "CP-L", call.GetConfiguration(key=["X"]), 5)
            )
            theirs = await station.next()
            assert theirs[0] == 2 and not theirs[1].startswith("csmsm-")
            with pytest.raises(GenericError) as errored:
                await asyncio.wait_for(asyncio.shield(asking), 10)
            assert "did not answer within 1s" in errored.value.description
            await station.answer(theirs[1], {"configurationKey": []})  # too late
            # A CALL after the late answer: had that been relayed, it would be there first.
            await station.call("h1", "Heartbeat", {})
            return theirs[1]

    late_id = asyncio.run(scenario())
    frames = upstream.received_frames("CP-L")
    assert [f[1] for f in frames] == ["b1", late_id, "h1"]
    assert frames[1][0] == 4  # the gateway's CALLERROR, and not the late CALLRESULT after it


def test_upstream_calls_waiting_for_the_station_are_bounded_and_each_answered_once(proxy, upstream):
    base = proxy("--open", "--upstream-call-timeout", "2")

    async def scenario():
        async with raw_station(base, "CP-B") as station:
            await station.call("b1", "BootNotification", BOOT)
            for n in range(12):  # a CSMS ignoring OCPP-J's one outstanding CALL
                frame = json.dumps([2, f"u{n}", "GetConfiguration", {}])
                await asyncio.to_thread(upstream.send_raw, "CP-B", frame)
            errors = await asyncio.to_thread(
                wait_until,
                lambda: (
                    (e := [f for f in upstream.received_frames("CP-B") if f[0] == 4])
                    and len(e) >= 12
                    and e
                ),
                10,
                "a CALLERROR for each of the upstream's CALLs",
            )
            return errors, [frame for frame in station.seen if frame[0] == 2]

    errors, delivered = asyncio.run(scenario())
    assert sorted(f[1] for f in errors) == sorted(f"u{n}" for n in range(12))
    assert len(errors) == 12  # each exactly once
    refused = [f for f in errors if "already under way" in f[3]]
    assert len(refused) == 12 - 8  # one outstanding and seven in line: the rest at once
    # Each CALL's error says what happened to it: delivered ones went unanswered, the others
    # waited past their deadline and never reached the station.
    reached = {f[1] for f in delivered}
    assert "u0" in reached
    for frame in errors:
        expected = "did not answer" if frame[1] in reached else "not delivered"
        assert expected in frame[3], frame


# --- events the idle check needs ----------------------------------------------------------


def test_start_and_stop_transaction_report_the_connector_charging_then_finishing(
    proxy, upstream, redis_client
):
    base = proxy("--open")

    async def scenario():
        async with raw_station(base, "CP-T") as station:
            await station.call("b1", "BootNotification", BOOT)
            start = {
                "connectorId": 2,
                "idTag": "T1",
                "meterStart": 0,
                "timestamp": "2026-01-01T00:00:00Z",
            }
            started = await station.call("s1", "StartTransaction", start)
            transaction = started[2]["transactionId"]
            stop = {
                "transactionId": transaction,
                "meterStop": 10,
                "timestamp": "2026-01-01T01:00:00Z",
            }
            assert (await station.call("s2", "StopTransaction", stop))[0] == 3

    asyncio.run(scenario())
    statuses = events_of(redis_client, EventKind.STATUS, 2)
    assert [(e.data["connector_id"], e.data["status"]) for e in statuses] == [
        (2, "Charging"),
        (2, "Finishing"),
    ]
    assert [f[2] for f in upstream.received_frames("CP-T")] == [
        "BootNotification",
        "StartTransaction",
        "StopTransaction",
    ]


# --- failure semantics ----------------------------------------------------------------------


def test_an_unreachable_upstream_refuses_the_station_with_502(start_gateway):
    nowhere = f"ws://127.0.0.1:{free_port()}/ocpp"
    base = start_gateway("csms-1", "--open", "--upstream", nowhere)
    with socket.socket() as silent:  # accepts TCP, never answers the upgrade
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        mute = f"ws://127.0.0.1:{silent.getsockname()[1]}/ocpp"
        slow = start_gateway(
            "csms-2", "--open", "--upstream", mute, "--upstream-connect-timeout", "0.5"
        )

        async def attempt(url: str) -> tuple[int, bytes | bytearray]:
            with pytest.raises(InvalidStatus) as refused:
                async with raw_station(url, "CP-1"):
                    pass
            return refused.value.response.status_code, refused.value.response.body

        assert health(base)["upstream_last_link"] is None  # no station tried yet
        # The station learns nothing of why (an OS error, the upstream's address).
        assert asyncio.run(attempt(base)) == (502, b"Upstream CSMS unavailable.\n")
        assert asyncio.run(attempt(slow)) == (502, b"Upstream CSMS unavailable.\n")
        # A monitor does: the gateway is up, its stations cannot get through.
        unreachable = health(base)["upstream_last_link"]
        timed_out = health(slow)["upstream_last_link"]
        assert (unreachable["ok"], unreachable["error"]) == (False, "upstream unreachable")
        assert (timed_out["ok"], timed_out["error"]) == (False, "upstream not reached within 0.5s")


def test_upstream_closing_closes_the_station_1012_and_a_station_closing_closes_the_link(
    proxy, upstream
):
    base = proxy("--open")

    async def scenario():
        async with raw_station(base, "CP-C") as station:
            await station.call("b1", "BootNotification", BOOT)
            await asyncio.to_thread(upstream.close, "CP-C", 1001, "restarting")
            assert await station.close_code() == 1012
        async with raw_station(base, "CP-C") as station:
            await station.call("b2", "BootNotification", BOOT)
            await station.ws.close()
        link = upstream.links("CP-C")[-1]
        assert await asyncio.to_thread(link.closed.wait, 5)
        return link.close_code

    assert asyncio.run(scenario()) == 1000
    assert len(upstream.links("CP-C")) == 2


def _upgrade_request(identity: str) -> bytes:
    return (
        f"GET /ocpp/{identity} HTTP/1.1\r\nHost: gateway\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: ocpp1.6\r\n\r\n"
    ).encode()


def test_a_station_gone_while_its_link_opens_has_that_link_closed_at_once(proxy, upstream):
    base = proxy("--open")
    port = int(base.rsplit(":", 1)[1].split("/")[0])
    for n in range(3):  # a client dropping in a loop leaves no link behind
        identity = f"CP-GONE-{n}"
        upstream.set_handshake_delay(identity, 1.0)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
            client.sendall(_upgrade_request(identity))
            # Gone before the upstream answers: the gateway is still opening the link.
        link = wait_until(lambda i=identity: upstream.links(i), 10, f"{identity}'s upstream link")[
            0
        ]
        assert link.closed.wait(5), "the link outlived its station"
        assert (link.close_code, link.close_reason) == (1001, "station left during the handshake")
        assert upstream.received(identity) == []


def test_shutdown_closes_every_upstream_link_with_1001_handshakes_under_way_included(
    upstream, redis_url, tmp_path
):
    import signal

    from devstack.processes import port_open, python, running

    port = free_port()
    upstream.set_handshake_delay("CP-SLOW", 2.0)
    args = python("-m", "ocpp_gateway", "--csms", "csms-1", "--port", str(port), "--open",
                  "--upstream", upstream.url)  # fmt: skip
    log = tmp_path / "gateway.log"
    with running(args, env={"REDIS_URL": redis_url}, log=log) as gateway:
        wait_until(lambda: port_open(port), 15, "the gateway to listen")
        base = f"ws://127.0.0.1:{port}/ocpp"

        async def scenario():
            async with raw_station(base, "CP-1") as station:
                await station.call("b1", "BootNotification", BOOT)
                slow = asyncio.create_task(raw_station(base, "CP-SLOW").__aenter__())
                # SIGTERM while CP-SLOW's handshake waits for its upstream link to open.
                await asyncio.to_thread(
                    wait_until, lambda: upstream.handshakes("CP-SLOW"), 5, "CP-SLOW's link opening"
                )
                gateway.send_signal(signal.SIGTERM)
                with pytest.raises(InvalidStatus) as refused:
                    await asyncio.wait_for(slow, 10)
                return await station.close_code(10), refused.value.response.status_code

        assert asyncio.run(scenario()) == (1001, 503)
        assert gateway.wait(15) == 0
    for identity in ("CP-1", "CP-SLOW"):
        (link,) = upstream.links(identity)
        assert link.closed.wait(5), f"{identity}'s upstream link left open"
        assert link.close_code == 1001, (identity, link.close_code, link.close_reason)


# --- admission, credentials and the allow-list in front of the upstream ----------------------


def test_admission_applies_in_front_of_the_upstream(proxy, upstream, redis_client):
    publish_registry(redis_client, "csms-1", {"CP-OK": "SN-OK"})
    base = proxy("--registry-refresh", "0.2")

    async def scenario():
        with pytest.raises(InvalidStatus) as refused:
            async with raw_station(base, "CP-UNKNOWN"):
                pass
        assert refused.value.response.status_code == 403
        async with raw_station(base, "CP-OK") as station:
            other = {**BOOT, "chargePointSerialNumber": "SN-OTHER"}
            answer = await station.call("b1", "BootNotification", other)
            assert answer[2]["status"] == "Rejected"
            assert await station.close_code() == 1008
        with pytest.raises(InvalidStatus) as held:  # held off after the Rejected boot
            async with raw_station(base, "CP-OK"):
                pass
        assert held.value.response.status_code == 403

    asyncio.run(scenario())
    assert upstream.links("CP-UNKNOWN") == []
    assert upstream.boots("CP-OK") == [] and upstream.received("CP-OK") == []
    (event,) = boots_in_stream(redis_client, "CP-OK")
    assert event["status"] == "Rejected"
    security = events_of(redis_client, EventKind.SECURITY, 1)
    assert security[0].data["serial"] == "SN-OTHER"


def test_credentials_for_the_upstream_come_from_the_file_or_the_station(start_gateway, tmp_path):
    auth = tmp_path / "upstream-passwords"
    auth.write_text("CP-F:from-file\n")
    passwords = {"CP-F": "from-file", "CP-H": "own-key"}
    with UpstreamCsms.start(passwords=passwords) as upstream:
        base = start_gateway(
            "csms-1", "--open", "--upstream", upstream.url, "--upstream-auth-file", str(auth)
        )

        async def scenario():
            async with raw_station(base, "CP-F") as station:
                assert (await station.call("b1", "BootNotification", BOOT))[2][
                    "status"
                ] == "Accepted"
            own = {"Authorization": _basic("CP-H", "own-key")}
            async with raw_station(base, "CP-H", additional_headers=own) as station:
                assert (await station.call("b1", "BootNotification", BOOT))[2][
                    "status"
                ] == "Accepted"
            with pytest.raises(InvalidStatus) as refused:
                wrong = {"Authorization": _basic("CP-H", "wrong")}
                async with raw_station(base, "CP-H", additional_headers=wrong):
                    pass
            return refused.value.response.status_code

        assert asyncio.run(scenario()) == 401  # the upstream's refusal, passed on
        assert upstream.links("CP-F")[0].headers["Authorization"] == _basic("CP-F", "from-file")
        assert upstream.links("CP-H")[0].headers["Authorization"] == _basic("CP-H", "own-key")


def test_the_upstream_gets_one_authorization_the_file_else_the_station_s_own(
    start_gateway, tmp_path
):
    auth = tmp_path / "upstream-passwords"
    auth.write_text("CP-F:from-file\n")
    with UpstreamCsms.start() as upstream:
        base = start_gateway(
            "csms-1", "--open", "--upstream", upstream.url, "--upstream-auth-file", str(auth)
        )
        assert health(base)["upstream"] == upstream.url

        async def scenario():
            # CP-F has an entry in the file and sends its own header too: the file wins.
            sent = {"CP-F": _basic("CP-F", "own-key"), "CP-H": _basic("CP-H", "own-key")}
            for identity in ("CP-F", "CP-H", "CP-U"):
                own = {"Authorization": sent[identity]} if identity in sent else {}
                async with raw_station(base, identity, additional_headers=own) as station:
                    await station.call("b1", "BootNotification", BOOT)

        asyncio.run(scenario())
        links = {identity: upstream.links(identity)[0] for identity in ("CP-F", "CP-H", "CP-U")}
    # One header at most each: the file's, else the station's own; none was invented.
    assert links["CP-F"].authorizations == [_basic("CP-F", "from-file")]
    assert links["CP-H"].authorizations == [_basic("CP-H", "own-key")]
    assert links["CP-U"].authorizations == []
    assert all(link.path.startswith("/ocpp/CP-") for link in links.values())


def test_the_upstream_link_ignores_a_proxy_set_in_the_environment(upstream, redis_url, tmp_path):
    from devstack.processes import port_open, python, running

    port = free_port()
    nowhere = f"http://127.0.0.1:{free_port()}"  # a proxy that is not there
    env = {"REDIS_URL": redis_url, "no_proxy": "", "NO_PROXY": ""}
    for name in ("http_proxy", "https_proxy", "all_proxy"):
        env[name] = env[name.upper()] = nowhere
    args = python("-m", "ocpp_gateway", "--csms", "csms-1", "--port", str(port), "--open",
                  "--upstream", upstream.url)  # fmt: skip
    with running(args, env=env, log=tmp_path / "gateway.log"):
        wait_until(lambda: port_open(port), 15, "the gateway to listen")

        async def scenario():
            async with raw_station(f"ws://127.0.0.1:{port}/ocpp", "CP-X") as station:
                return await station.call("b1", "BootNotification", BOOT)

        assert asyncio.run(scenario())[2]["status"] == "Accepted"
    assert len(upstream.boots("CP-X")) == 1


def test_credentials_stay_out_of_the_log_at_debug(start_gateway, upstream, tmp_path):
    auth = tmp_path / "upstream-passwords"
    auth.write_text("CP-2:file-secret\n")
    base = start_gateway(
        "csms-1", "--open", "--log-level", "DEBUG", "--upstream", upstream.url,
        "--upstream-auth-file", str(auth),
    )  # fmt: skip
    own = _basic("CP-1", "station-secret")

    async def scenario():
        async with raw_station(base, "CP-1", additional_headers={"Authorization": own}) as st:
            await st.call("b1", "BootNotification", BOOT)
        async with raw_station(base, "CP-2") as st:
            await st.call("b1", "BootNotification", BOOT)

    asyncio.run(scenario())
    assert upstream.links("CP-1")[0].authorizations == [own]
    from_file = _basic("CP-2", "file-secret")
    assert upstream.links("CP-2")[0].authorizations == [from_file]
    log = (tmp_path / "gateway-csms-1.log").read_text()
    assert " DEBUG " in log  # the level took: other libraries' DEBUG lines are there
    for secret in ("file-secret", own.split()[1], from_file.split()[1]):
        assert secret not in log
    assert "authorization" not in log.lower()


def test_the_allow_list_applies_to_injected_commands(proxy, upstream, redis_client):
    base = proxy("--open")
    with Fleet([StationSpec("CP-A", url=base)], timing=FAST) as fleet:
        wait_until(lambda: fleet["CP-A"].online, 10, "the station online")
        reply = send_command(redis_client, "CP-A", call.UnlockConnector(connector_id=1), timeout=5)
        assert reply.outcome is Outcome.REJECTED and not reply.sent
        assert "not allowed" in reply.error_description
        # The upstream is not bound by it: its own UnlockConnector goes through.
        assert upstream.call("CP-A", call.UnlockConnector(connector_id=1)).status
    assert not any("csmsm-" in raw for raw in upstream.received("CP-A"))


def test_a_command_outstanding_when_the_station_leaves_is_disconnected_not_timed_out(
    proxy, upstream, redis_client
):
    base = proxy("--open")

    async def scenario():
        async with raw_station(base, "CP-D") as station:
            await station.call("b1", "BootNotification", BOOT)
            ours = asyncio.create_task(
                asyncio.to_thread(
                    send_command, redis_client, "CP-D", call.GetConfiguration(), timeout=20
                )
            )
            assert (await station.next())[1].startswith("csmsm-")
            await station.ws.close()
            return await asyncio.wait_for(ours, 10)

    reply = asyncio.run(scenario())
    assert reply.outcome is Outcome.DISCONNECTED and reply.sent


def test_a_station_taking_over_its_identity_gets_a_new_link_and_the_old_one_is_closed(
    proxy, upstream, tmp_path
):
    auth = tmp_path / "passwords"
    auth.write_text("CP-2X:station-key\n")
    base = proxy("--open", "--auth-file", str(auth))
    credentials = {"Authorization": _basic("CP-2X", "station-key")}

    async def scenario():
        async with raw_station(base, "CP-2X", additional_headers=credentials) as first:
            await first.call("b1", "BootNotification", BOOT)
            # With its password a new connection replaces the live one at once.
            async with raw_station(base, "CP-2X", additional_headers=credentials) as second:
                assert await first.close_code() == 1000
                await second.call("b2", "BootNotification", BOOT)
                links = upstream.links("CP-2X")
                assert len(links) == 2 and not links[1].closed.is_set()
                assert await asyncio.to_thread(links[0].closed.wait, 5)
                # The station's password was passed on to the upstream (no --upstream-auth-file).
                assert links[1].headers["Authorization"] == credentials["Authorization"]

    asyncio.run(scenario())
    assert [boot["charge_point_vendor"] for boot in upstream.boots("CP-2X")] == ["RawVendor"] * 2


# --- wss:// upstream ----------------------------------------------------------------------------


def _certificates(directory):
    """A CA and a server certificate for 127.0.0.1 signed by it (PEM files)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test upstream CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_file, cert_file, key_file = directory / "ca.pem", directory / "up.pem", directory / "up.key"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return ca_file, cert_file, key_file


def test_a_wss_upstream_is_trusted_through_upstream_ca_and_refused_without_it(
    start_gateway, tmp_path
):
    import ssl

    ca_file, cert_file, key_file = _certificates(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    with UpstreamCsms.start(ssl_context=context) as upstream:
        assert upstream.url.startswith("wss://")
        trusted = start_gateway(
            "csms-1", "--open", "--upstream", upstream.url, "--upstream-ca", str(ca_file)
        )
        untrusted = start_gateway("csms-2", "--open", "--upstream", upstream.url)

        async def scenario():
            async with raw_station(trusted, "CP-TLS") as station:
                answer = await station.call("b1", "BootNotification", BOOT)
                assert answer[2]["status"] == "Accepted"
            with pytest.raises(InvalidStatus) as refused:
                async with raw_station(untrusted, "CP-TLS"):
                    pass
            assert refused.value.response.status_code == 502

        asyncio.run(scenario())
        assert len(upstream.boots("CP-TLS")) == 1


def test_the_command_line_takes_the_proxy_flags():
    from ocpp_gateway.__main__ import parse_args

    config = parse_args(["--csms", "c", "--upstream", "wss://csms.example.com/ocpp"])
    assert config.upstream is not None
    assert (config.upstream.connect_timeout, config.upstream.call_timeout) == (5, 30)
    assert parse_args(["--csms", "c"]).upstream is None
    # Another port, or another host, of the same machine is not a loop.
    for argv in (
        ["--upstream", "ws://127.0.0.1:9001/ocpp"],
        ["--upstream", "ws://csms.example.com:9000/ocpp", "--host", "0.0.0.0"],
        ["--upstream", "ws://127.0.0.1:9000/ocpp", "--host", "10.0.0.5"],
    ):
        assert parse_args(["--csms", "c", *argv]).upstream is not None


UP = "ws://csms.example.com/ocpp"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--upstream", "http://csms.example.com/ocpp"], "is not a ws:// or wss:// URL"),
        (["--upstream", UP, "--upstream-ca", "{tmp}/ca.pem"], "--upstream-ca needs a wss://"),
        (["--upstream", "wss://h.example.com/x", "--upstream-ca", "{tmp}/ca.pem"], "not a file"),
        (["--upstream-auth-file", "{tmp}/passwords"], "and --upstream-ca need --upstream"),
        (["--upstream", UP, "--upstream-auth-file", "{tmp}/missing"], "No such file"),
        (["--upstream", UP, "--upstream-call-timeout", "0"], "must be > 0"),
        (["--upstream", UP, "--upstream-connect-timeout", "-1"], "must be > 0"),
        (["--upstream", "ws://h.example.com:99999/x"], "Port out of range"),
        (["--upstream", "ws://u:secret@h.example.com:99999/x"], "Port out of range"),
        (["--upstream", "ws://u:secret@[::1/x"], "cannot be parsed"),
        (["--upstream", "ws://h.example.com:0/x"], "has port 0"),
        (["--upstream", "ws://user@h.example.com/x"], "has credentials"),
        (["--upstream", "ws://u:secret@h.example.com/x"], "has credentials"),
        (["--upstream", "ws://a b/x"], "contains whitespace"),
        (["--upstream", "ws://h.example.com/x\n"], "contains whitespace"),
        (["--upstream", "ws://h.example.com/x?token=1"], "has a query or fragment"),
        (["--upstream", "ws://h.example.com/x#f"], "has a query or fragment"),
        # The gateway itself (default --host 127.0.0.1 --port 9000): each link would loop.
        (["--upstream", "ws://127.0.0.1:9000/ocpp"], "is this gateway itself"),
        (["--upstream", "ws://localhost:9000/ocpp"], "is this gateway itself"),
        (
            ["--upstream", "ws://h.example.com/x", "--host", "h.example.com", "--port", "80"],
            "is this gateway itself",
        ),
        (
            ["--upstream", "wss://localhost/x", "--host", "0.0.0.0", "--port", "443"],
            "is this gateway itself",
        ),
        (["--upstream", "ws://[::1]:9000/x", "--host", "::"], "is this gateway itself"),
    ],
)
def test_the_command_line_refuses_bad_proxy_flags(argv, message, tmp_path, capsys):
    from ocpp_gateway.__main__ import parse_args

    (tmp_path / "passwords").write_text("CP-1:x\n")
    with pytest.raises(SystemExit):
        parse_args(["--csms", "c", *(arg.format(tmp=tmp_path) for arg in argv)])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in error
    assert "secret" not in error  # an upstream password is never shown


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("wss://user:pass@real.example.com/ocpp", "wss://real.example.com/ocpp"),
        ("ws://u:p@ss@h.example.com/ocpp?q=a@b", "ws://h.example.com/ocpp?q=a@b"),
        ("ws://u:p@h.example.com:99999/x", "ws://h.example.com:99999/x"),  # port out of range
        ("ws://u:p@[::1/x", "ws://[::1/x"),  # urlsplit() raises on this one
        ("ws://h.example.com/a@b", "ws://h.example.com/a@b"),  # an @ in the path stays
        ("", ""),
    ],
)
def test_an_upstream_url_is_shown_without_its_credentials(url, shown):
    from ocpp_gateway.upstream import url_without_credentials

    assert url_without_credentials(url) == shown
