"""Flower, started with the project's settings, shows each step task with its station."""

from __future__ import annotations

import json
import urllib.request

from devstack.processes import free_port, port_open, python, running, wait_until
from tests.conftest import process_env
from tests.migrations_app.conftest import migrate


def test_flower_lists_the_step_tasks_of_a_batch(stack, redis_url, tmp_path):
    port = free_port()
    env = {**process_env(redis_url), "FLOWER_UNAUTHENTICATED_API": "true"}
    args = python(
        "-m", "celery", "-A", "fleet", "flower", f"--port={port}", "--address=127.0.0.1"
    )  # fmt: skip
    with running(args, env=env, log=tmp_path / "flower.log"):
        wait_until(lambda: port_open(port), 30, "Flower to listen")
        with stack.fleet([stack.station("CP-FLOWER")]):
            code, report = migrate("--to", "csms-2", "--station", "CP-FLOWER")
            assert code == 0, report

        def step_tasks():
            url = f"http://127.0.0.1:{port}/api/tasks?limit=200"
            with urllib.request.urlopen(url, timeout=5) as response:
                tasks = json.load(response).values()
            return {t["name"]: t for t in tasks if (t.get("name") or "").startswith("migrations.")}

        tasks = wait_until(
            lambda: (found := step_tasks()) and "migrations.verify_boot" in found and found,
            30,
            "the step tasks in Flower",
        )
    # Pre-flight runs in read_config's task, the registrations in verify_boot's.
    for name in ("migrations.read_config", "migrations.set_url", "migrations.set_priority",
                 "migrations.reset", "migrations.verify_boot"):  # fmt: skip
        assert name in tasks, sorted(tasks)
        assert "CP-FLOWER" in tasks[name]["args"]
        assert tasks[name]["state"] == "SUCCESS"
