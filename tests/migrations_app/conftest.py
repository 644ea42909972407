"""A whole migration stack per test: Redis, gateways for two CSMS, a worker with its beat,
and simulated stations over real sockets.

The source csms-1 is a lab CSMS that admits any station; the target csms-2 admits only the
stations registered on it, as in the field (Stack.fleet registers them by default).

``stack`` runs both gateways in endpoint mode (they are the CSMS). ``proxied_stack`` runs them
in proxy mode instead, each in front of its own upstream CSMS (tests/upstream_csms.py, an
`ocpp` library central system in this process): ``stack.upstreams["csms-1"]`` and
``["csms-2"]``, also ``stack.upstream_source`` / ``stack.upstream_target``.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
from django.core.management import call_command

from devstack.processes import wait_until
from fleet.models import ChargingStation, CsmsBackend
from fleet.services.inventory import csms_backend_upsert
from fleet.services.registrations import RegistrationRow, registrations_import
from migrations_app.models import MigrationBatch
from ocpp_gateway.envelopes import registry_key, registry_meta_key
from ocpp_gateway.simulator.fleet import Fleet
from ocpp_gateway.simulator.spec import Behaviour, StationSpec, Timing
from tests.upstream_csms import UpstreamCsms

# Short enough for tests, long enough for a loaded 2-core machine.
WORKER_ENV = {
    "OCPP_COMMAND_TIMEOUT": "5",
    "MIGRATION_STEP_LEASE_SECONDS": "8",
    # A failed webhook delivery is tried again after 0.2 s, 0.4 s, ...
    "MIGRATION_WEBHOOK_RETRY_SECONDS": "0.2",
}


@dataclass
class Stack:
    source_url: str
    target_url: str
    start_worker: Callable
    worker: subprocess.Popen
    redis: redis.Redis
    target: CsmsBackend
    # Proxy mode: the upstream CSMS each gateway relays to, by CSMS name; empty in endpoint
    # mode.
    upstreams: dict[str, UpstreamCsms] = field(default_factory=dict)

    @property
    def upstream_source(self) -> UpstreamCsms:
        return self.upstreams["csms-1"]

    @property
    def upstream_target(self) -> UpstreamCsms:
        return self.upstreams["csms-2"]

    def station(self, identity: str, **overrides) -> StationSpec:
        fields = {"url": self.source_url, "profile_timeout": 3, "behaviour": Behaviour()}
        return StationSpec(identity=identity, **{**fields, **overrides})

    def register_on_target(self, specs: list[StationSpec]) -> None:
        """Register the stations on csms-2 (serial number, password) as an import would;
        wait until its gateways can read them from the registry."""
        target = self.target.name
        registrations_import(
            csms=self.target,
            rows=[
                RegistrationRow(line, spec.identity, spec.serial_number, spec.password or "")
                for line, spec in enumerate(specs, start=2)
            ],
        )
        identities = [spec.identity for spec in specs]
        wait_until(
            lambda: (
                self.redis.exists(registry_meta_key(target))
                and all(self.redis.hmget(registry_key(target), identities))
            ),
            10,
            f"the registry of {target} to hold {len(specs)} station(s)",
        )

    @contextlib.contextmanager
    def fleet(
        self,
        specs: list[StationSpec],
        *,
        reboot_delay: float = 0.5,
        register_on_target: bool = True,
        journal: Path | None = None,
    ) -> Iterator[Fleet]:
        """Run the stations (registered on the target first, unless told not to; what
        they do written to ``journal`` when given); wait until the inventory shows each
        of them connected."""
        if register_on_target:
            self.register_on_target(specs)
        timing = Timing(reboot_delay=reboot_delay, retry_interval=0.2, reconnect_delay=0.3)
        with Fleet(specs, timing=timing, journal=journal) as fleet:
            identities = {spec.identity for spec in specs}
            wait_until(
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


def build_stack(
    start_gateway, start_worker, redis_client, upstreams: dict[str, UpstreamCsms] | None = None
) -> Stack:
    """The gateways of csms-1 (--open) and csms-2 (registered stations only), the backends in
    the inventory, a worker with its beat. With ``upstreams`` (by CSMS name), each gateway
    runs in proxy mode (`--upstream`) in front of its upstream CSMS, and the inventory
    records that upstream."""
    upstreams = upstreams or {}

    def proxy(csms: str) -> tuple[str, ...]:
        return ("--upstream", upstreams[csms].url) if csms in upstreams else ()

    # The gateways come up while the worker starts.
    source_url = start_gateway("csms-1", "--open", *proxy("csms-1"), wait=False)
    target_url = start_gateway("csms-2", *proxy("csms-2"), wait=False)
    # Through the service: each backend's registry (open flag, empty set) is published.
    csms_backend_upsert(name="csms-1", url=source_url, open_admission=True)
    target, _ = csms_backend_upsert(name="csms-2", url=target_url)
    for csms, upstream in upstreams.items():
        CsmsBackend.objects.filter(name=csms).update(upstream_url=upstream.url)
    target.refresh_from_db()
    worker, _ = start_worker("w1", beat=True, **WORKER_ENV)
    start_gateway.listening(source_url)
    start_gateway.listening(target_url)
    return Stack(
        source_url, target_url, start_worker, worker, redis_client, target, dict(upstreams)
    )


@pytest.fixture
def stack(start_gateway, start_worker, redis_client) -> Stack:
    return build_stack(start_gateway, start_worker, redis_client)


@pytest.fixture
def upstream_options() -> dict:
    """UpstreamCsms.start() options of both upstreams; a test overrides it with
    ``@pytest.mark.parametrize("upstream_options", [{...}])``."""
    return {}


@pytest.fixture
def upstreams(upstream_options) -> Iterator[dict[str, UpstreamCsms]]:
    """An upstream CSMS for csms-1 and one for csms-2 (by default both accept every boot),
    stopped at the end of the test; a test may stop one earlier (stop() is idempotent)."""
    with contextlib.ExitStack() as servers:
        yield {
            csms: servers.enter_context(UpstreamCsms.start(**upstream_options))
            for csms in ("csms-1", "csms-2")
        }


@pytest.fixture
def proxied_stack(upstreams, start_gateway, start_worker, redis_client) -> Stack:
    """The same stack with both gateways in proxy mode, each in front of its upstream
    (started first, so stopped after the gateways)."""
    return build_stack(start_gateway, start_worker, redis_client, upstreams)


def migrate(*args: str) -> tuple[int, dict]:
    """Run migrate_fleet --wait --json in this process; return (exit code, report)."""
    out = io.StringIO()
    code = 0
    try:
        call_command("migrate_fleet", "--wait", "--json", *args, stdout=out, stderr=io.StringIO())
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, json.loads(out.getvalue())


def wait_batch(batch: MigrationBatch, *states: str, timeout: float = 90) -> MigrationBatch:
    def reached():
        batch.refresh_from_db()
        return batch.state in states

    wait_until(reached, timeout, f"batch {batch.id} to be {' or '.join(states)}")
    return batch


def by_identity(report: dict) -> dict[str, dict]:
    return {entry["identity"]: entry for entry in report["stations"]}
