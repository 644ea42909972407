"""A whole migration stack per test: Redis, gateways for two CSMS, a worker with its beat,
and simulated stations over real sockets."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from django.core.management import call_command

from fleet.models import ChargingStation, CsmsBackend
from ocpp_gateway.simulator.fleet import Fleet
from ocpp_gateway.simulator.spec import Behaviour, StationSpec, Timing
from tests.processes import wait_for

# Short enough for tests, long enough for a loaded 2-core machine.
WORKER_ENV = {"OCPP_COMMAND_TIMEOUT": "5", "MIGRATION_STEP_LEASE_SECONDS": "8"}


@dataclass
class Stack:
    source_url: str
    target_url: str
    start_worker: Callable
    worker: subprocess.Popen

    def station(self, identity: str, **overrides) -> StationSpec:
        fields = {"url": self.source_url, "profile_timeout": 3, "behaviour": Behaviour()}
        return StationSpec(identity=identity, **{**fields, **overrides})

    @contextlib.contextmanager
    def fleet(self, specs: list[StationSpec], *, reboot_delay: float = 0.5) -> Iterator[Fleet]:
        """Run the stations; wait until the inventory shows each of them connected."""
        timing = Timing(reboot_delay=reboot_delay, retry_interval=0.2, reconnect_delay=0.3)
        with Fleet(specs, timing=timing) as fleet:
            identities = {spec.identity for spec in specs}
            wait_for(
                lambda: (
                    ChargingStation.objects.filter(identity__in=identities, connected=True)
                    .exclude(firmware_version="")
                    .count()
                    == len(identities)
                ),
                30 + len(specs) / 20,
                "every simulated station in the inventory",
            )
            yield fleet


@pytest.fixture
def stack(start_gateway, start_worker) -> Stack:
    source_url = start_gateway("csms-1")
    target_url = start_gateway("csms-2")
    CsmsBackend.objects.create(name="csms-1", url=source_url)
    CsmsBackend.objects.create(name="csms-2", url=target_url)
    worker, _ = start_worker("w1", beat=True, **WORKER_ENV)
    return Stack(source_url, target_url, start_worker, worker)


def migrate(*args: str) -> tuple[int, dict]:
    """Run migrate_fleet --wait --json in this process; return (exit code, report)."""
    out = io.StringIO()
    code = 0
    try:
        call_command("migrate_fleet", "--wait", "--json", *args, stdout=out, stderr=io.StringIO())
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, json.loads(out.getvalue())


def by_identity(report: dict) -> dict[str, dict]:
    return {entry["identity"]: entry for entry in report["stations"]}
