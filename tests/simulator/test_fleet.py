"""A fleet run in a background thread with its own event loop, as sync tools use it."""

from __future__ import annotations

import asyncio

from devstack.processes import wait_until_async
from ocpp_gateway.simulator import Fleet, StationSpec, StationState, read_journal
from tests.simulator.csms import FAST, CentralSystem, run


def test_it_runs_in_a_thread_and_stops_cleanly(tmp_path):
    journal = tmp_path / "journal.jsonl"

    async def scenario():
        async with CentralSystem() as csms:
            specs = [StationSpec(f"T-{i}", url=csms.url) for i in range(20)]
            fleet = Fleet(specs, timing=FAST, journal=journal, connect_rate=500).start()
            try:
                await wait_until_async(
                    lambda: fleet.summary()["online"] == 20, 10, "20 stations online"
                )
            finally:
                # stop() blocks until every station closed: let this loop answer meanwhile.
                await asyncio.to_thread(fleet.stop)
            assert all(s.state is StationState.STOPPED for s in fleet)
            await wait_until_async(
                lambda: len(csms.seen_all("disconnect")) == 20, 10, "20 disconnects"
            )

    run(scenario())
    lines = read_journal(journal)
    assert len({line["station"] for line in lines if line["event"] == "boot_accepted"}) == 20
    closed = [line for line in lines if line["event"] == "disconnected"]
    assert len(closed) == 20 and {line["code"] for line in closed} == {1001}


def test_it_spreads_starts_over_time():
    async def scenario():
        async with CentralSystem() as csms:
            specs = [StationSpec(f"R-{i}", url=csms.url) for i in range(6)]
            async with Fleet(specs, timing=FAST, connect_rate=10) as fleet:
                await wait_until_async(lambda: all(s.online for s in fleet), 10, "all online")
                first = fleet["R-0"].events("powered_on")[0].t
                last = fleet["R-5"].events("powered_on")[0].t
                assert last - first >= 0.45

    run(scenario())
