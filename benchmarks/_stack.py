"""Shared plumbing of the benchmarks: private servers, /proc readings, bare OCPP baselines.

Every server a benchmark starts binds 127.0.0.1 on a free port, logs under the run's
temporary directory and is stopped (SIGTERM to its process group, then SIGKILL) when the
``Stack`` block ends. The processes are started as the demo and the tests start them
(``devstack/processes.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from devstack.processes import (  # noqa: E402 - importable once ROOT is on the path
    Processes,
    free_port,
    python,
)
from ocpp_gateway.simulator.spec import StationSpec  # noqa: E402

# Quiet servers: per-task and per-frame log lines would be part of what is measured.
LOG_LEVEL = "WARNING"
QUIET_SIMULATOR = ("--status-every", "0", "--log-level", LOG_LEVEL)


# --- the run's directory and the benchmark process ---------------------------------------


@contextlib.contextmanager
def run_dir(keep: bool = False) -> Iterator[Path]:
    """A temporary directory for logs and the database; kept when the run fails or `keep`."""
    path = Path(tempfile.mkdtemp(prefix="csms-bench-"))
    ok = False
    try:
        yield path
        ok = True
    finally:
        if ok and not keep:
            shutil.rmtree(path, ignore_errors=True)
        else:
            print(f"logs kept in {path}", file=sys.stderr)


def raise_open_file_limit() -> None:
    """Children inherit the limit: lift the soft one to the hard one (one fd per station)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 65536 if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


# PostgreSQL instead of the run's SQLite file, e.g. postgres://postgres@127.0.0.1:5432/bench
# (the database is dropped and created again for each stack).
BENCH_DATABASE_URL = os.environ.get("BENCH_DATABASE_URL", "")


def database_url(database: Path) -> str:
    return BENCH_DATABASE_URL or f"sqlite:///{database}"


def django_setup(database: Path, redis_url: str) -> None:
    """Django in the benchmark process, on the run's database.

    Set up once per process: later calls keep the first settings, so every stack of one
    run uses the same database path (``Stack.fresh_database`` empties it).
    """
    os.environ.update(
        {
            "DATABASE_URL": database_url(database),
            "REDIS_URL": redis_url,
            # Production settings: DEBUG would keep every SQL query in memory.
            "DEBUG": "0",
            "SECRET_KEY": "benchmark-not-secret",
            "LOG_LEVEL": LOG_LEVEL,
            "DJANGO_SETTINGS_MODULE": "fleet.settings",
        }
    )
    import django
    from django.apps import apps

    if not apps.ready:
        django.setup()


def _recreate_postgres(url: str) -> None:
    import psycopg
    from psycopg import sql

    server, name = url.rsplit("/", 1)
    with psycopg.connect(f"{server}/postgres", autocommit=True) as admin:
        database = sql.Identifier(name)
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(database))
        admin.execute(sql.SQL("CREATE DATABASE {}").format(database))


def inventory_count(csms: str) -> int:
    """Stations the inventory shows connected to `csms` with a boot recorded (firmware)."""
    from django.db import connections

    from fleet.models import ChargingStation

    try:
        return (
            ChargingStation.objects.filter(csms__name=csms, connected=True)
            .exclude(firmware_version="")
            .count()
        )
    finally:
        connections.close_all()


# --- /proc readings ------------------------------------------------------------------------


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    """Resident memory of one process (VmRSS, or VmHWM for the peak), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for pid {pid}")


_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(session: int) -> float:
    """User + system CPU seconds of the live processes of a session.

    Every child started through devstack leads its own session (start_new_session), so
    this covers a worker's prefork children and beat too.
    """
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        # fields[0] is the state (field 3 of stat(5)); session is field 6, utime/stime 14/15.
        if int(fields[3]) == session:
            total += int(fields[11]) + int(fields[12])
    return total / _TICKS


# --- the product's servers -----------------------------------------------------------------


@dataclass(frozen=True)
class Gateway:
    csms: str
    port: int
    url: str
    proc: subprocess.Popen


def gateway_stations(port: int) -> int:
    """Connections the gateway holds (its GET /health), or -1 when it does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
            return int(json.load(response)["stations"])
    except (OSError, ValueError, KeyError):
        return -1


class JournalTail:
    """Counts the lines of a growing simulator journal that record one event."""

    def __init__(self, path: Path, event: str = "boot_accepted") -> None:
        self.path = path
        self.count = 0
        self._needle = f'"event":"{event}"'.encode()
        self._offset = 0
        self._partial = b""

    def poll(self) -> int:
        if not self.path.exists():
            return self.count
        with self.path.open("rb") as file:
            file.seek(self._offset)
            chunk = file.read()
        self._offset += len(chunk)
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()
        self.count += sum(1 for line in lines if self._needle in line)
        return self.count


class Stack:
    """Servers for one measurement: a private Redis, a throwaway SQLite database, gateways,
    workers and simulated fleets, stopped in reverse order when the block ends."""

    def __init__(self, workdir: Path, name: str = "stack") -> None:
        self.workdir = workdir / name
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.database = workdir / "db.sqlite3"
        self.redis_url = ""
        self.processes = Processes(self.workdir)
        self.procs = self.processes.procs

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.processes.close()

    @property
    def env(self) -> dict[str, str]:
        return {
            "DATABASE_URL": database_url(self.database),
            "REDIS_URL": self.redis_url,
            # Production settings: DEBUG would keep every SQL query in memory.
            "DEBUG": "0",
            "SECRET_KEY": "benchmark-not-secret",
            "LOG_LEVEL": LOG_LEVEL,
            "DJANGO_SETTINGS_MODULE": "fleet.settings",
        }

    def log(self, name: str) -> Path:
        return self.processes.log(name)

    def start(self, name: str, args: list[str], **env: str) -> subprocess.Popen:
        return self.processes.start(name, args, **{**self.env, **env})

    def redis(self) -> str:
        self.redis_url = self.processes.redis()
        return self.redis_url

    def manage(
        self, *args: str, check: bool = True, timeout: float | None = None
    ) -> subprocess.CompletedProcess:
        return subprocess.run(
            python("manage.py", *args),
            cwd=ROOT,
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            check=check,
            timeout=timeout,
        )

    def fresh_database(self) -> None:
        """Delete the run's database (a previous stack's) and create the tables."""
        from django.db import connections

        with contextlib.suppress(Exception):
            connections.close_all()
        if BENCH_DATABASE_URL:
            _recreate_postgres(BENCH_DATABASE_URL)
        for suffix in ("", "-wal", "-shm"):
            Path(f"{self.database}{suffix}").unlink(missing_ok=True)
        self.manage("migrate", "--verbosity", "0")

    def gateway(self, csms: str, *extra: str, open_admission: bool = False) -> Gateway:
        """`python -m ocpp_gateway --csms NAME`, registered first with `add_csms`.

        ``open_admission``: a lab CSMS that admits any station (`--open` on both);
        otherwise only stations registered on it (see `register`).
        """
        port = free_port()
        url = f"ws://127.0.0.1:{port}/ocpp"
        lab = ["--open"] if open_admission else []
        self.manage("add_csms", csms, url, *lab)
        self.processes.gateway(csms, *lab, *extra, port=port, **self.env)
        return Gateway(csms, port, url, self.procs[f"gateway-{csms}"])

    def register(self, csms: str, identities: list[str]) -> None:
        """Register stations on a CSMS as an operator would: `import_registrations` of a CSV
        with the simulator's serial numbers."""
        path = self.workdir / f"registrations-{csms}.csv"
        rows = [
            f"{identity},{StationSpec(identity=identity, url='ws://x').serial_number}"
            for identity in identities
        ]
        path.write_text("identity,serial_number\n" + "\n".join(rows) + "\n")
        self.manage("import_registrations", csms, str(path))

    def worker(
        self, name: str = "worker", *, concurrency: int | None = 2, **env: str
    ) -> subprocess.Popen:
        """`celery -A fleet worker --beat` with `concurrency` prefork children (None: the
        project's setting) and env."""
        return self.processes.worker(
            name, concurrency=concurrency, loglevel=LOG_LEVEL, beat=True, **{**self.env, **env}
        )

    def simulator(self, name: str, url: str, count: int, *extra: str) -> subprocess.Popen:
        """The simulator CLI, quiet: `count` stations (SIM-0001...) on `url`."""
        return self.processes.simulator(name, url, count, *QUIET_SIMULATOR, *extra, **self.env)


def worker_task_totals(redis_url: str) -> dict[str, int]:
    """Tasks each worker has run since it started, by name (``celery inspect stats``)."""
    from celery import Celery

    app = Celery("bench", broker=redis_url)
    try:
        stats = app.control.inspect(timeout=2.0).stats() or {}
    finally:
        app.close()
    totals: dict[str, int] = {}
    for worker in stats.values():
        for name, count in (worker.get("total") or {}).items():
            totals[name] = totals.get(name, 0) + count
    return totals


# --- bare OCPP: the baselines' central system ----------------------------------------------


class BareCentralSystem:
    """A bare OCPP 1.6 central system: `websockets` + `ocpp`'s ChargePoint, nothing else.

    Answers BootNotification, Heartbeat and StatusNotification, keeps one ChargePoint per
    station and lets the caller wait for a station's next BootNotification.
    """

    def __init__(self) -> None:
        self.stations: dict[str, Any] = {}
        self.boots = 0
        self._boot_events: dict[str, asyncio.Event] = {}
        self._server: Any = None

    @property
    def url(self) -> str:
        port = self._server.sockets[0].getsockname()[1]
        return f"ws://127.0.0.1:{port}/ocpp"

    def booted(self, identity: str) -> asyncio.Event:
        """Set once the station sends a BootNotification here."""
        return self._boot_events.setdefault(identity, asyncio.Event())

    async def __aenter__(self) -> BareCentralSystem:
        from websockets.asyncio.server import serve

        self._server = await serve(
            self._handle, "127.0.0.1", 0, subprotocols=["ocpp1.6"], compression=None
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._server.close()
        await self._server.wait_closed()

    async def _handle(self, ws: Any) -> None:
        from websockets.exceptions import ConnectionClosed

        identity = ws.request.path.rsplit("/", 1)[-1]
        station = _bare_charge_point_class()(identity, ws, self)
        self.stations[identity] = station
        try:
            await station.start()
        except ConnectionClosed:
            pass
        finally:
            if self.stations.get(identity) is station:
                del self.stations[identity]


_BARE_CLASS: type | None = None


def _bare_charge_point_class() -> type:
    """Defined on first use, so importing this module does not import ocpp."""
    global _BARE_CLASS
    if _BARE_CLASS is not None:
        return _BARE_CLASS
    from ocpp.routing import on
    from ocpp.v16 import ChargePoint, call_result
    from ocpp.v16.enums import Action, RegistrationStatus

    def now() -> str:
        return datetime.now(UTC).isoformat().replace("+00:00", "Z")

    class BareStation(ChargePoint):
        def __init__(self, identity: str, ws: Any, csms: BareCentralSystem) -> None:
            super().__init__(identity, ws)
            self.csms = csms

        @on(Action.boot_notification)
        def on_boot(self, **payload: Any) -> call_result.BootNotification:
            self.csms.boots += 1
            self.csms.booted(self.id).set()
            return call_result.BootNotification(
                current_time=now(), interval=300, status=RegistrationStatus.accepted
            )

        @on(Action.heartbeat)
        def on_heartbeat(self) -> call_result.Heartbeat:
            return call_result.Heartbeat(current_time=now())

        @on(Action.status_notification)
        def on_status(self, **payload: Any) -> call_result.StatusNotification:
            return call_result.StatusNotification()

    _BARE_CLASS = BareStation
    return BareStation


def fast_ocpp() -> Callable[[Any], Any]:
    """The gateway's own library settings (see ocpp_gateway/__main__.py), so a baseline
    differs from the product by architecture only: validation inline, uvloop.

    Returns the runner to use instead of asyncio.run.
    """
    import ocpp.messages

    ocpp.messages.ASYNC_VALIDATION = False
    try:
        import uvloop
    except ImportError:
        return asyncio.run
    return uvloop.run


# --- profiling (py-spy, when installed) -----------------------------------------------------


class Profiler:
    """`py-spy record` on some processes (and their children) while the block runs.

    py-spy is not a dependency of the project: `pip install py-spy` into the venv to use it.
    Writes collapsed stacks (``<name>.txt``) and prints where the samples fall.
    """

    def __init__(
        self,
        outdir: Path,
        pids: dict[str, int],
        *,
        enabled: bool = True,
        rate: int = 100,
        idle: bool = False,
    ) -> None:
        self.enabled = enabled  # off: the block runs unprofiled and report() prints nothing
        self.outdir = outdir
        self.pids = pids
        self.rate = rate
        # Idle: sample waiting threads too, to see where wall time (not CPU) goes. Otherwise
        # only a thread holding the GIL is sampled: py-spy's idle detection counts a worker
        # blocked on a Redis reply as busy (3x the samples its CPU time allows).
        self.idle = idle
        self.files: dict[str, Path] = {}
        self._procs: list[subprocess.Popen] = []

    def __enter__(self) -> Profiler:
        if not self.enabled:
            return self
        spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        for name, pid in self.pids.items():
            out = self.outdir / f"profile-{name}.txt"
            self.files[name] = out
            args = [spy, "record", "--pid", str(pid), "--subprocesses", "--nonblocking"]
            args += ["--rate", str(self.rate), "--function", "--format", "raw"]
            args += ["--output", str(out), "--idle" if self.idle else "--gil"]
            log = (self.outdir / f"py-spy-{name}.log").open("wb")
            self._procs.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT))
            log.close()
        time.sleep(0.5)  # attached before the measured work starts
        return self

    def __exit__(self, *exc_info: object) -> None:
        for proc in self._procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        for proc in self._procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()

    def report(self, top: int = 12) -> None:
        for name, path in self.files.items():
            if path.exists():
                print(f"\nprofile of {name} ({path}):")
                print(summarise_collapsed(path, top))


def summarise_collapsed(path: Path, top: int = 12) -> str:
    """Top functions by own samples and by samples including callees (collapsed stacks)."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_short_frame(frame) for frame in stack.split(";")]
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + count
    if not total:
        return "  (no samples)"
    lines = [f"  {total} samples; own time:"]
    for frame, count in sorted(own.items(), key=lambda item: -item[1])[:top]:
        lines.append(f"    {100 * count / total:5.1f}%  {frame}")
    lines.append("  including callees (project, ocpp, websockets, redis, celery, django):")
    wanted = (
        "ocpp_gateway",
        "fleet/",
        "migrations_app",
        "ocpp/",
        "websockets/",
        "redis/",
        "celery/",
        "kombu/",
        "django/",
    )
    project = [item for item in inclusive.items() if any(w in item[0] for w in wanted)]
    for frame, count in sorted(project, key=lambda item: -item[1])[:top]:
        lines.append(f"    {100 * count / total:5.1f}%  {frame}")
    return "\n".join(lines)


def _short_frame(frame: str) -> str:
    """'func (/long/path/site-packages/pkg/mod.py:12)' -> 'func (pkg/mod.py:12)'."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    for marker in ("site-packages/", str(ROOT) + "/", "lib/python3"):
        if marker in where:
            where = where.split(marker, 1)[1]
    return f"{name} ({where})" if where else name


# --- output --------------------------------------------------------------------------------


def print_results(title: str, rows: Sequence[tuple[str, Any]], results: dict[str, Any]) -> None:
    """A two-column table, then the results as one JSON line (the last line printed)."""
    print(f"\n{title}")
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        text = f"{value:,.2f}" if isinstance(value, float) else str(value)
        print(f"  {label:<{width}}  {text}")
    print(json.dumps(results, separators=(",", ":"), sort_keys=True), flush=True)


def ratio(numerator: float, denominator: float) -> float | None:
    return round(numerator / denominator, 3) if denominator else None
