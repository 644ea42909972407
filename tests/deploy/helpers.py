"""Read the files in deploy/ the way their tools do, and start what they describe."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path

from devstack.processes import ROOT, running

DEPLOY = ROOT / "deploy"
SYSTEMD = DEPLOY / "systemd"
ETC = SYSTEMD / "etc" / "csms-migrate"
VENV_BIN = Path(sys.executable).parent

# honcho 2.0's Procfile line (foreman's is the same): other lines are ignored silently.
PROCFILE_LINE = re.compile(r"^([A-Za-z0-9_-]+):\s*(.+)$")


def read_procfile(path: Path = DEPLOY / "Procfile") -> dict[str, str]:
    processes: dict[str, str] = {}
    for line in path.read_text().splitlines():
        match = PROCFILE_LINE.match(line)
        if match:
            name, command = match.groups()
            assert name not in processes, f"{name} appears twice in {path}"
            processes[name] = command
        else:
            # Anything that is not a process must be a comment or blank, not a typo that
            # honcho would skip without a word.
            assert not line.strip() or line.startswith("#"), f"unparsed Procfile line: {line!r}"
    return processes


def shell_env(**extra: str) -> dict[str, str]:
    """What honcho gives a Procfile command: our environment, the venv's bin first on PATH."""
    env = {**os.environ, **extra}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


@contextlib.contextmanager
def started(args: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    """Run a process with exactly this environment (as systemd does) until the block ends;
    what a shell line left behind in its group is stopped with it."""
    with running(args, env=env, log=log, inherit_env=False) as proc:
        yield proc


def http_get(url: str) -> tuple[int, Message, bytes] | None:
    """(status, headers, body), or None while nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


def health(port: int) -> dict | None:
    """The gateway's /health document once it answers 200 with JSON, else None."""
    answer = http_get(f"http://127.0.0.1:{port}/health")
    if answer is None or answer[0] != 200:
        return None
    # get_all: the gateway sends websockets' default text/plain and then application/json.
    assert "application/json" in (answer[1].get_all("Content-Type") or [])
    return json.loads(answer[2])


# --- systemd ------------------------------------------------------------------------------


@dataclass
class Unit:
    """A unit file as systemd reads it: sections of (key, value), keys may repeat."""

    path: Path
    sections: dict[str, list[tuple[str, str]]] = field(default_factory=dict)

    def all(self, section: str, key: str) -> list[str]:
        return [value for k, value in self.sections.get(section, []) if k == key]

    def get(self, section: str, key: str) -> str | None:
        values = self.all(section, key)
        return values[-1] if values else None


def read_unit(path: Path) -> Unit:
    unit = Unit(path)
    section = None
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        assert not line.endswith("\\"), f"{path}:{number}: keep directives on one line"
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            unit.sections.setdefault(section, [])
            continue
        assert section is not None, f"{path}:{number}: directive outside a section"
        key, sep, value = line.partition("=")
        assert sep, f"{path}:{number}: expected Key=value"
        unit.sections[section].append((key.strip(), value.strip()))
    return unit


def read_env_file(path: Path) -> dict[str, str]:
    """systemd EnvironmentFile= syntax: KEY=VALUE lines, # comments, optional quotes."""
    values: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key), f"{path}:{number}: {raw!r}"
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        values[key] = value
    return values


def specifiers(text: str, instance: str) -> str:
    return re.sub(r"%([%iI])", lambda m: "%" if m.group(1) == "%" else instance, text)


def environment_assignments(value: str) -> dict[str, str]:
    """Environment=A=1 B=2 (words may be quoted)."""
    pairs = {}
    for word in shlex.split(value):
        key, _, val = word.partition("=")
        pairs[key] = val
    return pairs


def unit_environment(unit: Unit, instance: str, files: dict[str, Path]) -> dict[str, str]:
    """Environment= first, then each EnvironmentFile= in order (files override), as systemd.

    files maps the paths named in the unit (after specifiers) to the files to read instead.
    """
    env: dict[str, str] = {}
    for value in unit.all("Service", "Environment"):
        env.update(environment_assignments(specifiers(value, instance)))
    for value in unit.all("Service", "EnvironmentFile"):
        name = specifiers(value, instance)
        optional = name.startswith("-")
        name = name.lstrip("-")
        if name in files:
            env.update(read_env_file(files[name]))
        else:
            assert optional, f"{unit.path.name}: no example for EnvironmentFile={name}"
    return env


def exec_argv(command: str, env: dict[str, str], instance: str) -> list[str]:
    """ExecStart= as systemd expands it: specifiers, words, then ${VAR} and $VAR."""
    argv: list[str] = []
    for word in shlex.split(specifiers(command, instance)):
        whole = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
        if whole:
            # $VAR alone: split at whitespace, zero or more words.
            argv.extend(env.get(whole.group(1), "").split())
            continue
        argv.append(
            re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: env.get(m.group(1), ""), word)
        )
    return argv


def exec_variables(command: str) -> set[str]:
    """The variables a command line uses, ${VAR} or $VAR."""
    found = re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)", command)
    return {braced or bare for braced, bare in found}


def example_env_files(etc: Path = ETC) -> dict[str, Path]:
    """The example files under deploy/systemd/etc, keyed by the path they are installed at."""
    return {f"/etc/csms-migrate/{path.name}": path for path in sorted(etc.iterdir())}
