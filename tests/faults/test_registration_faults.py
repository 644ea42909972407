"""A station not registered on the target, in a batch next to registered ones.

The seed's prerequisite is that every station is whitelisted on CSMS 2 before it is moved.
One that is not must be skipped at pre-flight with a reason saying how to register it, and
must not be touched at all: after its reset the target's gateways would refuse it and it
would fall back. The others migrate as usual. Then the operator registers it with the same
file import they used for the others (run as a shell command), which is idempotent for the
stations already there, and the station migrates.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from devstack.processes import ROOT, wait_until
from migrations_app.models import OcppExchange
from ocpp_gateway.envelopes import registry_key, registry_meta_key
from ocpp_gateway.simulator.config import PRIORITY
from tests.conftest import process_env
from tests.faults.ground_truth import differences, judge
from tests.migrations_app.conftest import by_identity, migrate, stack  # noqa: F401 - fixture

NOT_REGISTERED = (
    "not registered on csms-2: register it first "
    "(manage.py import_registrations csms-2 FILE.csv, or the admin)"
)


def import_registrations(redis_url: str, path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "manage.py", "import_registrations", "csms-2", str(path)],
        cwd=ROOT,
        env={**os.environ, **process_env(redis_url)},
        capture_output=True,
        text=True,
        timeout=60,
    )


def write_csv(path: Path, specs) -> Path:
    rows = "".join(f"{spec.identity},{spec.serial_number}\n" for spec in specs)
    path.write_text("identity,serial_number\n" + rows, encoding="utf-8")
    return path


def test_an_unregistered_station_is_skipped_untouched_and_migrates_once_registered(
    stack,  # noqa: F811 - the fixture imported above
    redis_url,
    tmp_path,
):
    registered = [stack.station(f"CP-REG{i}") for i in range(3)]
    stranger = stack.station("CP-STRANGER")
    with stack.fleet([*registered, stranger], register_on_target=False) as fleet:
        # What the operator imported: every station but one.
        whitelist = write_csv(tmp_path / "csms-2.csv", registered)
        done = import_registrations(redis_url, whitelist)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "csms-2: 3 registered (3 new, 0 updated, 0 unchanged)"
        original_priority = fleet["CP-STRANGER"].config[PRIORITY]

        code, report = migrate("--to", "csms-2", "--from", "csms-1")

        entries = by_identity(report)
        assert code == 0, report  # skipped is not failed
        assert {identity: entry["state"] for identity, entry in entries.items()} == {
            "CP-REG0": "done",
            "CP-REG1": "done",
            "CP-REG2": "done",
            "CP-STRANGER": "skipped",
        }
        assert entries["CP-STRANGER"]["reason"] == NOT_REGISTERED
        station = fleet["CP-STRANGER"]
        # Its own record: nothing was written into it and it was never reset.
        assert station.events("config_changed") == []
        assert station.events("reset") == []
        assert station.reset_count == 0
        assert station.connected_url == stack.source_url
        assert station.config[PRIORITY] == original_priority
        assert not OcppExchange.objects.filter(migration__station__identity="CP-STRANGER").exists()
        judge(report, fleet, stack, rollback_through=None)

        # The same file again changes nothing, not even the published registry.
        version = stack.redis.hget(registry_meta_key("csms-2"), "version")
        again = import_registrations(redis_url, whitelist)
        assert again.returncode == 0, again.stderr
        assert again.stdout.strip() == "csms-2: 3 registered (0 new, 0 updated, 3 unchanged)"
        assert stack.redis.hget(registry_meta_key("csms-2"), "version") == version

        # The reason says what to do; doing it lets the station migrate.
        completed = import_registrations(redis_url, write_csv(whitelist, [*registered, stranger]))
        assert completed.stdout.strip() == "csms-2: 4 registered (1 new, 0 updated, 3 unchanged)"
        wait_until(
            lambda: stack.redis.hexists(registry_key("csms-2"), "CP-STRANGER"),
            10,
            "CP-STRANGER in the registry of csms-2",
        )
        code, report = migrate("--to", "csms-2", "--station", "CP-STRANGER")

        assert code == 0, report
        assert by_identity(report)["CP-STRANGER"]["state"] == "done"
        assert station.connected_url == stack.target_url
        assert station.reset_count == 1
        assert (
            differences(report, fleet, source_url=stack.source_url, target_url=stack.target_url)
            == []
        )
