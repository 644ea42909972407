"""GET /metrics of a real web process (gunicorn), parsed with prometheus-client's parser:
batches by state, starts, failures by step and kind, automatic pauses, step durations."""

from __future__ import annotations

import urllib.error
import urllib.request
from datetime import timedelta
from pathlib import Path

import pytest
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from devstack.processes import free_port, web
from fleet.models import ChargingStation, CsmsBackend
from migrations_app.models import BatchAction, MigrationBatch, StateChange, StationMigration
from ocpp_gateway.simulator.spec import Behaviour
from tests.conftest import process_env
from tests.migrations_app.conftest import migrate

State = StationMigration.State
Kind = StationMigration.FailureKind
TOKEN = "scrape-me"


def scrape(base: str, token: str | None = TOKEN) -> dict:
    """{(sample name, sorted labels): value}."""
    request = urllib.request.Request(f"{base}/metrics")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=")
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def web_process(transactional_db, redis_url, tmp_path: Path):
    port = free_port()
    env = {**process_env(redis_url), "METRICS_TOKEN": TOKEN}
    with web(port, env=env, log=tmp_path / "web.log"):
        yield f"http://127.0.0.1:{port}"


def refused_status(base: str, token: str | None) -> int:
    try:
        scrape(base, token)
    except urllib.error.HTTPError as refused:
        assert refused.headers["WWW-Authenticate"] == 'Bearer realm="metrics"'
        return refused.code
    return 200


def test_metrics_are_refused_without_the_token_or_a_staff_user(web_process):
    assert refused_status(web_process, None) == 401
    assert refused_status(web_process, "wrong") == 401
    assert refused_status(web_process, TOKEN) == 200


def test_a_staff_user_signed_in_may_read_the_metrics(admin_client, client, django_user_model):
    assert admin_client.get("/metrics").status_code == 200
    django_user_model.objects.create_user("viewer", password="pw")
    client.login(username="viewer", password="pw")
    assert client.get("/metrics").status_code == 401


def _batch_with_history() -> MigrationBatch:
    source = CsmsBackend.objects.create(name="csms-1", url="ws://csms-1.example.com/ocpp")
    target = CsmsBackend.objects.create(name="csms-2", url="ws://csms-2.example.com/ocpp")
    batch = MigrationBatch.objects.create(target=target, state=MigrationBatch.State.PAUSED)
    t0 = timezone.now() - timedelta(minutes=5)
    url, boot, failed = State.SETTING_URL, State.AWAITING_BOOT, State.FAILED
    rows = [
        ("CP-1", State.DONE, "", "", [State.PREFLIGHT, url, State.DONE]),
        ("CP-2", failed, url, Kind.REJECTED, [url, failed]),
        ("CP-3", failed, boot, Kind.FALLBACK, [boot, failed]),
        ("CP-4", State.PENDING, "", "", []),
    ]
    for identity, state, failed_step, kind, history in rows:
        station = ChargingStation.objects.create(identity=identity, csms=source, connected=True)
        migration = StationMigration.objects.create(
            batch=batch,
            station=station,
            source=source,
            target_url=target.url,
            state=state,
            failed_step=failed_step,
            failure_kind=kind,
            started_at=t0 if history else None,
        )
        previous = State.PENDING
        # Each state lasts 3 s, so every completed step falls in the (2, 5] bucket.
        for n, to_state in enumerate(history):
            at = t0 + timedelta(seconds=3 * n)
            StateChange.objects.create(
                migration=migration, from_state=previous, to_state=to_state, at=at
            )
            previous = to_state
    BatchAction.objects.create(batch=batch, kind=BatchAction.Kind.AUTO_PAUSE, detail="brake")
    return batch


def test_batch_metrics_come_from_the_database(web_process):
    batch = _batch_with_history()
    samples = scrape(web_process)
    labels = {"batch": str(batch.id), "target": "csms-2"}
    info = {**labels, "state": "paused", "dry_run": "false"}
    assert value(samples, "csms_migrate_batch_info", **info) == 1
    for state, n in [("done", 1), ("failed", 2), ("pending", 1)]:
        assert value(samples, "csms_migrate_batch_stations", **labels, state=state) == n
    assert value(samples, "csms_migrate_batch_started_total", **labels) == 3
    failures = "csms_migrate_batch_failures_total"
    assert value(samples, failures, **labels, step="setting_url", kind="rejected") == 1
    assert value(samples, failures, **labels, step="awaiting_boot", kind="fallback") == 1
    assert value(samples, "csms_migrate_batch_auto_pauses_total", **labels) == 1

    # CP-1 left preflight and setting_url, CP-2 setting_url, CP-3 awaiting_boot: 3 s each.
    steps = "csms_migrate_step_duration_seconds"
    url = {**labels, "step": "setting_url"}
    assert value(samples, f"{steps}_count", **url) == 2
    assert value(samples, f"{steps}_sum", **url) == pytest.approx(6.0, abs=0.01)
    assert value(samples, f"{steps}_bucket", **url, le="2.0") == 0
    assert value(samples, f"{steps}_bucket", **url, le="5.0") == 2
    assert value(samples, f"{steps}_bucket", **url, le="+Inf") == 2
    assert value(samples, f"{steps}_count", **labels, step="preflight") == 1
    assert value(samples, f"{steps}_count", **labels, step="done") == 0  # never left

    assert value(samples, "csms_migrate_stations", csms="csms-1") == 4
    assert value(samples, "csms_migrate_stations_connected", csms="csms-1") == 4


def test_a_batch_finished_long_ago_drops_out_of_the_metrics(web_process):
    batch = _batch_with_history()
    MigrationBatch.objects.filter(id=batch.id).update(
        state=MigrationBatch.State.FINISHED, finished_at=timezone.now() - timedelta(days=2)
    )
    samples = scrape(web_process)
    assert not [key for key in samples if ("batch", str(batch.id)) in key[1]]


def test_a_real_migration_shows_in_the_web_and_gateway_metrics(stack, tmp_path, redis_url):
    specs = [
        stack.station("CP-M1"),
        stack.station("CP-M2", behaviour=Behaviour(reject_url_writes=True)),
    ]
    port = free_port()
    env = {**process_env(redis_url), "METRICS_TOKEN": TOKEN}
    with stack.fleet(specs), web(port, env=env, log=tmp_path / "web.log"):
        code, report = migrate("--to", "csms-2", "--from", "csms-1", "--rate-per-minute", "0")
        assert code == 1
        samples = scrape(f"http://127.0.0.1:{port}")
    labels = {"batch": str(report["batch"]), "target": "csms-2"}
    assert value(samples, "csms_migrate_batch_stations", **labels, state="done") == 1
    failures = "csms_migrate_batch_failures_total"
    assert value(samples, failures, **labels, step="setting_url", kind="rejected") == 1
    assert value(samples, "csms_migrate_batch_started_total", **labels) == 2
    steps = "csms_migrate_step_duration_seconds_count"
    assert value(samples, steps, **labels, step="awaiting_boot") == 1
    assert value(samples, steps, **labels, step="reading_config") == 2

    gateway = stack.source_url.removeprefix("ws://").removesuffix("/ocpp")
    with urllib.request.urlopen(f"http://{gateway}/metrics", timeout=5) as response:
        text = response.read().decode()
    commands = {
        (s.labels["action"], s.labels["outcome"]): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "csms_gateway_commands_total"
    }
    assert commands[("Reset", "result")] == 1
    assert commands[("ChangeConfiguration", "result")] >= 3  # URL twice (one refused), priority
