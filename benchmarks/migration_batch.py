"""Migration batch: wall time of migrating N stations from csms-1 to csms-2.

What it measures, for each N in ``--stations`` (default 200 and 1000), on a fresh stack:
a private redis-server, a throwaway SQLite database, two gateways (csms-1, csms-2, both
registered with ``manage.py add_csms``), one Celery worker with 2 prefork children and beat,
and the simulator CLI as a child process (N stations on csms-1, ``--reboot-delay 1``). Once
the inventory shows all N, ``manage.py migrate_fleet --to csms-2 --from csms-1
--max-in-flight 100 --rate-per-minute 0 --wait --json`` is timed from its start to its exit
(so its own start-up and its 0.5 s polling are included; the batch's own span, from its
creation to its end in the database, is reported too). Reports stations/s, the outcome
counts, the tasks the worker ran per station, and the CPU each process spent.

Baseline measured in the same run, before each product run: ``bare_migration.py`` (the
same steps in one asyncio process with two in-script central systems, no Celery, no
database, no Redis) on N stations with the same in-flight limit and reboot delay.
DESIGN targets: >= 25 % (aim 50 %) of the bare script's stations/s; 1000 stations <= 60 s.

    python benchmarks/migration_batch.py [--stations 200,1000] [--profile]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from django.conf import settings

from benchmarks._stack import (
    ROOT,
    Profiler,
    Stack,
    cpu_seconds,
    django_setup,
    inventory_count,
    print_results,
    raise_open_file_limit,
    ratio,
    run_dir,
    worker_task_totals,
)
from devstack.processes import python, wait_until
from ocpp_gateway.simulator.spec import identity_for


def bare_baseline(n: int, args: argparse.Namespace) -> dict[str, Any]:
    out = subprocess.run(
        python(
            str(ROOT / "benchmarks" / "bare_migration.py"),
            *("--stations", str(n), "--in-flight", str(args.in_flight)),
            *("--reboot-delay", str(args.reboot_delay)),
            *("--settle", str(args.settle)),
        ),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=args.timeout,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def product_run(workdir: Path, n: int, args: argparse.Namespace) -> dict[str, Any]:
    with Stack(workdir, f"product-{n}") as stack:
        stack.redis()
        stack.fresh_database()
        django_setup(stack.database, stack.redis_url)
        source = stack.gateway("csms-1", open_admission=True)
        target = stack.gateway("csms-2")
        stack.register("csms-2", [identity_for("SIM-", i, n) for i in range(1, n + 1)])
        # The settle time is a wait both sides do alike (see --settle): the station's own
        # NetworkProfileConnectionTimeoutSec plus a margin would make every run ~35 s a
        # station whatever the engine costs.
        worker = stack.worker(
            concurrency=args.concurrency, MIGRATION_SETTLE_SECONDS=str(args.settle)
        )
        simulator = stack.simulator(
            "fleet", source.url, n, "--reboot-delay", str(args.reboot_delay)
        )
        wait_until(
            lambda: inventory_count("csms-1") >= n,
            60 + n / 20,
            f"{n} stations in the inventory",
            interval=0.25,
        )
        time.sleep(1.0)
        sessions = {
            "worker": worker.pid,
            "gateway-1": source.proc.pid,
            "gateway-2": target.proc.pid,
            "simulator": simulator.pid,
            "redis": stack.procs["redis"].pid,
        }
        cpu_before = {name: cpu_seconds(pid) for name, pid in sessions.items()}
        tasks_before = worker_task_totals(stack.redis_url)
        profiled = {
            "worker": worker.pid,
            "gateway-1": source.proc.pid,
            "gateway-2": target.proc.pid,
        }
        profiler = Profiler(stack.workdir, profiled, enabled=args.profile, idle=args.profile_idle)
        with profiler:
            started = time.monotonic()
            out = stack.manage(
                "migrate_fleet",
                *("--to", "csms-2", "--from", "csms-1"),
                *("--max-in-flight", str(args.in_flight), "--rate-per-minute", "0"),
                *("--wait", "--json"),
                check=False,
                timeout=args.timeout,
            )
            wall = time.monotonic() - started
            cpu = {
                name: round(cpu_seconds(pid) - cpu_before[name], 2)
                for name, pid in sessions.items()
            }
            tasks_after = worker_task_totals(stack.redis_url)
        profiler.report(20)
        if out.returncode not in (0, 1):
            raise RuntimeError(f"migrate_fleet exited {out.returncode}: {out.stderr[-2000:]}")
        report = json.loads(out.stdout)
        details = batch_details(report["batch"])
        on_target = inventory_count("csms-2")
    done = report["counts"].get("done", 0)
    tasks = {
        name: count - tasks_before.get(name, 0)
        for name, count in sorted(tasks_after.items())
        if count > tasks_before.get(name, 0)
    }
    return {
        "wall_s": round(wall, 2),
        "stations_per_s": round(n / wall, 1),
        "counts": report["counts"],
        "exit_code": out.returncode,
        "connected_on_csms_2": on_target,
        **details,
        "tasks": tasks,
        "tasks_per_station": round(sum(tasks.values()) / n, 2),
        "cpu_s": cpu,
        "worker_cpu_ms_per_station": round(1000 * cpu["worker"] / max(1, done), 1),
    }


def batch_details(batch_id: int) -> dict[str, Any]:
    """From the database: the batch's own span, per-station durations and dwell times."""
    from django.db import connections

    from migrations_app.models import MigrationBatch, OcppExchange, StateChange

    try:
        batch = MigrationBatch.objects.get(id=batch_id)
        durations = sorted(
            (m.finished_at - m.started_at).total_seconds()
            for m in batch.stations.exclude(started_at=None).exclude(finished_at=None)
        )
        stations = batch.stations.count()
        dwell = state_dwell(batch)
        exchanges = OcppExchange.objects.filter(migration__batch=batch).count()
        changes = StateChange.objects.filter(migration__batch=batch).count()
        span = (batch.finished_at - batch.created_at).total_seconds() if batch.finished_at else None
    finally:
        connections.close_all()
    return {
        "batch_span_s": round(span, 2) if span else None,
        "station_s_median": round(statistics.median(durations), 2) if durations else None,
        "station_s_p90": round(durations[int(0.9 * (len(durations) - 1))], 2)
        if durations
        else None,
        "state_dwell_s_median": dwell,
        "ocpp_exchanges_per_station": round(exchanges / max(1, stations), 2),
        "state_changes_per_station": round(changes / max(1, stations), 2),
    }


def state_dwell(batch: Any) -> dict[str, float]:
    """Median seconds a station spent in each state (queueing for its task included)."""
    from migrations_app.models import StateChange

    rows = (
        StateChange.objects.filter(migration__batch=batch)
        .order_by("migration_id", "at", "id")
        .values_list("migration_id", "from_state", "at")
    )
    spans: dict[str, list[float]] = {}
    previous: tuple[int, Any] | None = None
    for migration_id, from_state, at in rows:
        if previous is not None and previous[0] == migration_id:
            spans.setdefault(from_state, []).append((at - previous[1]).total_seconds())
        previous = (migration_id, at)
    return {state: round(statistics.median(values), 2) for state, values in spans.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stations", default="200,1000", help="comma list (default 200,1000)")
    parser.add_argument("--in-flight", type=int, default=100, help="default 100")
    parser.add_argument("--reboot-delay", type=float, default=1.0, help="default 1 s")
    parser.add_argument(
        "--settle",
        type=float,
        default=0.0,
        help="seconds a station must stay on the target before it is confirmed, for the "
        "product (MIGRATION_SETTLE_SECONDS) and the baseline alike (default 0)",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        help="worker prefork children (default: the project's CELERY_WORKER_CONCURRENCY)",
    )
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="limit per batch and per baseline, s"
    )
    parser.add_argument("--skip-bare", action="store_true", help="skip the baseline")
    parser.add_argument("--profile", action="store_true", help="py-spy worker and gateways")
    parser.add_argument(
        "--profile-idle", action="store_true", help="with --profile: sample waiting threads too"
    )
    parser.add_argument("--keep", action="store_true", help="keep logs and database")
    args = parser.parse_args(argv)
    sizes = [int(n) for n in args.stations.split(",") if n.strip()]
    if not sizes or min(sizes) < 1:
        parser.error("--stations takes positive sizes")
    raise_open_file_limit()

    runs = []
    with run_dir(args.keep) as workdir:
        for n in sizes:
            bare = None if args.skip_bare else bare_baseline(n, args)
            product = product_run(workdir, n, args)
            runs.append(
                {
                    "stations": n,
                    "bare": bare,
                    "product": product,
                    "product_over_bare": ratio(product["stations_per_s"], bare["stations_per_s"])
                    if bare
                    else None,
                }
            )

    rows: list[tuple[str, Any]] = []
    for run in runs:
        n, product, bare = run["stations"], run["product"], run["bare"]
        rows += [
            (
                f"N={n}: product wall s (batch span s)",
                f"{product['wall_s']} ({product['batch_span_s']})",
            ),
            (f"N={n}: product stations/s", product["stations_per_s"]),
            (f"N={n}: outcomes", product["counts"]),
            (
                f"N={n}: per station median / p90, s",
                f"{product['station_s_median']} / {product['station_s_p90']}",
            ),
            (f"N={n}: tasks per station", f"{product['tasks_per_station']} {product['tasks']}"),
            (f"N={n}: median s in each state", product["state_dwell_s_median"]),
            (f"N={n}: CPU s", product["cpu_s"]),
            (f"N={n}: worker CPU ms per station", product["worker_cpu_ms_per_station"]),
        ]
        if bare:
            rows += [
                (f"N={n}: bare wall s, stations/s", f"{bare['wall_s']}, {bare['stations_per_s']}"),
                (f"N={n}: product / bare", run["product_over_bare"]),
            ]
    results = {
        "benchmark": "migration_batch",
        "in_flight": args.in_flight,
        "reboot_delay": args.reboot_delay,
        "settle_s": args.settle,
        # The project's default when not given: the product runs configured the settings.
        "concurrency": args.concurrency or settings.CELERY_WORKER_CONCURRENCY,
        "runs": runs,
    }
    print_results("migration_batch", rows, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
