"""The demo: a simulated fleet on CSMS 1 migrated to CSMS 2, every part a real process.

Run through `bash scripts/demo` (which installs first). Everything it starts binds 127.0.0.1
on free ports, keeps its data under var/demo/, and is stopped when the demo ends.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Iterator

from devstack.processes import ROOT, Processes, free_port, port_open, python, wait_until
from ocpp_gateway.simulator.spec import StationSpec, identity_for

WORK = ROOT / "var" / "demo"
# The station left out of csms-2's registrations (after the canary wave).
UNREGISTERED = 23


def manage(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(python("manage.py", *args), cwd=ROOT, env=env, check=check)


@contextlib.contextmanager
def demo_stack(args: argparse.Namespace) -> Iterator[tuple[Processes, dict[str, str]]]:
    if WORK.exists():
        shutil.rmtree(WORK)
    WORK.mkdir(parents=True)
    redis_port = free_port()
    env = {
        **os.environ,
        "DEBUG": "1",
        "SECRET_KEY": secrets.token_urlsafe(32),
        "DATABASE_URL": f"sqlite:///{WORK / 'demo.sqlite3'}",
        "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "LOG_LEVEL": "WARNING",
    }
    processes = Processes(WORK, env, stop_timeout=15)
    try:
        # A private Redis: the demo never touches a Redis that holds someone's data.
        processes.redis(port=redis_port)
        yield processes, env
    except (TimeoutError, RuntimeError) as error:  # a process that did not come up
        raise SystemExit(f"demo: {error} (logs in {WORK})") from None
    finally:
        if processes.procs:
            print("demo: stopping")
        processes.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--stations", type=int, default=300, help="fleet size (default 300)")
    parser.add_argument(
        "--exit", action="store_true", help="exit when the batch ends instead of staying up"
    )
    parser.add_argument("--web-port", type=int, default=8000, help="admin port (default 8000)")
    parser.add_argument("--flower-port", type=int, default=5555, help="Flower (default 5555)")
    parser.add_argument(
        "--rate", type=int, default=600, help="stations started per minute (default 600)"
    )
    args = parser.parse_args()
    if args.stations < 20:
        parser.error("--stations must be at least 20")
    for port in (args.web_port, args.flower_port):
        if port_open(port):
            parser.error(f"port {port} is in use: choose another with --web-port/--flower-port")

    with demo_stack(args) as (processes, env):
        print("demo: preparing the database")
        manage(env, "migrate", "--verbosity", "0")
        password = secrets.token_urlsafe(12)
        superuser = [
            "createsuperuser",
            "--noinput",
            "--username",
            "admin",
            "--email",
            "admin@example.com",
        ]
        manage({**env, "DJANGO_SUPERUSER_PASSWORD": password}, *superuser)
        port1, port2 = free_port(), free_port()
        # csms-1 stands in for the operator's current CSMS, which already knows its fleet: a
        # lab CSMS that admits any station (--open). csms-2 admits registered stations only.
        print("demo: csms-1 admits any station (--open, a lab); csms-2 only registered ones")
        for name, port, admission in (("csms-1", port1, ["--open"]), ("csms-2", port2, [])):
            manage(env, "add_csms", name, f"ws://127.0.0.1:{port}/ocpp", *admission)
            processes.gateway(name, *admission, port=port)
        processes.worker("worker", loglevel="WARNING", beat=True)
        web = ["manage.py", "runserver", "--noreload", f"127.0.0.1:{args.web_port}"]
        processes.start("web", python(*web))
        flower_password = secrets.token_urlsafe(8)
        flower = ["-m", "celery", "-A", "fleet", "flower", f"--port={args.flower_port}"]
        flower += ["--address=127.0.0.1", f"--basic-auth=admin:{flower_password}"]
        processes.start("flower", python(*flower))

        n = args.stations
        register_on_csms_2(env, n)
        # A realistic mix: most on current firmware, some too old, and a few awkward ones
        # (placed after the canary wave): one refuses the new URL, one cannot reach CSMS 2
        # and falls back, one is charging for 20 s, one was left out of the registrations.
        fleet = ["--prefix", "DEMO-", "--reboot-delay", "1"]
        fleet += ["--firmware-mix", "4.2.85:80,3.5.54:10,4.2.9:6,3.5.9:4"]
        fleet += ["--profile-timeout", "5", "--reject-url-writes", "17"]
        fleet += ["--target-unreachable", "19", "--charging", "13:20"]
        fleet += ["--journal", str(WORK / "stations.jsonl")]
        processes.simulator("simulator", f"ws://127.0.0.1:{port1}/ocpp", n, *fleet)
        print(f"demo: {n} simulated stations connecting to csms-1 ...")
        wait_until(lambda: _inventory_count(env) >= n, 120, "the fleet in the inventory")

        print_links(args, password, flower_password)
        print(f"demo: migrating csms-1 -> csms-2: canary of 5, then {args.rate} starts/minute")
        started = time.monotonic()
        migrate = ["manage.py", "migrate_fleet", "--to", "csms-2", "--from", "csms-1"]
        migrate += ["--canary", "5", "--rate-per-minute", str(args.rate)]
        migrate += ["--max-in-flight", "50", "--boot-timeout", "60", "--idle-wait", "60"]
        result = subprocess.run(
            python(*migrate, "--wait", "--json"), cwd=ROOT, env=env, stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        took = time.monotonic() - started
        if not result.stdout.strip():
            raise SystemExit(f"demo: migrate_fleet failed (exit {result.returncode})")
        print_summary(json.loads(result.stdout), took)
        if args.exit:
            return 0
        print_links(args, password, flower_password)
        print("demo: up until Ctrl-C")
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
    return 0


def register_on_csms_2(env: dict[str, str], n: int) -> None:
    """What the seed asks before step 1: the stations registered on the new CSMS (all but
    one, to show the skip), with their serial numbers, as an operator's CSV import."""
    identities = [identity_for("DEMO-", i, n) for i in range(1, n + 1)]
    del identities[UNREGISTERED - 1]
    rows = [f"{i},{StationSpec(identity=i, url='ws://x').serial_number}" for i in identities]
    path = WORK / "csms-2-registrations.csv"
    path.write_text("identity,serial_number\n" + "\n".join(rows) + "\n")
    print(f"demo: registering {len(rows)} stations on csms-2 (import_registrations)")
    manage(env, "import_registrations", "csms-2", str(path))


def print_links(args: argparse.Namespace, password: str, flower_password: str) -> None:
    print(f"  admin:   http://127.0.0.1:{args.web_port}/admin/  (admin / {password})")
    print(f"  batches: http://127.0.0.1:{args.web_port}/admin/migrations_app/migrationbatch/")
    print(f"  flower:  http://127.0.0.1:{args.flower_port}/  (admin / {flower_password})")
    print(f"  logs:    {WORK}")


def print_summary(report: dict, took: float) -> None:
    """One line per outcome and reason: what an operator reads first."""
    rows = Counter(
        (entry["state"], entry["step"] if entry["state"] == "failed" else "", entry["reason"])
        for entry in report["stations"]
        if entry["state"] != "done"
    )
    done = report["counts"].get("done", 0)
    print(f"\nBatch {report['batch']}: {len(report['stations'])} stations in {took:.0f}s")
    print(f"  {'STATIONS':>8}  {'OUTCOME':<8}  {'STEP':<14}  REASON")
    print(f"  {done:>8}  {'done':<8}  {'':<14}  migrated and verified on csms-2")
    for (state, step, reason), count in sorted(rows.items(), key=lambda row: -row[1]):
        print(f"  {count:>8}  {state:<8}  {step:<14}  {textwrap.shorten(reason, 110)}")


def _inventory_count(env: dict[str, str]) -> int:
    out = subprocess.run(
        python("manage.py", "list_stations", "--csms", "csms-1", "--json"),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        return 0
    return sum(1 for s in json.loads(out.stdout) if s["connected"] and s["firmware"])


if __name__ == "__main__":
    sys.exit(main())
