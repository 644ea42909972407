"""Admission: only registered stations, from the same hardware, never evicted by an impostor.

Real gateway processes on a real Redis; the registry is written to Redis the way the Django
side publishes it (tests/ocpp_gateway/registry.py).
"""

from __future__ import annotations

import asyncio
import base64
import time

import pytest
import redis
from ocpp.v16 import call
from websockets.exceptions import InvalidStatus

from devstack.processes import free_port, redis_pings, redis_server, wait_until
from ocpp_gateway.client import send_command
from ocpp_gateway.envelopes import EventKind, Outcome, command_channel
from ocpp_gateway.simulator import Fleet, StationSpec, Timing
from tests.ocpp_gateway.registry import events_of, publish_registry, stream_events
from tests.ocpp_gateway.stations import station_on
from tests.ocpp_gateway.test_gateway import health

FAST = Timing(reboot_delay=0.3, retry_interval=0.2, reconnect_delay=0.3)


def _basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def _refusal(base: str, identity: str, **kwargs) -> InvalidStatus:
    async def attempt():
        async with station_on(base, identity, **kwargs):
            pass

    with pytest.raises(InvalidStatus) as refused:
        asyncio.run(attempt())
    return refused.value


def _boot(base: str, identity: str, **kwargs) -> tuple[str, int]:
    async def attempt():
        async with station_on(base, identity, **kwargs) as station:
            return station.boot_result.status, station.boot_result.interval

    return asyncio.run(attempt())


def test_an_unregistered_station_is_refused_and_falls_back_to_its_other_profile(
    start_gateway, redis_client, tmp_path
):
    publish_registry(redis_client, "csms-2", {"CP-OTHER": ""})
    target = start_gateway("csms-2")
    source = start_gateway("csms-1", "--open")
    refused = _refusal(target, "CP-X")
    assert refused.response.status_code == 403
    assert refused.response.body == b"Station CP-X is not registered on CSMS csms-2.\n"
    assert (
        "refused CP-X: not registered on CSMS csms-2"
        in (tmp_path / "gateway-csms-2.log").read_text()
    )

    spec = StationSpec("CP-X", url=target, url2=source, profile_timeout=1)
    with Fleet([spec], timing=FAST) as fleet:
        wait_until(
            lambda: fleet["CP-X"].online and fleet["CP-X"].connected_url == source,
            10,
            "the station on its other profile (the source)",
        )
        assert fleet["CP-X"].events("fell_back")
        assert not fleet["CP-X"].events("boot_not_accepted")


def test_a_station_rejected_for_its_serial_falls_back_to_its_other_profile(
    start_gateway, redis_client
):
    publish_registry(redis_client, "csms-2", {"CP-1": "SN-REAL"})
    target = start_gateway("csms-2")
    source = start_gateway("csms-1", "--open")
    spec = StationSpec("CP-1", url=target, url2=source, serial_number="SN-OTHER", profile_timeout=1)
    with Fleet([spec], timing=FAST) as fleet:
        station = fleet["CP-1"]
        wait_until(
            lambda: station.online and station.connected_url == source,
            15,
            "the rejected station back on its other profile (the source)",
        )
        # Closed by the target right after the Rejected answer (the station may not get to
        # record the answer itself before the socket goes).
        closed = [e for e in station.events("disconnected") if e["url"] == target]
        assert [(e["code"], e["reason"]) for e in closed] == [
            (1008, "boot rejected: BootNotification from other hardware")
        ]
        assert {e["url"] for e in station.events("boot_accepted")} == {source}
        assert station.events("fell_back")[-1]["to_url"] == source


def test_a_registered_station_is_admitted_and_a_new_one_at_once(start_gateway, redis_client):
    """A migration resets a station moments after registering it: the gateway must not
    refuse it on a copy one poll behind (here the poll is a minute away)."""
    publish_registry(redis_client, "csms-2", {"CP1": ""})
    base = start_gateway("csms-2", "--registry-refresh", "60")
    assert _boot(base, "CP1") == ("Accepted", 300)
    assert health(base)["admission"] == "registered" and health(base)["registered"] == 1
    assert _refusal(base, "CP2").response.status_code == 403

    publish_registry(redis_client, "csms-2", {"CP1": "", "CP2": ""})
    assert _boot(base, "CP2") == ("Accepted", 300)
    assert health(base)["registered"] == 2


def test_while_the_registry_is_unknown_boots_are_pending_then_accepted(start_gateway, redis_client):
    base = start_gateway("csms-2", "--registry-refresh", "0.5")
    assert health(base)["admission"] == "unknown"

    async def scenario():
        async with station_on(base, "CP1", serial="SN-1") as station:
            assert (station.boot_result.status, station.boot_result.interval) == ("Pending", 5)
            publish_registry(redis_client, "csms-2", {"CP1": "SN-1"})
            await asyncio.to_thread(
                wait_until, lambda: health(base)["admission"] == "registered", 5, "the registry"
            )
            result = await station.call(
                call.BootNotification(
                    charge_point_vendor="TestVendor",
                    charge_point_model="T1",
                    charge_point_serial_number="SN-1",
                )
            )
            assert result.status == "Accepted"

    asyncio.run(scenario())
    boots = events_of(redis_client, EventKind.BOOT, 2)
    assert [b.data["status"] for b in boots] == ["Pending", "Accepted"]
    assert boots[0].data["reason"] == "registry of csms-2 not loaded yet"
    assert boots[1].data["charge_point_serial"] == "SN-1"


def test_a_station_admitted_before_the_registry_but_not_in_it_is_rejected_and_closed(
    start_gateway, redis_client
):
    base = start_gateway("csms-2", "--registry-refresh", "0.5")

    async def scenario():
        async with station_on(base, "CP1") as station:
            assert station.boot_result.status == "Pending"
            publish_registry(redis_client, "csms-2", {"CP2": ""})
            await asyncio.to_thread(
                wait_until, lambda: health(base)["admission"] == "registered", 5, "the registry"
            )
            result = await station.call(
                call.BootNotification(charge_point_vendor="TestVendor", charge_point_model="T1")
            )
            await asyncio.wait_for(station._connection.wait_closed(), 5)
            return result.status, station._connection.close_code

    assert asyncio.run(scenario()) == ("Rejected", 1008)
    boots = events_of(redis_client, EventKind.BOOT, 2)
    assert boots[-1].data["reason"] == "station CP1 is not registered on csms-2"
    assert _refusal(base, "CP1").response.status_code == 403


def test_a_boot_from_other_hardware_is_rejected_reported_closed_and_held_off(
    start_gateway, redis_client
):
    publish_registry(redis_client, "csms-2", {"CP1": "SN-REAL"})
    base = start_gateway("csms-2", "--rejected-hold", "3")

    async def impostor():
        async with station_on(base, "CP1", serial="SN-FAKE") as station:
            status = station.boot_result.status
            await asyncio.wait_for(station._connection.wait_closed(), 5)
            return status, station._connection.close_code, station._connection.close_reason

    status, code, reason = asyncio.run(impostor())
    assert (status, code) == ("Rejected", 1008)
    assert reason == "boot rejected: BootNotification from other hardware"
    security = events_of(redis_client, EventKind.SECURITY, 1)
    assert len(security) == 1
    assert security[0].data == {
        "reason": "BootNotification from other hardware",
        "expected_serial": "SN-REAL",
        "serial": "SN-FAKE",
        "address": "127.0.0.1",
    }
    boot = events_of(redis_client, EventKind.BOOT, 1)[0]
    assert boot.data["status"] == "Rejected" and boot.data["serial"] == "SN-FAKE"

    # Held off, even the real hardware: the station's profile fallback gets its turn.
    refused = _refusal(base, "CP1", serial="SN-REAL")
    assert refused.response.status_code == 403
    assert b"was rejected by CSMS csms-2" in refused.response.body
    time.sleep(3)
    assert _boot(base, "CP1", serial="SN-REAL") == ("Accepted", 300)


def test_a_registry_password_is_required(start_gateway, redis_client):
    publish_registry(redis_client, "csms-2", {"CP1": ""}, passwords={"CP1": "s3cret-key-0001"})
    base = start_gateway("csms-2")
    for headers in [{}, _basic("CP1", "wrong"), _basic("CP2", "s3cret-key-0001")]:
        refused = _refusal(base, "CP1", additional_headers=headers)
        assert refused.response.status_code == 401
    good = _basic("CP1", "s3cret-key-0001")
    assert _boot(base, "CP1", additional_headers=good) == ("Accepted", 300)


def test_an_impostor_without_credentials_cannot_evict_the_station(start_gateway, redis_client):
    publish_registry(redis_client, "csms-2", {"CP1": ""})
    base = start_gateway("csms-2")

    async def scenario():
        async with station_on(base, "CP1"):
            refused = None
            try:
                async with station_on(base, "CP1", boot=False):
                    pass
            except InvalidStatus as exc:
                refused = exc.response
            reply = await asyncio.to_thread(
                send_command, redis_client, "CP1", call.GetConfiguration(key=["x"]), timeout=5
            )
            return refused, reply

    refused, reply = asyncio.run(scenario())
    assert refused.status_code == 409
    assert refused.body == b"Station CP1 is already connected.\n"
    assert reply.outcome is Outcome.RESULT  # the real station still answers
    security = events_of(redis_client, EventKind.SECURITY, 1)
    reason = "second connection refused while the station is connected"
    assert [e.data for e in security] == [{"reason": reason, "address": "127.0.0.1"}]


def test_a_station_with_credentials_replaces_its_live_connection(start_gateway, redis_client):
    publish_registry(redis_client, "csms-2", {"CP1": ""}, passwords={"CP1": "s3cret-key-0001"})
    base = start_gateway("csms-2")
    good = _basic("CP1", "s3cret-key-0001")

    async def scenario():
        async with (
            station_on(base, "CP1", additional_headers=good) as first,
            station_on(base, "CP1", boot=False, additional_headers=good),
        ):
            await asyncio.wait_for(first._connection.wait_closed(), 5)
            return await asyncio.to_thread(
                send_command, redis_client, "CP1", call.GetConfiguration(), timeout=5
            )

    assert asyncio.run(scenario()).outcome is Outcome.RESULT


def test_the_allow_list_is_extendable(start_gateway, redis_client, monkeypatch):
    monkeypatch.setenv("OCPP_GATEWAY_ALLOWED_ACTIONS", "UnlockConnector, ")
    base = start_gateway("csms-1", "--open", "--allow-action", "ClearCache")

    async def scenario():
        async with station_on(base, "CP1"):
            replies = {}
            for request in [
                call.ClearCache(),
                call.UnlockConnector(connector_id=1),
                call.RemoteStartTransaction(id_tag="x"),
            ]:
                replies[type(request).__name__] = await asyncio.to_thread(
                    send_command, redis_client, "CP1", request, timeout=5
                )
            return replies

    replies = asyncio.run(scenario())
    # Relayed: the scripted station does not implement them and says so.
    assert replies["ClearCache"].outcome is Outcome.CALL_ERROR
    assert replies["ClearCache"].error_code == "NotImplemented"
    assert replies["UnlockConnector"].outcome is Outcome.CALL_ERROR
    refused = replies["RemoteStartTransaction"]
    assert (refused.outcome, refused.sent) == (Outcome.REJECTED, False)
    assert "not allowed by this gateway" in refused.error_description


def test_a_station_reconnecting_without_a_boot_is_served(start_gateway, redis_client):
    publish_registry(redis_client, "csms-2", {"CP1": "SN-1"})
    base = start_gateway("csms-2")

    async def scenario():
        async with station_on(base, "CP1", boot=False):
            # The subscription follows the handshake (never awaited on the station's path).
            await asyncio.to_thread(wait_until, lambda: _subscribed(redis_client, "CP1"), 5, "sub")
            return await asyncio.to_thread(
                send_command, redis_client, "CP1", call.GetConfiguration(), timeout=5
            )

    assert asyncio.run(scenario()).outcome is Outcome.RESULT


def _subscribed(client, identity: str) -> bool:
    return client.pubsub_numsub(command_channel(identity))[0][1] == 1


def test_redis_with_a_password(start_gateway, redis_client, tmp_path):
    port = free_port()
    url = f"redis://:r3dis-pw@127.0.0.1:{port}/0"
    with redis_server(port, tmp_path, "--requirepass", "r3dis-pw"):
        client = redis.Redis.from_url(url)
        assert not redis_pings(redis.Redis(port=port))  # no password, no answer
        publish_registry(client, "csms-2", {"CP1": ""})
        base = start_gateway("csms-2", redis=url)

        async def scenario():
            async with station_on(base, "CP1"):
                return await asyncio.to_thread(
                    send_command, client, "CP1", call.GetConfiguration(), timeout=5
                )

        assert asyncio.run(scenario()).outcome is Outcome.RESULT
        wait_until(lambda: len(stream_events(client)) >= 3, 5, "connect, boot, disconnect events")
        kinds = [e.kind for e in stream_events(client)]
        assert kinds == [EventKind.CONNECT, EventKind.BOOT, EventKind.DISCONNECT]
        # The Celery nudge authenticated too: the ingestion task waits in the broker's queue.
        wait_until(lambda: client.llen("celery") > 0, 10, "the ingestion task in the queue")
        assert health(base)["redis"] == "ok"
        client.close()
