"""The foundation end to end: simulated stations on real gateways, the bridge, the inventory."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

from ocpp.v16 import call
from ocpp.v16.enums import ResetType

from devstack.processes import free_port, wait_until
from fleet.models import ChargingStation, CsmsBackend, Registration
from ocpp_gateway.client import send_command
from ocpp_gateway.envelopes import Outcome, last_boot_key
from ocpp_gateway.simulator import Fleet, StationSpec, Timing

NETWORK_KEYS = [
    "NetworkConnectionProfile1",
    "NetworkConnectionProfile2",
    "NetworkConfigurationPriority",
    "NetworkProfileConnectionTimeoutSec",
]
FAST = Timing(reboot_delay=0.3, retry_interval=0.2, reconnect_delay=0.3)


def test_a_booting_station_appears_in_the_inventory_through_a_real_worker(
    start_gateway, celery_worker
):
    url = start_gateway("csms-1", "--open")
    CsmsBackend.objects.create(name="csms-1", url=url)
    spec = StationSpec("CP-NEW", url=url, firmware="4.2.85", vendor="Acme", model="AC22")
    with Fleet([spec], timing=FAST):
        station = wait_until(
            lambda: (
                ChargingStation.objects.filter(identity="CP-NEW", connected=True)
                .exclude(firmware_version="")
                .first()
            ),
            20,
            "the station in the inventory",
        )
    assert (station.vendor, station.model, station.firmware_version) == ("Acme", "AC22", "4.2.85")
    assert station.csms.name == "csms-1"
    assert station.registrations.get().state == Registration.State.ACTIVE


def test_the_bridge_reads_the_network_keys_and_a_whitespace_value_is_rejected(
    start_gateway, redis_client
):
    url = start_gateway("csms-1", "--open")
    with Fleet([StationSpec("CP-1", url=url)], timing=FAST) as fleet:
        wait_until(lambda: fleet["CP-1"].online, 10, "the station online")
        reply = send_command(
            redis_client, "CP-1", call.GetConfiguration(key=NETWORK_KEYS), timeout=5
        )
        assert reply.outcome is Outcome.RESULT
        values = {e["key"]: e["value"] for e in reply.payload["configuration_key"]}
        assert list(values) == NETWORK_KEYS
        assert values["NetworkConnectionProfile1"] == url

        reply = send_command(
            redis_client,
            "CP-1",
            call.ChangeConfiguration(
                key="NetworkConnectionProfile2", value="ws://csms-2.example.com/ ocpp"
            ),
            timeout=5,
        )
        assert reply.outcome is Outcome.RESULT
        assert reply.payload == {"status": "Rejected"}
        assert fleet["CP-1"].config["NetworkConnectionProfile2"] == ""


def test_a_hundred_stations_answer_in_parallel_each_with_its_own_answer(
    start_gateway, redis_client
):
    url = start_gateway("csms-1", "--open")
    # Each station holds a URL of its own in profile 2, so a crossed reply would show.
    specs = [
        StationSpec(f"CP-{i:03}", url=url, url2=f"ws://127.0.0.1:9/slot-{i:03}") for i in range(100)
    ]
    with Fleet(specs, timing=FAST) as fleet:
        wait_until(lambda: all(s.online for s in fleet), 30, "every station online")

        def ask(identity: str):
            return send_command(
                redis_client,
                identity,
                call.GetConfiguration(key=["NetworkConnectionProfile2"]),
                timeout=15,
            )

        with ThreadPoolExecutor(max_workers=100) as pool:
            replies = list(pool.map(ask, [spec.identity for spec in specs]))
    for spec, reply in zip(specs, replies, strict=True):
        assert reply.outcome is Outcome.RESULT, reply
        assert reply.station == spec.identity
        assert reply.payload["configuration_key"][0]["value"] == spec.url2


def test_after_priority_change_and_reset_the_station_boots_on_the_new_csms(
    start_gateway, redis_client
):
    old, new = start_gateway("csms-1", "--open"), start_gateway("csms-2", "--open")
    with Fleet([StationSpec("CP-1", url=old)], timing=FAST) as fleet:
        wait_until(lambda: fleet["CP-1"].online, 10, "the station online")
        _point_at(redis_client, "CP-1", new)
        wait_until(
            lambda: redis_client.hget(last_boot_key("csms-2"), "CP-1"), 15, "a boot on csms-2"
        )
        assert fleet["CP-1"].connected_url == new


def test_with_the_new_csms_unreachable_the_station_falls_back(start_gateway, redis_client):
    old = start_gateway("csms-1", "--open")
    nowhere = f"ws://127.0.0.1:{free_port()}/ocpp"
    spec = StationSpec("CP-1", url=old, profile_timeout=1)
    with Fleet([spec], timing=FAST) as fleet:
        raw = wait_until(
            lambda: redis_client.hget(last_boot_key("csms-1"), "CP-1"), 10, "the first boot"
        )
        first_boot = json.loads(raw)["at"]
        _point_at(redis_client, "CP-1", nowhere)
        wait_until(
            lambda: (
                json.loads(redis_client.hget(last_boot_key("csms-1"), "CP-1"))["at"] > first_boot
            ),
            15,
            "the station to boot on csms-1 again",
        )
        assert fleet["CP-1"].connected_url == old
        assert fleet["CP-1"].events("fell_back")


def _point_at(redis_client, identity: str, url: str) -> None:
    """Steps 2 to 4 of the procedure, through the bridge."""
    for key, value, expected in [
        ("NetworkConnectionProfile2", url, "Accepted"),
        (
            "NetworkConfigurationPriority",
            "NetworkConnectionProfile2,NetworkConnectionProfile1",
            "RebootRequired",
        ),
    ]:
        reply = send_command(
            redis_client, identity, call.ChangeConfiguration(key=key, value=value), timeout=5
        )
        assert reply.payload == {"status": expected}
    reply = send_command(redis_client, identity, call.Reset(type=ResetType.hard), timeout=5)
    assert reply.payload == {"status": "Accepted"}
