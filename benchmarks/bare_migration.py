"""Baseline for migration_batch: the migration steps in one asyncio process, nothing else.

No Celery, no database, no Redis, no gateway process: two in-script OCPP central systems
(``websockets`` + ``ocpp``'s ChargePoint, the gateway's library settings: validation inline,
uvloop) and the simulator CLI as a child process with N stations on the first one. Once all
have booted, each station goes through the product's steps with at most ``--in-flight`` at
once: GetConfiguration of the network keys, ChangeConfiguration of the free profile slot to
the second system's URL, ChangeConfiguration of NetworkConfigurationPriority, Reset Hard,
then wait for its BootNotification on the second system, stay ``--settle`` seconds (the
product's settle time, MIGRATION_SETTLE_SECONDS) and confirm through the second system that
the new profile is first (GetConfiguration of the priority), as the product's verification
does. Timed from the first command to the last confirmation; reports stations/s.

DESIGN: this kind of script measured ~67 stations/s on this machine (reboot 1 s, 100 in
flight); the product's target is >= 25 % of it (aim 50 %).

    python benchmarks/bare_migration.py [--stations 1000] [--in-flight 100] [--reboot-delay 1]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._stack import (
    QUIET_SIMULATOR,
    BareCentralSystem,
    cpu_seconds,
    fast_ocpp,
    print_results,
    raise_open_file_limit,
    run_dir,
)
from devstack import processes
from devstack.processes import wait_until_async
from migrations_app.services.plan import (
    NETWORK_KEYS,
    PRIORITY,
    PlanError,
    configuration_values,
    plan_switch,
)


async def migrate_station(
    identity: str,
    source: BareCentralSystem,
    target: BareCentralSystem,
    gate: asyncio.Semaphore,
    boot_timeout: float,
    settle: float,
) -> tuple[str, float]:
    from ocpp.v16 import call

    async with gate:
        started = time.monotonic()
        station = source.stations[identity]
        result = await station.call(call.GetConfiguration(key=NETWORK_KEYS), suppress=False)
        values = configuration_values(result)
        try:
            plan = plan_switch(values)
        except PlanError:
            return "skipped", time.monotonic() - started
        result = await station.call(
            call.ChangeConfiguration(key=plan.free_slot, value=target.url), suppress=False
        )
        if result.status != "Accepted":
            return "failed: url", time.monotonic() - started
        result = await station.call(
            call.ChangeConfiguration(key=PRIORITY, value=plan.new_priority), suppress=False
        )
        if result.status not in ("RebootRequired", "Accepted"):
            return "failed: priority", time.monotonic() - started
        booted = target.booted(identity)  # set by its first boot there, after the Reset
        result = await station.call(call.Reset(type="Hard"), suppress=False)
        if result.status != "Accepted":
            return "failed: reset", time.monotonic() - started
        try:
            async with asyncio.timeout(boot_timeout):
                await booted.wait()
        except TimeoutError:
            return "failed: no boot", time.monotonic() - started
        await asyncio.sleep(settle)
        result = await target.stations[identity].call(
            call.GetConfiguration(key=[PRIORITY]), suppress=False
        )
        confirmed = configuration_values(result)
        if confirmed.get(PRIORITY, "").split(",")[0].strip() != plan.free_slot:
            return "failed: not confirmed", time.monotonic() - started
        return "done", time.monotonic() - started


async def run_baseline(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    n = args.stations
    async with BareCentralSystem() as source, BareCentralSystem() as target:
        context = processes.simulator(
            source.url,
            n,
            *QUIET_SIMULATOR,
            "--reboot-delay",
            str(args.reboot_delay),
            log=workdir / "simulator.log",
        )
        simulator = context.__enter__()
        try:
            await wait_until_async(
                lambda: source.boots >= n and len(source.stations) >= n,
                60 + n / 20,
                "every station to boot on the first central system",
            )
            await asyncio.sleep(1.0)  # the StatusNotifications after each boot
            gate = asyncio.Semaphore(args.in_flight)
            cpu_before = time.process_time(), cpu_seconds(simulator.pid)
            started = time.monotonic()
            outcomes = await asyncio.gather(
                *(
                    migrate_station(identity, source, target, gate, args.boot_timeout, args.settle)
                    for identity in sorted(source.stations)
                )
            )
            wall = time.monotonic() - started
            cpu = time.process_time() - cpu_before[0], cpu_seconds(simulator.pid) - cpu_before[1]
        finally:
            await asyncio.to_thread(context.__exit__, None, None, None)
    durations = sorted(duration for _, duration in outcomes)
    return {
        "benchmark": "bare_migration",
        "stations": n,
        "in_flight": args.in_flight,
        "reboot_delay": args.reboot_delay,
        "settle_s": args.settle,
        "wall_s": round(wall, 2),
        "stations_per_s": round(n / wall, 1),
        "counts": dict(Counter(outcome for outcome, _ in outcomes)),
        "station_s_median": round(statistics.median(durations), 2),
        "station_s_p90": round(durations[int(0.9 * (len(durations) - 1))], 2),
        "cpu_s": {"script": round(cpu[0], 2), "simulator": round(cpu[1], 2)},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stations", type=int, default=1000, help="default 1000")
    parser.add_argument("--in-flight", type=int, default=100, help="default 100")
    parser.add_argument("--reboot-delay", type=float, default=1.0, help="default 1 s")
    parser.add_argument("--boot-timeout", type=float, default=120.0, help="default 120 s")
    parser.add_argument(
        "--settle", type=float, default=0.0, help="seconds on the target before confirming"
    )
    parser.add_argument("--keep", action="store_true", help="keep the simulator's log")
    args = parser.parse_args(argv)
    raise_open_file_limit()
    run = fast_ocpp()
    with run_dir(args.keep) as workdir:
        results = run(run_baseline(args, workdir))
    rows = [
        (
            "stations (in flight, reboot s)",
            f"{args.stations} ({args.in_flight}, {args.reboot_delay:g})",
        ),
        ("wall time, s", results["wall_s"]),
        ("stations/s", results["stations_per_s"]),
        ("outcomes", results["counts"]),
        (
            "per station median / p90, s",
            f"{results['station_s_median']} / {results['station_s_p90']}",
        ),
        ("CPU s", results["cpu_s"]),
    ]
    print_results("bare_migration (baseline)", rows, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
