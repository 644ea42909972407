"""Command bridge throughput: GetConfiguration round trips per second over 100 stations.

What it measures: K threads of this process call ``ocpp_gateway.client.send_command``
(PUBLISH on the station's channel -> the gateway -> the simulated station -> the reply list
-> BLPOP) in closed loops, each thread over its own share of the stations, for K in
``--threads`` (default 10, 32, 100). Stations: the simulator CLI as a child process;
gateway: ``python -m ocpp_gateway`` on a private redis-server.

Baseline measured in the same run: a bare ``ocpp`` call loop in one process (this one): a
``websockets`` server whose server-side ``ChargePoint`` per station calls GetConfiguration
in a loop on each of 100 stations of its own simulator process (100 in flight), with the
gateway's library settings (validation inline, uvloop). Runs are interleaved (bare, bridge
trials, bare, bridge trials, bare) and each round of trials is compared with the mean of
the bare runs around it. Besides round trips/s, the CPU each process spends per round trip
is reported: on this 2-core machine, throughput follows total CPU per round trip.
DESIGN target: the bridge reaches >= 50 % of the bare loop.

Through Celery (unless --no-celery): there is no Celery task that only relays a command,
and none may be added for a benchmark, so the real step task path is measured instead: dry
run batches (``migrate_fleet --dry-run``) over ``--dry-run-stations`` (default 1,000: the
bridge's stations plus a second simulator's), where each station costs its pre-flight and
step 1 (one GetConfiguration through the bridge) and the database writes of the state
machine and the audit trail. Reported as stations (GetConfiguration commands) per second,
from the batch's creation to its end (database timestamps), against a bare loop over the
same number of stations measured just before. Issue 9 targets: >= 300 stations/s on 2
cores and >= 0.25 of that bare loop.

    python benchmarks/bridge_throughput.py [--stations 100] [--threads 10,32,100]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._stack import (
    QUIET_SIMULATOR,
    BareCentralSystem,
    JournalTail,
    Profiler,
    Stack,
    cpu_seconds,
    django_setup,
    fast_ocpp,
    gateway_stations,
    inventory_count,
    print_results,
    raise_open_file_limit,
    ratio,
    run_dir,
)
from devstack import processes
from devstack.processes import free_port, wait_until, wait_until_async
from migrations_app.services.plan import NETWORK_KEYS  # what step 1 of a migration reads
from ocpp_gateway.simulator.spec import identity_for

COMMAND_TIMEOUT = 10.0


def _summary(latencies: list[float], ok: int, errors: int, seconds: float) -> dict[str, Any]:
    latencies.sort()

    def pct(p: float) -> float | None:
        if not latencies:
            return None
        return round(1000 * latencies[min(len(latencies) - 1, int(p * len(latencies)))], 2)

    return {
        "round_trips_per_s": round(ok / seconds, 1),
        "ok": ok,
        "errors": errors,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
    }


# --- baseline: a bare ocpp call loop ------------------------------------------------------


async def _bare_loop(log: Path, stations: int, warmup: float, duration: float) -> dict[str, Any]:
    from ocpp.v16 import call

    async with BareCentralSystem() as csms:
        context = processes.simulator(csms.url, stations, *QUIET_SIMULATOR, log=log)
        simulator = context.__enter__()
        try:
            await wait_until_async(
                lambda: csms.boots >= stations and len(csms.stations) >= stations,
                60 + stations / 20,
                "the stations to boot on the bare central system",
            )
            await asyncio.sleep(1.0)  # let the StatusNotifications after each boot pass
            latencies: list[float] = []
            counts = {"ok": 0, "errors": 0, "all": 0}
            loop = asyncio.get_running_loop()
            measure_from = loop.time() + warmup
            end = measure_from + duration

            async def one_station(station: Any) -> None:
                while (started := loop.time()) < end:
                    try:
                        result = await station.call(
                            call.GetConfiguration(key=NETWORK_KEYS), suppress=False
                        )
                        ok = bool(result.configuration_key)
                    except Exception:
                        ok = False
                    counts["all"] += 1
                    if started >= measure_from:
                        counts["ok" if ok else "errors"] += 1
                        if ok:
                            latencies.append(loop.time() - started)

            cpu_before = time.process_time()
            simulator_before = cpu_seconds(simulator.pid)
            await asyncio.gather(*(one_station(s) for s in list(csms.stations.values())))
            cpu = time.process_time() - cpu_before
            simulator_cpu = cpu_seconds(simulator.pid) - simulator_before
            summary = _summary(latencies, counts["ok"], counts["errors"], duration)
            # CPU over warm-up and measurement, per call made in both.
            summary["cpu_us_per_round_trip"] = {
                "server": round(1e6 * cpu / max(1, counts["all"])),
                "simulator": round(1e6 * simulator_cpu / max(1, counts["all"])),
            }
            return summary
        finally:
            await asyncio.to_thread(context.__exit__, None, None, None)


def bare_loop(
    workdir: Path, args: argparse.Namespace, name: str, stations: int | None = None
) -> dict[str, Any]:
    run = fast_ocpp()
    log = workdir / f"simulator-{name}.log"
    return run(_bare_loop(log, stations or args.stations, args.warmup, args.duration))


# --- the bridge --------------------------------------------------------------------------


def bridge_trial(
    redis_url: str, stations: list[str], threads: int, warmup: float, duration: float
) -> dict[str, Any]:
    import redis
    from ocpp.v16 import call

    from ocpp_gateway.client import send_command
    from ocpp_gateway.envelopes import Outcome

    barrier = threading.Barrier(threads + 1)
    results: list[tuple[list[float], int, int]] = []
    calls: list[int] = []
    lock = threading.Lock()
    times: dict[str, float] = {}

    def worker(index: int) -> None:
        client = redis.Redis.from_url(redis_url, socket_timeout=COMMAND_TIMEOUT + 30)
        mine = stations[index::threads]
        latencies: list[float] = []
        ok = errors = made = 0
        barrier.wait()
        measure_from, end = times["from"], times["end"]
        turn = 0
        try:
            while (started := time.perf_counter()) < end:
                station = mine[turn % len(mine)]
                turn += 1
                try:
                    reply = send_command(
                        client,
                        station,
                        call.GetConfiguration(key=NETWORK_KEYS),
                        timeout=COMMAND_TIMEOUT,
                    )
                    good = reply.outcome is Outcome.RESULT
                except Exception:
                    good = False
                made += 1
                if started >= measure_from:
                    if good:
                        ok += 1
                        latencies.append(time.perf_counter() - started)
                    else:
                        errors += 1
        finally:
            client.close()
            with lock:
                results.append((latencies, ok, errors))
                calls.append(made)

    pool = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(threads)]
    for thread in pool:
        thread.start()
    times["from"] = time.perf_counter() + warmup
    times["end"] = times["from"] + duration
    barrier.wait()
    for thread in pool:
        thread.join(warmup + duration + COMMAND_TIMEOUT + 10)
    latencies = [value for chunk, _, _ in results for value in chunk]
    return {
        "threads": threads,
        "calls": sum(calls),
        **_summary(
            latencies,
            sum(ok for _, ok, _ in results),
            sum(errors for _, _, errors in results),
            duration,
        ),
    }


# --- through Celery: dry-run batches ------------------------------------------------------


def celery_dry_runs(stack: Stack, batches: int, stations: int) -> dict[str, Any]:
    from migrations_app.models import MigrationBatch, OcppExchange

    rates, walls, counts, worker_ms, phases = [], [], [], [], []
    worker = stack.procs["worker"].pid
    for _ in range(batches):
        started = time.monotonic()
        cpu_before = cpu_seconds(worker)
        out = stack.manage(
            "migrate_fleet",
            *("--to", "csms-2", "--from", "csms-1", "--dry-run"),
            *("--max-in-flight", str(stations), "--rate-per-minute", "0"),
            *("--wait", "--json"),
        )
        walls.append(time.monotonic() - started)
        report = json.loads(out.stdout)
        counts.append(report["counts"])
        batch = MigrationBatch.objects.get(id=report["batch"])
        commands = OcppExchange.objects.filter(
            migration__batch=batch, action="GetConfiguration", outcome="result"
        ).count()
        seconds = (batch.finished_at - batch.created_at).total_seconds()
        rates.append(commands / seconds)
        phases.append(dry_run_phases(batch))
        worker_ms.append(1000 * (cpu_seconds(worker) - cpu_before) / max(1, commands))
    return {
        "batches": batches,
        "commands_per_s": [round(r, 1) for r in rates],
        "commands_per_s_median": round(statistics.median(rates), 1),
        "worker_cpu_ms_per_station": [round(ms, 1) for ms in worker_ms],
        "cli_wall_s": [round(w, 2) for w in walls],
        "phases_s": phases,
        "counts": counts,
    }


def dry_run_phases(batch: Any) -> dict[str, float]:
    """Where a dry run's seconds went: from the batch's creation to its first station's
    start, the stations' own span, and from the last one's end to the batch's end."""
    from django.db.models import Max, Min

    span = batch.stations.aggregate(first=Min("started_at"), last=Max("finished_at"))
    return {
        "to_first_start": round((span["first"] - batch.created_at).total_seconds(), 3),
        "stations": round((span["last"] - span["first"]).total_seconds(), 3),
        "to_batch_end": round((batch.finished_at - span["last"]).total_seconds(), 3),
    }


# --- the run -----------------------------------------------------------------------------


def measured_trial(
    stack: Stack, gateway_pid: int, simulator_pid: int, k: int, args: argparse.Namespace
) -> dict[str, Any]:
    """One bridge trial, with the CPU each process spent per round trip."""
    pids = {"gateway": gateway_pid, "redis": stack.procs["redis"].pid, "simulator": simulator_pid}
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    client_before = time.process_time()
    identities = [identity_for("SIM-", i, args.stations) for i in range(1, args.stations + 1)]
    trial = bridge_trial(stack.redis_url, identities, k, args.warmup, args.duration)
    calls = max(1, trial["calls"])
    trial["cpu_us_per_round_trip"] = {
        name: round(1e6 * (cpu_seconds(pid) - before[name]) / calls) for name, pid in pids.items()
    }
    trial["cpu_us_per_round_trip"]["client"] = round(
        1e6 * (time.process_time() - client_before) / calls
    )
    return trial


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stations", type=int, default=100, help="default 100")
    parser.add_argument(
        "--threads", default="10,32,100", help="comma list of K (default 10,32,100)"
    )
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per trial")
    parser.add_argument("--warmup", type=float, default=1.0, help="untimed seconds first")
    parser.add_argument(
        "--rounds", type=int, default=2, help="bare, bridge trials, ... , bare (default 2)"
    )
    parser.add_argument("--no-celery", action="store_true", help="skip the Celery path")
    parser.add_argument("--celery-batches", type=int, default=3, help="dry-run batches")
    parser.add_argument(
        "--dry-run-stations",
        type=int,
        default=1000,
        help="stations in each dry-run batch (default 1000; at least --stations)",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        help="the dry run's worker prefork children (default: the project's "
        "CELERY_WORKER_CONCURRENCY, as a deployment runs it)",
    )
    parser.add_argument("--profile", action="store_true", help="py-spy gateway, simulator, worker")
    parser.add_argument(
        "--profile-idle", action="store_true", help="with --profile: sample waiting threads too"
    )
    parser.add_argument("--keep", action="store_true", help="keep logs and database")
    args = parser.parse_args(argv)
    threads = [int(k) for k in args.threads.split(",") if k.strip()]
    if any(k < 1 or k > args.stations for k in threads):
        parser.error("each K must be between 1 and --stations (one station per call)")
    if args.dry_run_stations < args.stations:
        parser.error("--dry-run-stations must be at least --stations")
    raise_open_file_limit()

    bare: list[dict[str, Any]] = []
    rounds: list[list[dict[str, Any]]] = []
    celery = dry_run_bare = None
    with run_dir(args.keep) as workdir, Stack(workdir, "bridge") as stack:
        stack.redis()
        stack.fresh_database()
        django_setup(stack.database, stack.redis_url)
        gateway = stack.gateway("csms-1", open_admission=True)
        # Open: a dry run's pre-flight skips a station not registered on a closed target.
        stack.manage("add_csms", "csms-2", f"ws://127.0.0.1:{free_port()}/ocpp", "--open")
        journal = stack.workdir / "journal.jsonl"
        simulator = stack.simulator(
            "simulator", gateway.url, args.stations, "--journal", str(journal)
        )
        tail = JournalTail(journal)
        wait_until(
            lambda: (
                tail.poll() >= args.stations and gateway_stations(gateway.port) >= args.stations
            ),
            60 + args.stations / 20,
            "the stations to boot on the gateway",
        )
        profiled = {"gateway": gateway.proc.pid, "simulator": simulator.pid}
        for number in range(args.rounds):
            # The bridge's own stations sit idle meanwhile (heartbeats every 300 s).
            bare.append(bare_loop(stack.workdir, args, f"bare-{number}"))
            enabled = args.profile and number == 0
            with Profiler(stack.workdir, profiled, enabled=enabled) as profiler:
                rounds.append(
                    [
                        measured_trial(stack, gateway.proc.pid, simulator.pid, k, args)
                        for k in threads
                    ]
                )
            profiler.report()
        bare.append(bare_loop(stack.workdir, args, f"bare-{args.rounds}"))

        if not args.no_celery:
            # The step path runs over --dry-run-stations: the bridge's stations and as many
            # more as that needs, on the same gateway; its baseline is the bare loop over
            # the same number of stations, measured just before.
            extra = args.dry_run_stations - args.stations
            if extra > 0:
                stack.simulator("simulator-dry", gateway.url, extra, "--prefix", "DRY-")
            dry_run_bare = bare_loop(stack.workdir, args, "bare-dry", args.dry_run_stations)
            stack.worker(concurrency=args.concurrency)
            wait_until(
                lambda: inventory_count("csms-1") >= args.dry_run_stations,
                60 + args.dry_run_stations / 20,
                "the stations in the inventory",
            )
            profiled = {"worker": stack.procs["worker"].pid}
            with Profiler(
                stack.workdir, profiled, enabled=args.profile, idle=args.profile_idle
            ) as profiler:
                celery = celery_dry_runs(stack, args.celery_batches, args.dry_run_stations)
            profiler.report(20)

    # Each round against the mean of the bare loops just before and just after it.
    for number, trials in enumerate(rounds):
        around = statistics.mean(b["round_trips_per_s"] for b in (bare[number], bare[number + 1]))
        for trial in trials:
            trial["round"] = number
            trial["ratio_to_bare"] = ratio(trial["round_trips_per_s"], around)
    by_k = {
        k: [trial for trials in rounds for trial in trials if trial["threads"] == k]
        for k in threads
    }
    per_k = {
        k: {
            "round_trips_per_s": round(statistics.mean(t["round_trips_per_s"] for t in ts), 1),
            "ratio_to_bare": round(statistics.mean(t["ratio_to_bare"] for t in ts), 3),
            "p50_ms": round(statistics.median(t["p50_ms"] for t in ts), 1),
            "p99_ms": round(statistics.median(t["p99_ms"] for t in ts), 1),
            "cpu_us_per_round_trip": {
                name: round(statistics.mean(t["cpu_us_per_round_trip"][name] for t in ts))
                for name in ts[0]["cpu_us_per_round_trip"]
            },
        }
        for k, ts in by_k.items()
    }
    bare_rate = statistics.mean(b["round_trips_per_s"] for b in bare)
    bare_cpu = round(statistics.mean(b["cpu_us_per_round_trip"]["server"] for b in bare))
    bare_simulator_cpu = round(
        statistics.mean(b["cpu_us_per_round_trip"]["simulator"] for b in bare)
    )
    best_k = max(per_k, key=lambda k: per_k[k]["ratio_to_bare"])
    gateway_cpu = per_k[best_k]["cpu_us_per_round_trip"]["gateway"]
    results = {
        "benchmark": "bridge_throughput",
        "stations": args.stations,
        "dry_run_concurrency": args.concurrency,
        "bare_loop": bare,
        "bare_round_trips_per_s": round(bare_rate, 1),
        "bare_server_cpu_us_per_round_trip": bare_cpu,
        "bridge_trials": rounds,
        "bridge": {str(k): v for k, v in per_k.items()},
        "best_threads": best_k,
        "best_bridge_over_bare": per_k[best_k]["ratio_to_bare"],
        "gateway_over_bare_server_cpu_per_round_trip": ratio(gateway_cpu, bare_cpu),
        "celery_dry_run": celery,
        "dry_run_bare_loop": dry_run_bare,
        "celery_over_bare": ratio(
            celery["commands_per_s_median"], dry_run_bare["round_trips_per_s"]
        )
        if celery and dry_run_bare
        else None,
    }
    rows: list[tuple[str, Any]] = [
        (
            "bare ocpp loop, round trips/s (each run)",
            ", ".join(f"{b['round_trips_per_s']:,.0f}" for b in bare),
        ),
        ("bare: CPU us per round trip, server / simulator", f"{bare_cpu} / {bare_simulator_cpu}"),
    ]
    for k, figures in per_k.items():
        rows.append(
            (
                f"bridge K={k}: round trips/s, ratio, p50/p99 ms",
                f"{figures['round_trips_per_s']:,.0f}, {figures['ratio_to_bare']}, "
                f"{figures['p50_ms']}/{figures['p99_ms']}",
            )
        )
        rows.append((f"bridge K={k}: CPU us per round trip", figures["cpu_us_per_round_trip"]))
    rows.append((f"best bridge / bare (K={best_k})", results["best_bridge_over_bare"]))
    rows.append(
        (
            "gateway / bare server, CPU per round trip",
            results["gateway_over_bare_server_cpu_per_round_trip"],
        )
    )
    if celery:
        rows.append(
            (
                f"dry-run step path ({args.dry_run_stations} stations), stations/s (median)",
                f"{celery['commands_per_s_median']} {celery['commands_per_s']}",
            )
        )
        rows.append(("  worker CPU ms per station", celery["worker_cpu_ms_per_station"]))
        rows.append(("  s to the first start, stations, to the batch end", celery["phases_s"]))
        assert dry_run_bare is not None
        rows.append(
            (
                f"  bare loop over {args.dry_run_stations} stations, round trips/s",
                dry_run_bare["round_trips_per_s"],
            )
        )
        rows.append(("dry-run step path / bare", results["celery_over_bare"]))
    print_results(f"bridge_throughput, {args.stations} stations", rows, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
