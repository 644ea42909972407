"""deploy/Procfile: its lines run as honcho runs them (through /bin/sh, variables expanded)."""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import os
import signal
import subprocess
from contextlib import ExitStack

import pytest

from devstack.processes import free_port, group_members, port_open, wait_until
from tests.deploy.helpers import (
    DEPLOY,
    health,
    http_get,
    read_procfile,
    shell_env,
    started,
)

PROCESSES = {"web", "worker", "beat", "gateway-csms-1", "gateway-csms-2", "flower"}


def sh(command: str) -> list[str]:
    return ["/bin/sh", "-c", command]


def test_the_procfile_lists_each_process_once():
    processes = read_procfile()

    assert set(processes) == PROCESSES


def test_web_runs_the_wsgi_application_under_gunicorn():
    web = read_procfile()["web"]

    assert web.split()[0] == "gunicorn"
    assert "runserver" not in (DEPLOY / "Procfile").read_text()
    module, _, attribute = web.split()[-1].partition(":")  # gunicorn's APP_MODULE comes last
    assert (module, attribute) == ("fleet.wsgi", "application")
    assert callable(getattr(importlib.import_module(module), attribute))


def test_beat_keeps_its_schedule_out_of_the_source_tree():
    beat = read_procfile()["beat"]

    assert "--schedule var/" in beat  # var/ is ignored by git


def argv_of(line: str, env: dict[str, str]) -> list[str]:
    """The words /bin/sh makes of a Procfile line (its command replaced by printing them)."""
    result = subprocess.run(
        ["/bin/sh", "-c", f'set -- {line}; printf "%s\\0" "$@"'],
        env=env,
        capture_output=True,
        check=True,
        timeout=10,
    )
    return result.stdout.decode().split("\0")[:-1]


@pytest.mark.parametrize("csms", ["csms-1", "csms-2"])
def test_a_gateway_line_proxies_when_its_upstream_is_set(csms):
    line = read_procfile()[f"gateway-{csms}"]
    variable = f"GATEWAY_{csms.upper().replace('-', '_')}_UPSTREAM"
    # Credentials and an odd character survive as one word.
    upstream = "wss://proxy:pa ss@real-csms.example.com/ocpp"

    proxied = argv_of(line, shell_env(**{variable: upstream}))
    endpoint = argv_of(line, shell_env(**{variable: ""}))

    assert proxied[proxied.index("--upstream") + 1] == upstream
    assert proxied[proxied.index("--csms") + 1] == csms
    assert endpoint == proxied[: proxied.index("--upstream")]
    assert "--upstream" not in argv_of(
        line, {k: v for k, v in shell_env().items() if k != variable}
    )


def test_gateway_lines_serve_health_and_stop_on_sigterm(redis_client, redis_url, tmp_path):
    processes = read_procfile()
    ports = {"gateway-csms-1": free_port(), "gateway-csms-2": free_port()}
    env = shell_env(
        REDIS_URL=redis_url,
        GATEWAY_CSMS_1_PORT=str(ports["gateway-csms-1"]),
        GATEWAY_CSMS_2_PORT=str(ports["gateway-csms-2"]),
    )
    with ExitStack() as stack:
        procs = {
            name: stack.enter_context(started(sh(processes[name]), env, tmp_path / f"{name}.log"))
            for name in ports
        }
        for name, port in ports.items():
            document = wait_until(lambda port=port: health(port), 15, f"{name} /health")
            assert document["status"] == "ok"
            assert document["csms"] == name.removeprefix("gateway-")
            assert document["stations"] == 0
            # Registered-only by default, and nothing registered has been published yet.
            assert document["admission"] == "unknown"

        # SIGTERM to the process group, as honcho and foreman stop a process.
        for proc in procs.values():
            os.killpg(proc.pid, signal.SIGTERM)
        for name, proc in procs.items():
            wait_until(lambda pid=proc.pid: not group_members(pid), 30, f"{name} to exit")
            log = (tmp_path / f"{name}.log").read_text()
            assert "shutting down" in log
            assert "Traceback" not in log, log
            assert not port_open(ports[name])


def test_worker_and_gateway_lines_take_a_station_into_the_inventory(
    transactional_db, redis_client, redis_url, tmp_path
):
    from fleet.models import ChargingStation
    from fleet.services.inventory import csms_backend_upsert
    from tests.conftest import process_env
    from tests.ocpp_gateway.stations import station_on

    processes = read_procfile()
    port = free_port()
    # A lab CSMS: its gateway admits the unregistered station this test boots.
    csms_backend_upsert(name="csms-1", url=f"ws://127.0.0.1:{port}/ocpp", open_admission=True)
    env = shell_env(**process_env(redis_url), GATEWAY_CSMS_1_PORT=str(port), WORKER_CONCURRENCY="1")
    worker_log = tmp_path / "worker.log"
    with (
        started(sh(processes["worker"]), env, worker_log),
        started(sh(processes["gateway-csms-1"]), env, tmp_path / "gateway.log"),
    ):
        wait_until(lambda: b"ready." in worker_log.read_bytes(), 30, "the worker to be ready")
        wait_until(lambda: health(port), 15, "gateway-csms-1 /health")

        async def boot() -> None:
            async with station_on(f"ws://127.0.0.1:{port}/ocpp", "CP-PROCFILE"):
                pass

        asyncio.run(boot())

        station = wait_until(
            lambda: ChargingStation.objects.filter(identity="CP-PROCFILE").first(),
            20,
            "the worker to ingest the station's boot",
        )
        assert station.csms.name == "csms-1"
        assert station.firmware_version == "4.2.85"


def test_web_line_serves_the_admin_login_page(tmp_path):
    port = free_port()
    env = shell_env(
        DEBUG="1",
        DATABASE_URL=f"sqlite:///{tmp_path / 'web.sqlite3'}",
        WEB_PORT=str(port),
        WEB_WORKERS="1",
    )
    with started(sh(read_procfile()["web"]), env, tmp_path / "web.log"):
        answer = wait_until(
            lambda: http_get(f"http://127.0.0.1:{port}/admin/login/"), 20, "gunicorn to answer"
        )
        assert answer[0] == 200, (tmp_path / "web.log").read_text()


def test_a_gateway_line_with_an_upstream_relays_its_stations_there(
    transactional_db, redis_client, redis_url, tmp_path
):
    from fleet.services.inventory import csms_backend_upsert
    from tests.conftest import process_env
    from tests.ocpp_gateway.stations import station_on
    from tests.upstream_csms import UpstreamCsms

    port = free_port()
    with UpstreamCsms.start(boot_status="Accepted") as upstream:
        # Open admission (published to Redis on commit): the upstream has the last word.
        csms_backend_upsert(
            name="csms-2",
            url=f"ws://127.0.0.1:{port}/ocpp",
            open_admission=True,
            upstream_url=upstream.url,
        )
        env = shell_env(
            **process_env(redis_url),
            GATEWAY_CSMS_2_PORT=str(port),
            GATEWAY_CSMS_2_UPSTREAM=upstream.url,
        )
        log = tmp_path / "gateway.log"
        with started(sh(read_procfile()["gateway-csms-2"]), env, log):
            document = wait_until(lambda: health(port), 15, "gateway-csms-2 /health")
            assert (document["mode"], document["upstream"]) == ("proxy", upstream.url)
            wait_until(
                lambda: health(port)["admission"] == "open", 15, "the gateway to read the registry"
            )

            async def boot() -> None:
                async with station_on(f"ws://127.0.0.1:{port}/ocpp", "CP-PROXIED"):
                    pass

            asyncio.run(boot())

            (boot_payload,) = upstream.wait_boots("CP-PROXIED", 1, 10)
            # The station's own BootNotification, relayed unchanged (ocpp hands it over as
            # keyword arguments, so snake_case here).
            assert boot_payload.get("charge_point_vendor") or boot_payload["chargePointVendor"]
            assert "Traceback" not in log.read_text()
