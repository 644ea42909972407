"""deploy/systemd: the units pass systemd's own checks and their commands run."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from devstack.processes import ROOT, free_port, wait_until
from tests.deploy.helpers import (
    ETC,
    SYSTEMD,
    VENV_BIN,
    environment_assignments,
    example_env_files,
    exec_argv,
    exec_variables,
    health,
    http_get,
    read_unit,
    specifiers,
    started,
    unit_environment,
)

UNITS = {
    "web": "csms-migrate-web.service",
    "worker": "csms-migrate-worker.service",
    "beat": "csms-migrate-beat.service",
    "gateway": "csms-migrate-gateway@.service",
    "flower": "csms-migrate-flower.service",
}
INSTANCE = "csms-1"  # the instance the template is checked with
CODE = "/opt/csms-migrate"
PYTHON = f"{CODE}/.venv/bin/python"


def unit(name: str):
    return read_unit(SYSTEMD / UNITS[name])


def seconds(value: str) -> float:
    """A systemd time span such as 90, 90s, 2min or 1min 30s."""
    scale = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    parts = re.findall(r"(\d+)\s*([a-z]*)", value)
    assert parts, value
    return sum(int(number) * scale[unit] for number, unit in parts)


def command(
    name: str, instance: str = INSTANCE, **overrides: str
) -> tuple[list[str], dict[str, str]]:
    """The unit's ExecStart as systemd would run it with the example /etc/csms-migrate files,
    the venv's interpreter standing in for /opt/csms-migrate/.venv/bin/python."""
    the_unit = unit(name)
    env = {**unit_environment(the_unit, instance, example_env_files()), **overrides}
    argv = exec_argv(the_unit.get("Service", "ExecStart"), env, instance)
    assert argv[0] == PYTHON
    return [sys.executable, *argv[1:]], env


def test_the_directory_holds_the_five_units():
    assert {path.name for path in SYSTEMD.glob("*.service")} == set(UNITS.values())


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_analyze_verify_finds_nothing_to_report(tmp_path):
    # verify insists that ExecStart's program exists: give it /opt/csms-migrate/.venv here.
    code = tmp_path / "opt" / "csms-migrate"
    code.mkdir(parents=True)
    (code / ".venv").symlink_to(Path(sys.prefix))
    assert (code / ".venv" / "bin" / "python").exists()
    for name in UNITS.values():
        text = (SYSTEMD / name).read_text().replace(CODE, str(code))
        (tmp_path / name).write_text(text)
    names = [name.replace("@.", f"@{INSTANCE}.") for name in UNITS.values()]

    result = subprocess.run(
        ["systemd-analyze", "verify", *names],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )

    # verify exits 0 even for unknown keys and bad values: it only prints them.
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == ""


@pytest.mark.parametrize("name", UNITS)
def test_each_unit_has_the_production_settings(name):
    the_unit = unit(name)
    service = "Service"

    assert the_unit.get(service, "User") == "csms-migrate"
    assert the_unit.get(service, "NoNewPrivileges") == "yes"
    assert the_unit.get(service, "ProtectSystem") == "strict"
    assert the_unit.get(service, "PrivateTmp") == "yes"
    assert the_unit.get(service, "Restart") == "on-failure"
    assert the_unit.get(service, "KillSignal") == "SIGTERM"
    assert the_unit.get(service, "WorkingDirectory") == CODE
    assert "/etc/csms-migrate/env" in the_unit.all(service, "EnvironmentFile")
    assert the_unit.get(service, "ExecStart").startswith(f"{PYTHON} -m ")
    assert the_unit.get("Install", "WantedBy") == "multi-user.target"


def test_web_serves_the_wsgi_application_with_gunicorn():
    exec_start = unit("web").get("Service", "ExecStart")

    assert " -m gunicorn " in exec_start
    assert exec_start.split()[-1] == "fleet.wsgi:application"
    assert "runserver" not in exec_start


def test_the_gateway_has_time_to_close_its_stations_and_descriptors_for_them():
    gateway = unit("gateway")

    assert seconds(gateway.get("Service", "TimeoutStopSec")) >= 60
    assert int(gateway.get("Service", "LimitNOFILE")) >= 65536
    assert "/etc/csms-migrate/gateway-%i.env" in gateway.all("Service", "EnvironmentFile")


def test_beat_writes_its_schedule_to_its_state_directory():
    beat = unit("beat")
    state = beat.get("Service", "StateDirectory")

    assert state
    assert f"--schedule /var/lib/{state}/" in beat.get("Service", "ExecStart")


@pytest.mark.parametrize("name", UNITS)
def test_every_variable_of_a_command_is_set(name):
    the_unit = unit(name)
    env = unit_environment(the_unit, INSTANCE, example_env_files())

    for key in ("ExecStart", "ExecReload"):
        for line in the_unit.all("Service", key):
            missing = exec_variables(line) - set(env) - {"MAINPID"}
            assert not missing, f"{UNITS[name]} {key} uses unset {missing}"


def test_the_example_env_sets_every_setting_the_project_reads():
    settings_source = (ROOT / "fleet" / "settings.py").read_text()
    read = set(re.findall(r"env_(?:str|bool|float|list)\(\s*\"([A-Z_]+)\"", settings_source))
    env = unit_environment(unit("worker"), INSTANCE, example_env_files())

    missing = read - {"DEBUG", "TEST_SQLITE_PATH"} - set(env)

    assert not missing, f"add {sorted(missing)} to {ETC / 'env'}"
    assert "DEBUG" not in env


@pytest.mark.parametrize("name", ["web", "worker", "beat", "flower"])
def test_each_command_runs_with_help(name):
    """The interpreter, the module and every option before --help are accepted."""
    argv, env = command(name)

    result = subprocess.run(
        [*argv, "--help"],
        cwd=ROOT,
        env={**env, "PATH": str(VENV_BIN)},
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 0, result.stderr
    assert "usage" in result.stdout.lower()


def test_the_gateway_instance_serves_with_its_password_file(redis_client, redis_url, tmp_path):
    """csms-migrate-gateway@csms-1 run as systemd would: exactly the unit's environment."""
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    port = free_port()
    passwords = tmp_path / "csms-1.passwords"
    passwords.write_text("CP-1:correct-horse-battery-staple\n")
    # Endpoint mode: the example's upstream (real-csms-1.example.com) does not exist here.
    argv, env = command(
        "gateway", REDIS_URL=redis_url, GATEWAY_PORT=str(port), GATEWAY_UPSTREAM_ARGS=""
    )
    assert "--upstream" not in argv
    # The example points --auth-file at /etc/csms-migrate: use the file written above.
    assert argv[argv.index("--auth-file") + 1] == "/etc/csms-migrate/csms-1.passwords"
    argv[argv.index("--auth-file") + 1] = str(passwords)

    log = tmp_path / "gateway.log"
    with started(argv, {**env, "PATH": str(VENV_BIN)}, log) as proc:
        document = wait_until(lambda: health(port), 15, "the gateway's /health")
        assert document["csms"] == "csms-1"

        with pytest.raises(InvalidStatus) as refused:
            connect(f"ws://127.0.0.1:{port}/ocpp/CP-1", subprotocols=["ocpp1.6"]).close()
        assert refused.value.response.status_code == 401

        proc.terminate()  # systemd's KillSignal=SIGTERM, to the main process
        assert proc.wait(timeout=seconds(unit("gateway").get("Service", "TimeoutStopSec"))) == 0
    assert "shutting down" in log.read_text()


@pytest.mark.parametrize("instance", ["csms-1", "csms-2"])
def test_each_example_gateway_proxies_to_its_real_csms(instance):
    argv, _ = command("gateway", instance)

    assert argv[argv.index("--csms") + 1] == instance
    assert argv[argv.index("--upstream") + 1] == f"wss://real-{instance}.example.com/ocpp"
    assert argv.count("--upstream") == 1


def test_without_upstream_args_the_gateway_is_an_endpoint():
    default: dict[str, str] = {}  # Environment= alone: what an instance file leaves out
    for line in unit("gateway").all("Service", "Environment"):
        default.update(environment_assignments(specifiers(line, INSTANCE)))
    argv, _ = command("gateway", GATEWAY_UPSTREAM_ARGS="")

    assert default["GATEWAY_UPSTREAM_ARGS"] == ""
    assert not any(word.startswith("--upstream") for word in argv)
    assert "" not in argv


@pytest.mark.parametrize("instance", ["csms-1", "csms-2"])
def test_the_gateway_accepts_the_example_proxy_flags(instance, tmp_path):
    from ocpp_gateway.__main__ import parse_args

    argv, _ = command("gateway", instance)
    passwords = tmp_path / "passwords"
    passwords.write_text("CP-1:correct-horse-battery-staple\n")
    argv[argv.index("--auth-file") + 1] = str(passwords)  # the example's is in /etc

    config = parse_args(argv[3:])

    assert config.upstream.url == f"wss://real-{instance}.example.com/ocpp"


def test_flower_starts_with_the_example_settings(redis_client, redis_url, tmp_path):
    """FLOWER_* from the example env are all Flower options, and the URL prefix applies."""
    port = free_port()
    argv, env = command("flower", REDIS_URL=redis_url, FLOWER_PORT=str(port))

    with started(argv, {**env, "PATH": str(VENV_BIN)}, tmp_path / "flower.log"):
        answer = wait_until(
            lambda: http_get(f"http://127.0.0.1:{port}/flower/healthcheck"), 20, "Flower"
        )
        assert answer[0] == 200, (tmp_path / "flower.log").read_text()
        # Basic auth is on (FLOWER_BASIC_AUTH): the dashboard refuses anonymous users.
        assert http_get(f"http://127.0.0.1:{port}/flower/")[0] == 401
