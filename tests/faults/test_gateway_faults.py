"""Gateway faults on real processes: Redis killed and restarted empty, a gateway killed.

The stations' own journal is the ground truth: a station that lost its connection says so.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
from ocpp.v16 import call

from devstack.processes import free_port, port_open, redis_server, wait_until
from ocpp_gateway.client import send_command
from ocpp_gateway.envelopes import EventKind, Outcome, command_channel
from ocpp_gateway.simulator import Fleet, StationSpec, Timing
from tests.ocpp_gateway.registry import publish_registry, stream_events
from tests.ocpp_gateway.test_gateway import health

pytestmark = pytest.mark.slow

FAST = Timing(reboot_delay=0.3, retry_interval=0.2, reconnect_delay=0.3, max_round_backoff=1.0)
STATIONS = [f"CP-{i:02}" for i in range(20)]


def _ask_all(client: redis.Redis, identities: list[str]) -> dict[str, Outcome]:
    def ask(identity: str) -> Outcome:
        return send_command(client, identity, call.GetConfiguration(), timeout=5).outcome

    with ThreadPoolExecutor(max_workers=len(identities)) as pool:
        return dict(zip(identities, pool.map(ask, identities), strict=True))


def _subscribed(client: redis.Redis, identities: list[str]) -> bool:
    counts = client.pubsub_numsub(*(command_channel(i) for i in identities))
    return all(count == 1 for _, count in counts)


def _kill(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


def test_redis_killed_and_restarted_empty_keeps_every_station(start_gateway, tmp_path):
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    everyone = [*STATIONS, "CP-NEW"]
    with redis_server(port, tmp_path) as first_redis:
        publish_registry(client, "csms-2", dict.fromkeys(everyone, ""))
        base = start_gateway("csms-2", "--registry-refresh", "0.5", redis=url)
        wait_until(lambda: health(base)["registered"] == len(everyone), 5, "the registry loaded")
        fleet = Fleet([StationSpec(i, url=base) for i in STATIONS], timing=FAST)
        newcomer = Fleet([StationSpec("CP-NEW", url=base)], timing=FAST)
        with fleet:
            wait_until(lambda: all(s.online for s in fleet), 20, "every station online")
            _kill(first_redis)
            wait_until(lambda: health(base)["redis"] == "down", 5, "the gateway to see Redis down")

            # Redis is down: a new station is admitted (the registry in memory) and stays.
            with newcomer:
                wait_until(lambda: newcomer["CP-NEW"].online, 10, "CP-NEW online")
                time.sleep(3)  # a real outage: the gateway's loops all meet the dead Redis
                status = health(base)
                assert status["redis"] == "down" and status["stations"] == len(everyone)
                assert status["event_backlog"] >= 2  # CP-NEW: connect, boot at least
                with redis_server(port, tmp_path):  # empty: no AOF, no RDB
                    wait_until(
                        lambda: health(base)["redis"] == "ok" and not health(base)["event_backlog"],
                        15,
                        "the gateway back on Redis with its events flushed",
                    )
                    wait_until(
                        lambda: _subscribed(client, everyone), 10, "every station subscribed"
                    )
                    replies = _ask_all(client, everyone)
                    assert replies == dict.fromkeys(everyone, Outcome.RESULT)
                    boots = {e.station for e in stream_events(client) if e.kind is EventKind.BOOT}
                    assert "CP-NEW" in boots  # buffered while Redis was down
                    assert health(base)["registered"] == len(everyone)  # kept the copy
                    # and asked the Django side to publish it again (a Celery task by name)
                    wait_until(
                        lambda: any(
                            b"fleet.publish_registry" in m for m in client.lrange("celery", 0, -1)
                        ),
                        5,
                        "a publish_registry task in the broker's queue",
                    )
                    # Ground truth: nobody lost its connection, the newcomer included.
                    for station in [*fleet, newcomer["CP-NEW"]]:
                        assert station.online, station
                        assert station.events("disconnected") == [], station.identity
                        assert len(station.events("connected")) == 1, station.identity
                    # Stopped while Redis is up: its shutdown flush has nothing to wait for.
                    _signal_gateway(base_port(base), signal.SIGTERM)
    client.close()


def test_each_gateway_killed_and_restarted_gets_its_stations_back(
    start_gateway, redis_client, tmp_path
):
    publish_registry(redis_client, "csms-2", dict.fromkeys(STATIONS[10:], ""))
    ports = {"csms-1": free_port(), "csms-2": free_port()}
    urls = {
        "csms-1": start_gateway("csms-1", "--open", port=ports["csms-1"]),
        "csms-2": start_gateway("csms-2", port=ports["csms-2"]),
    }
    homes = {i: "csms-1" if n < 10 else "csms-2" for n, i in enumerate(STATIONS)}
    specs = [StationSpec(i, url=urls[homes[i]], profile_timeout=2) for i in STATIONS]
    with Fleet(specs, timing=FAST) as fleet:
        wait_until(lambda: all(s.online for s in fleet), 20, "every station online")
        for csms in ("csms-1", "csms-2"):
            mine = [i for i in STATIONS if homes[i] == csms]
            _signal_gateway(ports[csms], signal.SIGKILL)
            wait_until(
                lambda mine=mine: all(fleet[i].events("disconnected") for i in mine),
                10,
                f"the stations of {csms} to see it gone",
            )
            start_gateway(csms, *(["--open"] if csms == "csms-1" else []), port=ports[csms])
            wait_until(
                lambda mine=mine: all(
                    fleet[i].online and len(fleet[i].events("boot_accepted")) >= 2 for i in mine
                ),
                20,
                f"the stations of {csms} back",
            )
            wait_until(lambda mine=mine: _subscribed(redis_client, mine), 10, "subscribed again")
            assert _ask_all(redis_client, mine) == dict.fromkeys(mine, Outcome.RESULT)
        for station in fleet:
            assert station.connected_url == urls[homes[station.identity]], station


def base_port(base: str) -> int:
    return int(base.rsplit(":", 1)[1].split("/")[0])


def _signal_gateway(port: int, signum: int) -> None:
    """Signal the gateway on port and wait until it is gone."""
    found = subprocess.run(
        ["pgrep", "-f", f"ocpp_gateway .*--port {port}"], capture_output=True, text=True
    )
    pids = [int(pid) for pid in found.stdout.split()]
    assert len(pids) == 1, f"expected one gateway on port {port}, found {pids}"
    os.kill(pids[0], signum)
    wait_until(lambda: not port_open(port), 15, f"the gateway on port {port} to exit")
