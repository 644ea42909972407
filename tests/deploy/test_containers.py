"""deploy/Dockerfile and deploy/compose.yaml, checked without a Docker engine.

compose.yaml is read twice: by a light reader that knows the shape of this file (block
mappings, `- item` lists, one-line JSON lists) for the detailed checks, and fully by PyYAML
(a dev dependency).
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib

import pytest

from devstack.processes import ROOT
from tests.deploy.helpers import DEPLOY, read_env_file

DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "compose.yaml"
SERVICES = {
    "postgres",
    "redis",
    "migrate",
    "web",
    "worker",
    "beat",
    "gateway-csms-1",
    "gateway-csms-2",
    "flower",
}
DATABASE_USERS = {"web", "worker", "beat"}


# --- Dockerfile ---------------------------------------------------------------------------


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined: list[str] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        pending += line
        if pending.strip():
            joined.append(pending.strip())
        pending = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1]) for text in joined]


def test_the_image_is_python_311_slim_and_runs_as_a_user():
    steps = instructions()
    users = [args for kind, args in steps if kind == "USER"]

    assert steps[0] == ("FROM", "python:3.11-slim")
    assert users and users[-1] not in {"root", "0", "0:0"}
    last_user = max(i for i, (kind, _) in enumerate(steps) if kind == "USER")
    assert all(i < last_user for i, (kind, _) in enumerate(steps) if kind == "RUN")


def test_the_image_installs_the_project_and_collects_static_files():
    runs = " ".join(args for kind, args in instructions() if kind == "RUN")

    assert "pip install --no-deps -e ." in runs
    assert "manage.py collectstatic --noinput" in runs
    for kind, args in instructions():
        if kind == "COPY":
            *sources, _ = args.split()
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: not in the repository"


def test_the_dependency_step_lists_what_pyproject_declares(tmp_path):
    (run,) = [args for kind, args in instructions() if kind == "RUN" and "tomllib" in args]
    script = re.search(r'python -c "(.+?)" > /tmp/requirements.txt', run).group(1)
    shutil.copy(ROOT / "pyproject.toml", tmp_path)

    listed = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout.splitlines()

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert listed == declared


def test_collectstatic_needs_nothing_but_a_secret_key(tmp_path):
    """The build runs collectstatic with no database, Redis or settings beyond SECRET_KEY."""
    for package in ("fleet", "migrations_app", "ocpp_gateway"):
        shutil.copytree(
            ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    shutil.copy(ROOT / "manage.py", tmp_path)
    env = {"PATH": "/usr/bin:/bin", "SECRET_KEY": "collectstatic-only"}

    result = subprocess.run(
        [sys.executable, "manage.py", "collectstatic", "--noinput", "--verbosity", "0"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 0, result.stderr
    assert (tmp_path / "var" / "static" / "admin" / "css" / "base.css").exists()


def test_the_build_context_leaves_out_local_state():
    ignored = {
        line.strip()
        for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }

    assert {".git", ".venv", "var", "db.sqlite3*"} <= ignored
    assert not {"pyproject.toml", "README.md", "manage.py", "fleet"} & ignored


def test_the_default_command_is_gunicorn_on_the_wsgi_application():
    (cmd,) = [args for kind, args in instructions() if kind == "CMD"]
    argv = json.loads(cmd)

    assert argv[:3] == ["python", "-m", "gunicorn"]
    assert argv[-1] == "fleet.wsgi:application"


# --- compose.yaml -------------------------------------------------------------------------


def blocks(lines: list[str], indent: int) -> dict[str, list[str]]:
    """The keys at this indentation and the lines under each."""
    found: dict[str, list[str]] = {}
    current = None
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        depth = len(line) - len(line.lstrip(" "))
        if depth == indent:
            key = line.strip().split(":", 1)[0]
            assert key not in found, f"{key} twice at indent {indent}"
            found[key] = [line]
            current = key
        elif depth > indent and current is not None:
            found[current].append(line)
        else:
            assert depth > indent, f"unexpected indentation: {line!r}"
    return found


def services() -> dict[str, list[str]]:
    top = blocks(COMPOSE.read_text().splitlines(), 0)
    return blocks(top["services"][1:], 2)


def value(service_lines: list[str], key: str) -> str | None:
    for line in service_lines:
        match = re.match(rf"^ {{4}}{re.escape(key)}:\s*(.*)$", line)
        if match:
            return match.group(1)
    return None


def json_list(service_lines: list[str], key: str) -> list[str]:
    """A one-line flow list, e.g. command: ["python", "-m", ...]. Strictly JSON."""
    text = " ".join(service_lines)
    match = re.search(rf"\b{key}: (\[.*?\])(?:\s|$)", text)
    assert match, f"no {key} list"
    return json.loads(match.group(1))


def interpolate(text: str, env: dict[str, str] | None = None) -> str:
    """compose's ${VAR}, ${VAR:-default} and ${VAR:+replacement} (nested), from ``env``."""
    env = env or {}
    out, i = [], 0
    while i < len(text):
        if text.startswith("$$", i):
            out.append("$")
            i += 2
            continue
        if not text.startswith("${", i):
            out.append(text[i])
            i += 1
            continue
        depth, end = 0, i
        for end in range(i, len(text)):
            depth += text.startswith("${", end) - (text[end] == "}")
            if text[end] == "}" and depth == 0:
                break
        body = text[i + 2 : end]
        match = re.match(r"([A-Za-z_][A-Za-z0-9_]*)(:[-+?])?(.*)$", body)
        assert match is not None, f"not a variable: ${{{body}}}"
        name, operator, operand = match.groups()
        value = env.get(name, "")
        if operator == ":-":
            out.append(value or interpolate(operand, env))
        elif operator == ":+":
            out.append(interpolate(operand, env) if value else "")
        else:
            out.append(value)
        i = end + 1
    return "".join(out)


def compose_command(service_lines: list[str], env: dict[str, str]) -> list[str]:
    """A string-form command as compose runs it: interpolated, then split into words."""
    command = value(service_lines, "command")
    assert command and not command.startswith("["), "expected a string command"
    return shlex.split(interpolate(command, env))


def depends_on(service_lines: list[str]) -> dict[str, str]:
    conditions: dict[str, str] = {}
    under = False
    name = None
    for line in service_lines[1:]:
        depth = len(line) - len(line.lstrip(" "))
        if depth == 4:
            under = line.strip() == "depends_on:"
            continue
        if under and depth == 6:
            name = line.strip().rstrip(":")
            conditions[name] = ""
        elif under and depth == 8 and line.strip().startswith("condition:"):
            assert name is not None, "a condition before its service"
            conditions[name] = line.split(":", 1)[1].strip()
    return conditions


def test_compose_is_spaces_only_and_declares_every_service():
    text = COMPOSE.read_text()

    assert "\t" not in text
    assert set(services()) == SERVICES


def test_redis_keeps_its_data_in_an_append_only_file_on_a_volume():
    redis = services()["redis"]

    command = json_list(redis, "command")
    assert command[command.index("--appendonly") + 1] == "yes"
    assert any(line.strip() == "- redis-data:/data" for line in redis)
    assert "redis-cli ping" in " ".join(redis)


def test_postgres_keeps_its_data_on_a_volume_and_reports_ready():
    postgres = services()["postgres"]

    assert any(line.strip() == "- postgres-data:/var/lib/postgresql/data" for line in postgres)
    assert "pg_isready" in " ".join(postgres)
    volumes = blocks(COMPOSE.read_text().splitlines(), 0)["volumes"]
    assert {line.strip().rstrip(":") for line in volumes[1:]} == {"postgres-data", "redis-data"}


def test_the_database_users_wait_for_the_one_shot_migrate():
    all_services = services()
    migrate = all_services["migrate"]

    assert json_list(migrate, "command") == ["python", "manage.py", "migrate", "--noinput"]
    assert value(migrate, "restart") == '"no"'
    assert depends_on(migrate) == {"postgres": "service_healthy"}
    for name in DATABASE_USERS:
        assert depends_on(all_services[name])["migrate"] == "service_completed_successfully"
    for name, lines in all_services.items():
        assert set(depends_on(lines)) <= SERVICES, name


@pytest.mark.parametrize("name", ["gateway-csms-1", "gateway-csms-2"])
def test_each_gateway_listens_where_its_healthcheck_and_port_point(name):
    from ocpp_gateway.__main__ import parse_args

    lines = services()[name]
    command = compose_command(lines, env={})
    assert command[:3] == ["python", "-m", "ocpp_gateway"]

    config = parse_args(command[3:])

    assert config.csms == name.removeprefix("gateway-")
    assert config.host == "0.0.0.0"
    assert f"http://127.0.0.1:{config.port}/health" in " ".join(json_list(lines, "test"))
    assert any(line.strip() == f'- "127.0.0.1:{config.port}:{config.port}"' for line in lines)
    assert int(re.match(r"(\d+)s$", value(lines, "stop_grace_period")).group(1)) >= 60
    assert "nofile:" in " ".join(lines)


def example_env() -> dict[str, str]:
    return read_env_file(DEPLOY / "compose.env.example")


@pytest.mark.parametrize("csms", ["csms-1", "csms-2"])
def test_each_gateway_proxies_to_the_upstream_of_the_example_env(csms):
    number = csms.split("-")[1]
    upstream = example_env()[f"CSMS_{number}_UPSTREAM"]

    command = compose_command(services()[f"gateway-{csms}"], example_env())

    assert upstream == f"wss://real-csms-{number}.example.com/ocpp"
    assert command[command.index("--upstream") + 1] == upstream
    assert command.count("--upstream") == 1


def test_an_empty_upstream_is_endpoint_mode_with_no_empty_word():
    for name in ("gateway-csms-1", "gateway-csms-2"):
        env = {**example_env(), "CSMS_1_UPSTREAM": "", "CSMS_2_UPSTREAM": ""}
        command = compose_command(services()[name], env)

        assert "--upstream" not in command
        assert "" not in command


@pytest.mark.parametrize("csms", ["csms-1", "csms-2"])
def test_the_gateway_accepts_the_proxy_command(csms):
    from ocpp_gateway.__main__ import parse_args

    command = compose_command(services()[f"gateway-{csms}"], example_env())

    config = parse_args(command[3:])

    assert config.upstream.url == example_env()[f"CSMS_{csms.split('-')[1]}_UPSTREAM"]


def test_web_healthcheck_asks_for_the_admin_login_page():
    from django.urls import resolve

    lines = services()["web"]
    test = " ".join(json_list(lines, "test"))
    path = re.search(r"http://127\.0\.0\.1:8000(/\S*?)'", test).group(1)

    assert path == "/admin/login/"
    assert resolve(path).url_name == "login"
    assert json_list(lines, "command")[-1] == "fleet.wsgi:application"


def test_celery_commands_are_the_fleet_app():
    all_services = services()
    for name, role in (("worker", "worker"), ("beat", "beat"), ("flower", "flower")):
        command = [interpolate(word) for word in json_list(all_services[name], "command")]
        assert command[:6] == ["python", "-m", "celery", "-A", "fleet", role], name


def test_the_app_services_build_the_image_from_the_repository():
    top = blocks(COMPOSE.read_text().splitlines(), 0)
    anchor = " ".join(top["x-app"])

    assert "context: .." in anchor
    assert "dockerfile: deploy/Dockerfile" in anchor
    assert (DEPLOY / ".." / "deploy" / "Dockerfile").resolve() == DOCKERFILE.resolve()
    for name in SERVICES - {"postgres", "redis"}:
        assert services()[name][1].strip() == "<<: *app", name


def test_compose_parses_as_yaml():
    import yaml

    document = yaml.safe_load(COMPOSE.read_text())

    assert set(document["services"]) == SERVICES
    assert document["services"]["migrate"]["restart"] == "no"
    assert document["services"]["web"]["build"]["dockerfile"] == "deploy/Dockerfile"
    assert document["services"]["flower"]["environment"]["REDIS_URL"] == "redis://redis:6379/0"
    assert (
        "${CSMS_1_UPSTREAM:+--upstream ${CSMS_1_UPSTREAM}}"
        in (document["services"]["gateway-csms-1"]["command"])
    )
