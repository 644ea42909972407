"""Fleet boot: N simulated stations from power-on to the inventory, and the gateway's memory.

What it measures, with a real gateway (csms-1), a real Celery worker (2 prefork children and
beat), a private redis-server and a throwaway SQLite database:

- the time from starting ``python -m ocpp_gateway.simulator --count N`` until all N
  stations are in the inventory (connected, with their BootNotification recorded), polled
  through the ORM;
- the gateway process's resident memory (VmRSS) before and with the N connections held,
  hence KiB per connection;
- the CPU each process spent during the boot, and while holding the fleet idle (``--idle``
  seconds: keepalive pings, heartbeats).

Baselines measured in the same run:

(a) the time until all N stations had their BootNotification accepted by the gateway (the
    simulator journal's ``boot_accepted`` lines): the inventory's lag is the ratio
    inventory / booted;
(b) the KiB per connection of a bare ``websockets`` echo server process (uvloop, no
    compression, the gateway's settings) holding N connections from a bare client process:
    the ratio gateway / bare.

Memory is the marginal cost: both servers first take a warm-up of 20 connections (which
loads whatever the first connection loads: the Celery client, Redis pools), RSS is read,
then the N connections arrive and RSS is read again after they settle.
DESIGN target: 10,000 stations per gateway process at <= 25 KiB each.

    python benchmarks/fleet_boot.py [--stations 1000] [--connect-rate 200]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._stack import (
    JournalTail,
    Profiler,
    Stack,
    cpu_seconds,
    django_setup,
    gateway_stations,
    inventory_count,
    print_results,
    raise_open_file_limit,
    ratio,
    rss_kib,
    run_dir,
)
from devstack.processes import free_port, port_open, python, wait_until

WARMUP = 20

ECHO_SERVER = """\
import asyncio, sys
from websockets.asyncio.server import serve

async def echo(ws):
    async for message in ws:
        await ws.send(message)

async def main(port):
    async with serve(echo, "127.0.0.1", port, compression=None):
        await asyncio.Future()

try:
    from uvloop import run
except ImportError:
    from asyncio import run
run(main(int(sys.argv[1])))
"""

ECHO_CLIENT = """\
import asyncio, sys
from websockets.asyncio.client import connect

async def main(url, count, prefix):
    held, gate = [], asyncio.Semaphore(100)

    async def one(i):
        async with gate:
            ws = await connect(f"{url}/{prefix}{i}", compression=None, ping_interval=None,
                               max_queue=8, proxy=None, open_timeout=60)
            await ws.send("hello")
            await ws.recv()
            held.append(ws)

    await asyncio.gather(*(one(i) for i in range(count)))
    print("ready", len(held), flush=True)
    await asyncio.Future()

try:
    from uvloop import run
except ImportError:
    from asyncio import run
run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3]))
"""


def measure_gateway(workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    n = args.stations
    with Stack(workdir, "product") as stack:
        stack.redis()
        stack.fresh_database()
        django_setup(stack.database, stack.redis_url)
        gateway = stack.gateway("csms-1", open_admission=True)
        worker = stack.worker()
        time.sleep(args.settle)
        rss_idle = rss_kib(gateway.proc.pid)

        stack.simulator("warmup", gateway.url, WARMUP, "--prefix", "WARM-")
        wait_until(lambda: inventory_count("csms-1") >= WARMUP, 60, "the warm-up stations")
        time.sleep(args.settle)
        rss_warm = rss_kib(gateway.proc.pid)

        journal = stack.workdir / "journal.jsonl"
        tail = JournalTail(journal)
        sessions = {"gateway": gateway.proc.pid, "worker": worker.pid}
        sessions["redis"] = stack.procs["redis"].pid
        cpu_before = {name: cpu_seconds(pid) for name, pid in sessions.items()}
        started = time.monotonic()
        simulator = stack.simulator(
            "fleet",
            gateway.url,
            n,
            *("--prefix", "SIM-", "--journal", str(journal)),
            *("--connect-rate", str(args.connect_rate)),
        )
        sessions["simulator"] = simulator.pid
        cpu_before["simulator"] = 0.0
        profiled = {"gateway": gateway.proc.pid, "worker": worker.pid}
        with Profiler(stack.workdir, profiled, enabled=args.profile) as profiler:
            reached: dict[str, float] = {}
            checks = {
                "connected": lambda: gateway_stations(gateway.port) >= WARMUP + n,
                "booted": lambda: tail.poll() >= n,
                "inventory": lambda: inventory_count("csms-1") >= WARMUP + n,
            }
            deadline = started + args.timeout
            while len(reached) < len(checks):
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"after {args.timeout}s: gateway holds {gateway_stations(gateway.port)}, "
                        f"{tail.poll()} booted, {inventory_count('csms-1')} in the inventory "
                        f"(of {n} + {WARMUP} warm-up); logs in {stack.workdir}"
                    )
                if simulator.poll() is not None:
                    raise RuntimeError(f"the simulator exited; see {stack.log('fleet')}")
                for name, check in checks.items():
                    if name not in reached and check():
                        reached[name] = time.monotonic() - started
                time.sleep(0.1)
            cpu = {
                name: round(cpu_seconds(pid) - cpu_before[name], 2)
                for name, pid in sessions.items()
            }
        profiler.report()
        time.sleep(args.settle)
        rss_loaded = rss_kib(gateway.proc.pid)
        # What holding the fleet costs when nothing happens (pings, heartbeats, timers).
        idle_before = {name: cpu_seconds(pid) for name, pid in sessions.items()}
        time.sleep(args.idle)
        idle_cpu = {
            name: round(100 * (cpu_seconds(pid) - idle_before[name]) / args.idle, 1)
            for name, pid in sessions.items()
        }
        rss_peak = rss_kib(gateway.proc.pid, "VmHWM")
        simulator_rss = rss_kib(simulator.pid)
    return {
        "connected_s": round(reached["connected"], 2),
        "booted_s": round(reached["booted"], 2),
        "inventory_s": round(reached["inventory"], 2),
        "rss_idle_kib": rss_idle,
        "rss_warm_kib": rss_warm,
        "rss_loaded_kib": rss_loaded,
        "rss_peak_kib": rss_peak,
        "kib_per_connection": round((rss_loaded - rss_warm) / n, 2),
        "simulator_rss_kib": simulator_rss,
        "cpu_s_during_boot": cpu,
        "idle_cpu_percent": idle_cpu,
    }


def measure_bare(workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    n = args.stations
    with Stack(workdir, "bare") as stack:
        server_py = stack.workdir / "echo_server.py"
        client_py = stack.workdir / "echo_client.py"
        server_py.write_text(ECHO_SERVER)
        client_py.write_text(ECHO_CLIENT)
        port = free_port()
        url = f"ws://127.0.0.1:{port}/echo"
        server = stack.start("echo-server", python(str(server_py), str(port)))
        wait_until(lambda: port_open(port), 15, "the echo server to listen")
        time.sleep(args.settle)
        rss_idle = rss_kib(server.pid)

        def ready(name: str) -> bool:
            if stack.procs[name].poll() is not None:
                raise RuntimeError(f"{name} exited; see {stack.log(name)}")
            return b"ready" in stack.log(name).read_bytes()

        stack.start("echo-warmup", python(str(client_py), url, str(WARMUP), "WARM-"))
        wait_until(lambda: ready("echo-warmup"), 60, "the warm-up connections")
        time.sleep(args.settle)
        rss_warm = rss_kib(server.pid)
        started = time.monotonic()
        stack.start("echo-clients", python(str(client_py), url, str(n), "BARE-"))
        wait_until(lambda: ready("echo-clients"), args.timeout, f"{n} echo connections")
        held_s = time.monotonic() - started
        time.sleep(args.settle)
        rss_loaded = rss_kib(server.pid)
    return {
        "held_s": round(held_s, 2),
        "rss_idle_kib": rss_idle,
        "rss_warm_kib": rss_warm,
        "rss_loaded_kib": rss_loaded,
        "kib_per_connection": round((rss_loaded - rss_warm) / n, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stations", type=int, default=1000, help="fleet size (default 1000)")
    parser.add_argument(
        "--connect-rate",
        type=float,
        default=200.0,
        help="simulator stations started per second (default 200, the simulator's own)",
    )
    parser.add_argument(
        "--timeout", type=float, help="give up after this many seconds (default 120 + N/20)"
    )
    parser.add_argument("--settle", type=float, default=2.0, help="pause before RSS readings")
    parser.add_argument(
        "--idle", type=float, default=10.0, help="seconds of idle hold to measure CPU over"
    )
    parser.add_argument(
        "--profile", action="store_true", help="py-spy the gateway and worker during the boot"
    )
    parser.add_argument("--skip-bare", action="store_true", help="skip the echo baseline")
    parser.add_argument("--keep", action="store_true", help="keep logs and database")
    args = parser.parse_args(argv)
    if args.stations < 1:
        parser.error("--stations must be >= 1")
    args.timeout = args.timeout or 120 + args.stations / 20
    raise_open_file_limit()

    with run_dir(args.keep) as workdir:
        gateway = measure_gateway(workdir, args)
        bare = None if args.skip_bare else measure_bare(workdir, args)

    n = args.stations
    results = {
        "benchmark": "fleet_boot",
        "stations": n,
        "connect_rate": args.connect_rate,
        "gateway": gateway,
        "bare_echo": bare,
        "inventory_over_booted": ratio(gateway["inventory_s"], gateway["booted_s"]),
        "inventory_lag_s": round(gateway["inventory_s"] - gateway["booted_s"], 2),
        "kib_per_connection_gateway_over_bare": (
            ratio(gateway["kib_per_connection"], bare["kib_per_connection"]) if bare else None
        ),
    }
    per_connection_ratio = results["kib_per_connection_gateway_over_bare"]
    rows: list[tuple[str, Any]] = [
        ("stations (connect rate /s)", f"{n} ({args.connect_rate:g})"),
        ("all connected to the gateway, s", gateway["connected_s"]),
        ("all booted on the gateway (baseline a), s", gateway["booted_s"]),
        ("all in the inventory, s", gateway["inventory_s"]),
        ("inventory / booted", results["inventory_over_booted"]),
        ("gateway RSS idle / warm / loaded, MiB", _mib(gateway, "idle", "warm", "loaded")),
        ("gateway KiB per connection", gateway["kib_per_connection"]),
    ]
    if bare:
        rows += [
            ("bare echo RSS idle / warm / loaded, MiB", _mib(bare, "idle", "warm", "loaded")),
            ("bare echo KiB per connection (baseline b)", bare["kib_per_connection"]),
            ("gateway / bare echo, per connection", per_connection_ratio),
        ]
    rows.append(("CPU s during boot", gateway["cpu_s_during_boot"]))
    rows.append(("CPU % of a core, fleet held idle", gateway["idle_cpu_percent"]))
    print_results(f"fleet_boot, {n} stations", rows, results)
    return 0


def _mib(figures: dict[str, Any], *names: str) -> str:
    return " / ".join(f"{figures[f'rss_{name}_kib'] / 1024:.1f}" for name in names)


if __name__ == "__main__":
    sys.exit(main())
