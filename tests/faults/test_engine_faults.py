"""Engine faults injected into running batches, judged by the stations' own truth.

Real processes throughout: a private redis-server (restartable on its port, without
persistence, so it comes back empty), gateways, Celery workers, simulated stations over
real sockets, and migrate_fleet itself as a subprocess (its --wait must stay bounded).
Judged with tests/faults/ground_truth.py: at most one Reset per station, every station
ended with a reason, every reported outcome equal to where the station really is.
"""

from __future__ import annotations

import functools
import glob
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import celery
import psycopg
import pytest
import redis

from devstack import processes
from devstack.processes import (
    ROOT,
    free_port,
    gateway_args,
    port_open,
    python,
    redis_pings,
    redis_server_args,
    stop,
    wait_until,
    worker,
)
from fleet.models import CsmsBackend
from fleet.services.inventory import csms_backend_upsert
from migrations_app.models import MigrationBatch, StationMigration
from migrations_app.services import liveness, workflow
from migrations_app.services.controls import batch_cancel
from ocpp_gateway.simulator.fleet import Fleet
from ocpp_gateway.simulator.spec import Timing
from tests.conftest import process_env
from tests.faults.ground_truth import judge
from tests.migrations_app.conftest import WORKER_ENV, Stack, wait_batch
from tests.ocpp_gateway.test_gateway import health

State = StationMigration.State
# The lease as in production: a test that ends well before it proves the fast path.
PRODUCTION_LEASE = {**WORKER_ENV, "MIGRATION_STEP_LEASE_SECONDS": "90"}


class Server:
    """A process that can be SIGKILLed and started again on the same port."""

    def __init__(self, args: list[str], log: Path, ready, what: str, env=None) -> None:
        self.args, self.log, self.ready, self.what = args, log, ready, what
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self) -> None:
        self.proc = processes.start(self.args, env=self.env, log=self.log)
        processes.wait_serving(self.proc, self.ready, 15, self.what, self.log)

    def kill(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def close(self) -> None:
        if self.proc is not None:
            stop(self.proc)


@pytest.fixture
def private_redis(tmp_path) -> Iterator[Server]:
    port = free_port()
    args = redis_server_args(port, tmp_path)
    client = redis.Redis.from_url(f"redis://127.0.0.1:{port}/0")
    server = Server(args, tmp_path / "redis.log", lambda: redis_pings(client), "redis-server")
    server.url = f"redis://127.0.0.1:{port}/0"
    server.start()
    yield server
    server.close()


@pytest.fixture
def redis_url(private_redis) -> Iterator[str]:
    """This module's tests kill their Redis: each gets its own, not the session's."""
    from fleet.celery import app

    session_url = app.conf.broker_url
    app.conf["broker_url"] = private_redis.url
    yield private_redis.url
    app.conf["broker_url"] = session_url


def restartable_gateway(csms: str, redis_url: str, tmp_path: Path, *extra: str) -> Server:
    """A gateway on a fixed port, so that it can be SIGKILLed and started again there."""
    port = free_port()
    gateway = Server(
        gateway_args(csms, port, *extra),
        tmp_path / f"gateway-{csms}.log",
        lambda: port_open(port),
        f"gateway {csms} to listen",
        env={"REDIS_URL": redis_url},
    )  # fmt: skip
    gateway.url = f"ws://127.0.0.1:{port}/ocpp"
    gateway.start()
    return gateway


@pytest.fixture
def gateways(transactional_db, redis_client, redis_url, tmp_path) -> Iterator[dict]:
    """csms-1 (a lab: --open) and csms-2 (registered only), each restartable."""
    source = restartable_gateway("csms-1", redis_url, tmp_path, "--open")
    target = restartable_gateway("csms-2", redis_url, tmp_path)
    csms_backend_upsert(name="csms-1", url=source.url, open_admission=True)
    csms_backend_upsert(name="csms-2", url=target.url)
    yield {
        "source": source.url,
        "target": target.url,
        "source_gateway": source,
        "target_gateway": target,
        "redis_url": redis_url,
    }
    target.close()
    source.close()


def stack_of(gateways, start_worker, *, beat: bool, env=WORKER_ENV, name="w1") -> Stack:
    worker, _ = start_worker(name, beat=beat, **env)
    return Stack(
        gateways["source"],
        gateways["target"],
        start_worker,
        worker,
        redis=redis.Redis.from_url(gateways["redis_url"]),
        target=CsmsBackend.objects.get(name="csms-2"),
    )


class Cli:
    """migrate_fleet --wait --json in a subprocess, on this test's Redis and database."""

    def __init__(self, redis_url: str, *args: str, **env: str) -> None:
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            python("manage.py", "migrate_fleet", "--wait", "--json", *args),
            cwd=ROOT,
            env={**os.environ, **process_env(redis_url), **WORKER_ENV, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def result(self, timeout: float) -> tuple[int, dict, str, float]:
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
            # What the stations went through says why the batch did not end.
            history = [
                (m.station.identity, m.state, m.failure_kind, m.reason)
                for m in StationMigration.objects.select_related("station").order_by("id")
            ]
            raise AssertionError(f"--wait ran past {timeout}s: {err[-2000:]}\n{history}") from None
        report = json.loads(out) if out.strip() else {}
        return self.proc.returncode, report, err, time.monotonic() - self.started


def some_in(*states: str, at_least: int):
    def check() -> bool:
        return StationMigration.objects.filter(state__in=states).count() >= at_least

    return check


def test_the_whole_worker_sigkilled_mid_batch_is_replaced_well_within_the_lease(
    gateways, start_worker, redis_url
):
    stack = stack_of(gateways, start_worker, beat=False, env=PRODUCTION_LEASE)
    specs = [stack.station(f"CP-WK{i:02}") for i in range(16)]
    with stack.fleet(specs, reboot_delay=1.5) as fleet:
        cli = Cli(
            redis_url, "--to", "csms-2", "--from", "csms-1", "--max-in-flight", "8",
            "--rate-per-minute", "0", "--boot-timeout", "60",
        )  # fmt: skip
        wait_until(some_in(State.RESETTING, State.AWAITING_BOOT, at_least=3), 60, "resets")
        os.killpg(stack.worker.pid, signal.SIGKILL)  # the main process and its children
        stack.worker.wait(10)
        killed_at = time.monotonic()
        stack.start_worker("w2", beat=False, **PRODUCTION_LEASE)
        code, report, err, _ = cli.result(timeout=180)
        took = time.monotonic() - killed_at
        assert report, err
        assert code == 0, [e for e in report["stations"] if e["state"] != "done"]
        # Well under the 90 s lease: the new worker re-sent the dead one's tasks.
        assert took < 60, f"the batch took {took:.0f}s after the kill"
        judge(report, fleet, stack, rollback_through=None)
        assert {e["state"] for e in report["stations"]} == {"done"}


@pytest.mark.skipif(
    celery.__version__.startswith("5.7."),
    reason=f"celery {celery.__version__} is installed against the pin celery<5.7 "
    "(pyproject.toml): its reconnect kills the worker on a lost Redis; reinstall the project",
)
def test_redis_sigkilled_and_restarted_empty_mid_batch(
    gateways, start_worker, private_redis, redis_url
):
    stack = stack_of(gateways, start_worker, beat=True)
    specs = [stack.station(f"CP-RR{i:02}") for i in range(12)]
    with stack.fleet(specs, reboot_delay=1.5) as fleet:
        # Redis is to die mid-batch, not while csms-2's gateway is still reading the new
        # registrations (it polls every 2 s): with Redis gone it could not look them up,
        # would refuse the reset stations, and they would rightly fall back to csms-1.
        wait_until(
            lambda: health(gateways["target"])["registered"] >= len(specs),
            10,
            "csms-2's gateway to hold the registrations",
        )
        cli = Cli(
            redis_url, "--to", "csms-2", "--from", "csms-1", "--max-in-flight", "6",
            "--rate-per-minute", "0", "--boot-timeout", "40",
        )  # fmt: skip
        wait_until(some_in(State.RESETTING, State.AWAITING_BOOT, at_least=2), 60, "resets")
        private_redis.kill()
        time.sleep(3)
        private_redis.start()
        _, report, err, _ = cli.result(timeout=240)
        assert stack.worker.poll() is None, "the worker died with the broker"
        assert report, err
        judge(report, fleet, stack, rollback_through=None)
        # --wait returns once every station has ended; the batch closes at its next drive.
        wait_batch(MigrationBatch.objects.get(), MigrationBatch.State.FINISHED, timeout=30)


@pytest.mark.slow
def test_the_target_gateway_down_when_the_reset_wave_comes(gateways, start_worker, redis_url):
    """csms-2's gateway is down when the batch starts: stations are armed through csms-1
    but none is reset into the dead target; once it is back, the held ones go on."""
    stack = stack_of(gateways, start_worker, beat=True)
    specs = [stack.station(f"CP-TD{i:02}", profile_timeout=3) for i in range(10)]
    target = gateways["target_gateway"]
    with stack.fleet(specs, reboot_delay=1.0) as fleet:
        # Killed before the batch starts: arming through csms-1 takes milliseconds on a quiet
        # machine, so a kill timed against it would race the first Resets.
        target.kill()
        time.sleep(liveness.GATEWAY_UP_CACHE_SECONDS + 0.5)
        cli = Cli(
            redis_url, "--to", "csms-2", "--from", "csms-1", "--max-in-flight", "5",
            "--rate-per-minute", "0", "--boot-timeout", "60",
        )  # fmt: skip
        held_in_resetting = StationMigration.objects.filter(
            state=State.RESETTING, reset_sent_at=None
        )
        wait_until(lambda: held_in_resetting.count() >= 5, 60, "five stations held at the Reset")
        time.sleep(10)
        assert sum(station.reset_count for station in fleet) == 0
        target.start()
        batch = MigrationBatch.objects.get()
        wait_until(lambda: cli.proc.poll() is not None or paused_and_idle(batch), 180, "an end")
        if paused_and_idle(batch):
            # The default brake stopped the wave; the operator cancels the rest.
            assert batch.pause_reason.startswith("brake:")
            batch_cancel(batch_id=batch.id, user=None)
        _, report, err, _ = cli.result(timeout=120)
        assert report, err
        assert sum(station.reset_count for station in fleet) >= 5
        judge(report, fleet, stack, rollback_through=None)


@pytest.mark.parametrize("which", ["source_gateway", "target_gateway"])
def test_each_gateway_sigkilled_and_restarted_mid_batch(gateways, start_worker, redis_url, which):
    """csms-1's gateway dies while stations are being armed through it, csms-2's while
    stations are booting onto it: each is back 2 s later on its port, and every station
    ends where the report says."""
    stack = stack_of(gateways, start_worker, beat=True)
    specs = [stack.station(f"CP-GK{i:02}", profile_timeout=5) for i in range(8)]
    with stack.fleet(specs, reboot_delay=1.0) as fleet:
        cli = Cli(
            redis_url, "--to", "csms-2", "--from", "csms-1", "--max-in-flight", "4",
            "--rate-per-minute", "0", "--boot-timeout", "60",
        )  # fmt: skip
        if which == "source_gateway":
            busy = (State.READING_CONFIG, State.SETTING_URL, State.SETTING_PRIORITY)
        else:
            busy = (State.AWAITING_BOOT,)
        wait_until(some_in(*busy, at_least=1), 60, f"a station in {busy}")
        gateways[which].kill()
        time.sleep(2)
        gateways[which].start()
        _, report, err, _ = cli.result(timeout=240)
        assert report, err
        judge(report, fleet, stack, rollback_through=None)
        # --wait returns once every station has ended; the batch closes at its next drive.
        wait_batch(MigrationBatch.objects.get(), MigrationBatch.State.FINISHED, timeout=30)


def paused_and_idle(batch: MigrationBatch) -> bool:
    batch.refresh_from_db()
    armed = batch.stations.exclude(state__in=[*workflow.TERMINAL, State.PENDING])
    return batch.state == MigrationBatch.State.PAUSED and not armed.exists()


def test_without_a_beat_a_rate_limited_batch_completes_with_a_worker_alone(
    gateways, start_worker, redis_url
):
    stack = stack_of(gateways, start_worker, beat=False)
    specs = [stack.station(f"CP-NB{i:02}") for i in range(6)]
    with stack.fleet(specs) as fleet:
        cli = Cli(
            redis_url, "--to", "csms-2", "--from", "csms-1", "--rate-per-minute", "12",
            "--boot-timeout", "60",
        )  # fmt: skip
        code, report, err, _ = cli.result(timeout=180)
        assert code == 0, (report, err)
        assert "no beat" in err  # said, not silent
        judge(report, fleet, stack, rollback_through=None)
        assert {e["state"] for e in report["stations"]} == {"done"}
    starts = sorted(MigrationBatch.objects.get().stations.values_list("started_at", flat=True))
    # 12 a minute is 2 per 10 s: six stations need at least 20 s of starts.
    assert (starts[-1] - starts[0]).total_seconds() >= 19


def test_wait_with_no_worker_at_all_gives_up_within_its_bound_naming_what_is_missing(
    gateways, redis_url, tmp_path
):
    from fleet.models import ChargingStation

    ChargingStation.objects.create(
        identity="CP-ALONE", csms=CsmsBackend.objects.get(name="csms-1"), firmware_version="4.2.85"
    )
    cli = Cli(
        redis_url, "--to", "csms-2", "--station", "CP-ALONE", MIGRATION_WAIT_STALL_SECONDS="5"
    )
    code, _, err, took = cli.result(timeout=60)
    assert code == 3, err
    assert took < 30
    assert "no worker" in err and "no beat" in err and "1 pending" in err
    assert MigrationBatch.objects.get().stations.get().state == State.PENDING


# --- PostgreSQL restarted mid-batch ------------------------------------------------------

PG_BINS = sorted(glob.glob("/usr/lib/postgresql/*/bin"))


class PrivatePostgres:
    """A throwaway PostgreSQL cluster of this test's own (never the machine's service)."""

    def __init__(self) -> None:
        if not PG_BINS or not shutil.which("runuser"):
            pytest.skip("no PostgreSQL server binaries in /usr/lib/postgresql/*/bin (or runuser)")
        if os.geteuid() != 0:
            pytest.skip("running PostgreSQL as the postgres user needs root (runuser)")
        self.bin = Path(PG_BINS[-1])
        self.dir = Path(tempfile.mkdtemp(prefix="engine-pg-"))
        shutil.chown(self.dir, "postgres", "postgres")
        self.port = free_port()
        data = str(self.dir / "data")
        self._as_postgres([str(self.bin / "initdb"), "-D", data, "-A", "trust", "-U", "postgres"])
        self.server = Server(
            [
                "runuser", "-u", "postgres", "--", str(self.bin / "postgres"),
                "-D", str(self.dir / "data"), "-p", str(self.port), "-k", str(self.dir),
                "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
            ],
            self.dir / "postgres.log", self._answers, "PostgreSQL to accept connections",
        )  # fmt: skip
        self.url = f"postgres://postgres@127.0.0.1:{self.port}/csms"

    def _as_postgres(self, args: list[str]) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *args], check=True, capture_output=True)

    def _answers(self) -> bool:
        try:
            with psycopg.connect(self.dsn("postgres"), connect_timeout=1):
                return True
        except psycopg.OperationalError:
            return False

    def dsn(self, db: str = "csms") -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={db}"

    def start(self) -> None:
        self.server.start()

    def restart(self, down: float) -> None:
        """A fast shutdown (what a service restart does), a pause, and up again."""
        assert self.server.proc is not None
        os.killpg(self.server.proc.pid, signal.SIGINT)
        self.server.proc.wait(30)
        time.sleep(down)
        self.server.start()

    def query(self, sql: str) -> list[tuple]:
        try:
            with psycopg.connect(self.dsn(), connect_timeout=2) as conn:
                return conn.execute(sql).fetchall()
        except psycopg.OperationalError:
            return []

    def close(self) -> None:
        self.server.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    server = PrivatePostgres()
    server.start()
    with psycopg.connect(server.dsn("postgres"), autocommit=True) as conn:
        conn.execute("CREATE DATABASE csms")
    yield server
    server.close()


@pytest.mark.slow
def test_postgresql_restarted_mid_batch(private_postgres, start_gateway, redis_url, tmp_path):
    pg = private_postgres
    env = {
        **os.environ, **WORKER_ENV, "REDIS_URL": redis_url, "DATABASE_URL": pg.url,
        "DJANGO_SETTINGS_MODULE": "fleet.settings", "DEBUG": "1",
    }  # fmt: skip
    manage = functools.partial(subprocess.run, cwd=ROOT, env=env, check=True, capture_output=True)
    manage(python("manage.py", "migrate", "--no-input"))
    source_url, target_url = start_gateway("csms-1", "--open"), start_gateway("csms-2")
    manage(python("manage.py", "add_csms", "csms-1", source_url, "--open"))
    manage(python("manage.py", "add_csms", "csms-2", target_url))
    log = tmp_path / "worker-pg.log"
    stack = Stack(source_url, target_url, None, None, None, None)
    specs = [stack.station(f"CP-PG{i:02}") for i in range(10)]
    registrations = tmp_path / "registrations.csv"
    registrations.write_text(
        "identity,serial_number\n" + "".join(f"{s.identity},{s.serial_number}\n" for s in specs)
    )
    manage(python("manage.py", "import_registrations", "csms-2", str(registrations)))
    timing = Timing(reboot_delay=1.5, retry_interval=0.2, reconnect_delay=0.3)
    with worker("pg", env=env, log=log), Fleet(specs, timing=timing) as fleet:
        wait_until(
            lambda: (
                pg.query(
                    "SELECT count(*) FROM fleet_chargingstation "
                    "WHERE connected AND firmware_version <> ''"
                )
                == [(10,)]
            ),
            60,
            "every station in the inventory",
        )
        cli = Cli(
            redis_url, "--to", "csms-2", "--from", "csms-1", "--max-in-flight", "5",
            "--rate-per-minute", "0", "--boot-timeout", "60", DATABASE_URL=pg.url,
        )  # fmt: skip
        wait_until(
            lambda: (pg.query(
                "SELECT count(*) FROM migrations_app_stationmigration "
                "WHERE state IN ('resetting', 'awaiting_boot', 'setting_priority')"
            ) or [(0,)])[0][0] >= 2,
            60,
            "stations mid-migration",
        )  # fmt: skip
        pg.restart(down=3)
        code, report, err, _ = cli.result(timeout=240)
        assert report, err
        assert code == 0, report
        judge(report, fleet, stack, rollback_through=None)
        assert {e["state"] for e in report["stations"]} == {"done"}
    assert pg.query("SELECT state FROM migrations_app_migrationbatch") == [("finished",)]
