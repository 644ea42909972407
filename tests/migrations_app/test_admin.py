"""The migrations admin through Django's test client: the stations' migrate action, the
batch dashboard, its controls and its CSV exports.

No worker runs here: the batches these tests create start nothing (the services enqueue on
commit, and each test's transaction is rolled back), so states are moved by hand through
the same transition service the workers use.
"""

from __future__ import annotations

import csv
import datetime as dt
import io

import pytest
from django.contrib import admin
from django.contrib.auth.models import Permission, User
from django.core.exceptions import PermissionDenied
from django.urls import reverse
from django.utils import timezone

from fleet.models import ChargingStation, CsmsBackend, Registration
from migrations_app.admin import migrate_to_another_csms
from migrations_app.models import (
    BatchAction,
    MigrationBatch,
    OcppExchange,
    StateChange,
    StationMigration,
)
from migrations_app.services.batches import BatchOptions, batch_create
from migrations_app.services.transitions import transition

State = StationMigration.State
BatchState = MigrationBatch.State
ACTION = "migrate_to_another_csms"
CHANGELIST = "admin:fleet_chargingstation_changelist"

VIEW_PERMISSIONS = [
    "fleet.view_chargingstation",
    "migrations_app.view_migrationbatch",
    "migrations_app.view_stationmigration",
]


def _staff(username: str, *permissions: str) -> User:
    user = User.objects.create_user(username, password="secret", is_staff=True)
    for permission in permissions:
        app_label, codename = permission.split(".")
        user.user_permissions.add(
            Permission.objects.get(content_type__app_label=app_label, codename=codename)
        )
    return user


@pytest.fixture
def operator(db) -> User:
    return _staff("operator", *VIEW_PERMISSIONS, "migrations_app.run_migration")


@pytest.fixture
def watcher(db) -> User:
    """Staff who may look at everything but run nothing."""
    return _staff("watcher", *VIEW_PERMISSIONS)


@pytest.fixture
def operator_client(client, operator):
    client.force_login(operator)
    return client


@pytest.fixture
def csms1(db) -> CsmsBackend:
    return CsmsBackend.objects.create(name="csms-1", url="ws://csms-1.example.com/ocpp")


@pytest.fixture
def csms2(db) -> CsmsBackend:
    return CsmsBackend.objects.create(name="csms-2", url="ws://csms-2.example.com/ocpp")


@pytest.fixture
def fleet(csms1, csms2) -> dict[str, ChargingStation]:
    """One station for each fate the preview predicts."""

    def station(identity, csms, firmware="4.2.85", connected=True):
        return ChargingStation.objects.create(
            identity=identity,
            csms=csms,
            firmware_version=firmware,
            connected=connected,
            vendor="Acme",
            model="AC22",
            serial=f"SN-{identity}",
        )

    return {
        s.identity: s
        for s in [
            station("CP-OK-1", csms1),
            station("CP-OK-2", csms1, firmware="3.5.60"),
            station("CP-OLD-42a", csms1, firmware="4.2.80"),
            station("CP-OLD-42b", csms1, firmware="4.2.9"),
            station("CP-OLD-35", csms1, firmware="3.5.10"),
            station("CP-THERE", csms2),
            station("CP-OFF", csms1, connected=False),
        ]
    }


def options(target: CsmsBackend, **overrides) -> dict[str, object]:
    """The migrate form's fields as the browser posts them (defaults, then overrides)."""
    data: dict[str, object] = {
        "target": target.pk,
        "max_in_flight": 50,
        "rate_per_minute": 0,
        "canary_size": 0,
        "brake_failure_ratio": "",
        "brake_min_sample": 10,
        "boot_timeout_seconds": 300,
        "idle_wait_seconds": 1800,
        "offline_wait_seconds": 0,
        "window_start": "",
        "window_end": "",
    }
    data.update(overrides)
    return {key: value for key, value in data.items() if value is not False}


def run_action(client, stations, step: str | None = None, **form) -> object:
    """POST the action to the stations changelist: the first step, or a later one."""
    data: dict[str, object] = {
        "action": ACTION,
        "_selected_action": [station.pk for station in stations],
    }
    if step is None:
        data.update(index="0", select_across="0")
    else:
        data.update({"_migrate": "1", step: "1", **form})
    return client.post(reverse(CHANGELIST), data)


def make_batch(stations, target, **option_overrides) -> MigrationBatch:
    return batch_create(
        target=target,
        stations=stations,
        options=BatchOptions(**option_overrides),
        created_by=User.objects.get(username="operator"),
    )


def move(migration: StationMigration, *states: str, **fields) -> None:
    """Walk a station migration through states, as the workers would."""
    current = StationMigration.objects.get(id=migration.id).state
    for state in states:
        assert transition(migration.id, current, state, **fields)
        current = state


def dashboard(batch: MigrationBatch) -> str:
    return reverse("admin:migrations_app_migrationbatch_change", args=[batch.id])


def control(batch: MigrationBatch, name: str) -> str:
    return reverse("admin:migrations_app_migrationbatch_control", args=[batch.id, name])


def read_csv(response) -> list[list[str]]:
    body = b"".join(response.streaming_content) if response.streaming else response.content
    return list(csv.reader(io.StringIO(body.decode())))


# --- who sees the action -----------------------------------------------------------------


def test_it_offers_the_action_to_a_user_with_the_permission(operator_client, fleet):
    response = operator_client.get(reverse(CHANGELIST))

    assert response.status_code == 200
    assert ACTION.encode() in response.content
    assert "Migrate to another CSMS…".encode() in response.content


def test_it_hides_and_refuses_the_action_to_staff_without_the_permission(
    client, watcher, fleet, csms2
):
    client.force_login(watcher)
    stations = list(fleet.values())

    listing = client.get(reverse(CHANGELIST))
    first = run_action(client, stations)
    confirm = run_action(client, stations, "_confirm", **options(csms2))

    assert listing.status_code == 200
    assert ACTION.encode() not in listing.content
    # An action the admin does not offer this user is no action: the plain list, or back to it.
    for response in (first, confirm):
        assert response.status_code in (200, 302)
        assert b"Nothing starts until you confirm" not in response.content
    assert not MigrationBatch.objects.exists()


def test_the_action_itself_refuses_a_user_without_the_permission(rf, watcher, fleet):
    request = rf.post(reverse(CHANGELIST), {"_migrate": "1", "_confirm": "1"})
    request.user = watcher
    model_admin = admin.site._registry[ChargingStation]

    with pytest.raises(PermissionDenied):
        migrate_to_another_csms(model_admin, request, ChargingStation.objects.all())

    assert not MigrationBatch.objects.exists()


# --- options, preview, batch ---------------------------------------------------------------


def test_the_first_step_shows_the_options_with_the_selection(operator_client, fleet):
    response = run_action(operator_client, list(fleet.values()))

    assert response.status_code == 200
    content = response.content.decode()
    assert "7 stations" in content
    assert "csms-1: 6" in content and "csms-2: 1" in content
    for field in ("max_in_flight", "rate_per_minute", "canary_size", "brake_failure_ratio"):
        assert f'name="{field}"' in content
    assert not MigrationBatch.objects.exists()


def test_the_preview_counts_each_fate_and_groups_firmware_skips_by_reason(
    operator_client, fleet, csms2
):
    response = run_action(operator_client, list(fleet.values()), "_preview", **options(csms2))

    assert response.status_code == 200
    preview = response.context["preview"]
    assert preview.total == 7
    assert preview.by_source == [("csms-1", 6), ("csms-2", 1)]
    assert preview.ready.sample == ["CP-OK-1", "CP-OK-2"]
    assert preview.on_target.sample == ["CP-THERE"]
    assert preview.offline.sample == ["CP-OFF"]
    assert preview.firmware_skipped == 3
    skips = {bucket.label: bucket.sample for bucket in preview.firmware_skips}
    assert skips == {
        "firmware 4.2.80 is older than 4.2.85, the first 4.2.x version with network "
        "connection profiles": ["CP-OLD-42a"],
        "firmware 4.2.9 is older than 4.2.85, the first 4.2.x version with network "
        "connection profiles": ["CP-OLD-42b"],
        "firmware 3.5.10 is older than 3.5.54, the first 3.5.x version with network "
        "connection profiles": ["CP-OLD-35"],
    }
    content = response.content.decode()
    assert "skipped for firmware" in content and "already on csms-2" in content
    assert "Start migration" in content
    assert not MigrationBatch.objects.exists()


def test_confirming_creates_the_batch_with_the_chosen_options_and_logs_who_started_it(
    operator_client, operator, fleet, csms2
):
    chosen = [fleet["CP-OK-1"], fleet["CP-OK-2"], fleet["CP-THERE"]]
    form = options(
        csms2,
        max_in_flight=7,
        rate_per_minute=30,
        canary_size=2,
        brake_failure_ratio="0.25",
        brake_min_sample=4,
        boot_timeout_seconds=120,
        idle_wait_seconds=600,
        offline_wait_seconds=90,
        window_start="22:00",
        window_end="04:00",
        cleanup="on",
        dry_run=False,
    )

    response = run_action(operator_client, chosen, "_confirm", **form)

    batch = MigrationBatch.objects.get()
    assert response.status_code == 302
    assert response["Location"] == dashboard(batch)
    assert batch.target == csms2 and batch.state == BatchState.RUNNING
    assert batch.created_by == operator
    assert (batch.max_in_flight, batch.rate_per_minute, batch.canary_size) == (7, 30, 2)
    assert (batch.brake_failure_ratio, batch.brake_min_sample) == (0.25, 4)
    assert (batch.boot_timeout_seconds, batch.idle_wait_seconds) == (120, 600)
    assert batch.offline_wait_seconds == 90
    assert (batch.window_start, batch.window_end) == (dt.time(22, 0), dt.time(4, 0))
    assert batch.cleanup and not batch.dry_run
    assert sorted(batch.stations.values_list("station__identity", flat=True)) == [
        "CP-OK-1",
        "CP-OK-2",
        "CP-THERE",
    ]
    start = BatchAction.objects.get(batch=batch)
    assert start.kind == BatchAction.Kind.START and start.user == operator
    page = operator_client.get(response["Location"])
    assert f"Batch {batch.id} started: 3 station(s) to csms-2." in page.content.decode()


def test_selecting_all_that_match_the_filter_carries_through_to_the_batch(
    operator_client, fleet, csms1, csms2
):
    on_csms1 = f"{reverse(CHANGELIST)}?csms__id__exact={csms1.pk}"
    one = fleet["CP-OK-1"].pk
    base = {"action": ACTION, "_selected_action": [one], "select_across": "1"}

    first = operator_client.post(on_csms1, {**base, "index": "0"})
    confirm = operator_client.post(
        on_csms1, {**base, "_migrate": "1", "_confirm": "1", **options(csms2)}
    )

    assert 'name="select_across" value="1"' in first.content.decode()
    assert first.context["preview"].total == 6
    batch = MigrationBatch.objects.get()
    assert confirm.status_code == 302
    assert batch.stations.count() == 6
    assert not batch.stations.filter(station__identity="CP-THERE").exists()


def test_going_back_from_the_preview_keeps_the_options(operator_client, fleet, csms2):
    response = run_action(
        operator_client, [fleet["CP-OK-1"]], "_back", **options(csms2, max_in_flight=9)
    )

    assert response.status_code == 200
    assert 'name="max_in_flight" value="9"' in response.content.decode()
    assert not MigrationBatch.objects.exists()


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"max_in_flight": 0}, "Max in flight must be at least 1."),
        ({"window_start": "22:00"}, "A maintenance window needs both a start and an end."),
        ({"brake_failure_ratio": "1.5"}, "The brake&#x27;s failure ratio must be from 0 up to"),
    ],
)
@pytest.mark.parametrize("step", ["_preview", "_confirm"])
def test_a_bad_form_shows_the_errors_and_creates_nothing(
    operator_client, fleet, csms2, overrides, error, step
):
    response = run_action(operator_client, [fleet["CP-OK-1"]], step, **options(csms2, **overrides))

    assert response.status_code == 200
    assert error in response.content.decode()
    assert "Please correct the error" in response.content.decode()
    assert not MigrationBatch.objects.exists()


def test_a_target_with_an_unusable_url_is_reported_by_the_batch_service(
    operator_client, fleet, csms2
):
    CsmsBackend.objects.filter(pk=csms2.pk).update(url="http://not-a-websocket/")

    response = run_action(operator_client, [fleet["CP-OK-1"]], "_confirm", **options(csms2))

    assert response.status_code == 200
    assert "has an unusable URL" in response.content.decode()
    assert not MigrationBatch.objects.exists()


# --- the dashboard -----------------------------------------------------------------------


@pytest.fixture
def batch(operator, fleet, csms2) -> MigrationBatch:
    """A batch of three stations: one done, one failed at setting_url, one pending."""
    batch = make_batch([fleet["CP-OK-1"], fleet["CP-OK-2"], fleet["CP-OFF"]], csms2)
    ok = batch.stations.get(station__identity="CP-OK-1")
    failed = batch.stations.get(station__identity="CP-OK-2")
    move(ok, State.PREFLIGHT, State.READING_CONFIG, State.SETTING_URL, State.SETTING_PRIORITY)
    move(ok, State.WAITING_IDLE, State.RESETTING, State.AWAITING_BOOT, State.VERIFIED)
    move(ok, State.OLD_REGISTRATION_MARKED, State.DONE)
    move(failed, State.PREFLIGHT, State.READING_CONFIG, State.SETTING_URL)
    move(
        failed,
        State.FAILED,
        reason="the station did not accept the new URL (Rejected)",
        failed_step=State.SETTING_URL,
    )
    OcppExchange.objects.create(
        migration=ok,
        step=State.READING_CONFIG,
        action="GetConfiguration",
        csms="csms-1",
        request={"key": ["NetworkConfigurationPriority"]},
        outcome="result",
        response={"configuration_key": []},
        sent_at=timezone.now(),
        duration_ms=12.5,
    )
    OcppExchange.objects.create(
        migration=failed,
        step=State.SETTING_URL,
        action="ChangeConfiguration",
        request={"key": "NetworkConnectionProfile2", "value": csms2.url},
        outcome="error",
        error_code="InternalError",
        error_description="flash write failed",
        sent_at=timezone.now(),
        duration_ms=40.0,
    )
    Registration.objects.create(
        station=fleet["CP-OK-1"], csms=fleet["CP-OK-1"].csms, state="pending_removal"
    )
    Registration.objects.create(station=fleet["CP-OK-2"], csms=fleet["CP-OK-2"].csms)
    return batch


def test_the_batch_list_shows_progress_and_counts(operator_client, batch):
    response = operator_client.get(reverse("admin:migrations_app_migrationbatch_changelist"))

    content = response.content.decode()
    assert response.status_code == 200
    assert f"Batch {batch.id}" in content
    assert "2 / 3: 1 done, 1 failed, 0 skipped" in content
    assert "mig-bar" in content and "csms-1" in content


def test_the_dashboard_shows_counts_the_bar_settings_and_the_stations(operator_client, batch):
    response = operator_client.get(dashboard(batch))

    assert response.status_code == 200
    content = response.content.decode()
    progress = response.context["progress"]
    assert (progress.total, progress.ended, progress.percent_ended) == (3, 2, 66)
    assert {(state, n) for state, _, n in progress.counts} == {
        ("done", 1),
        ("failed", 1),
        ("pending", 1),
    }
    assert 'data-mig-live="1"' in content
    for identity in ("CP-OK-1", "CP-OK-2", "CP-OFF"):
        assert identity in content
    assert "did not accept the new URL" in content
    assert [(a.kind, a.user.username) for a in response.context["actions_log"]] == [
        ("start", "operator")
    ]
    assert [c["name"] for c in response.context["controls"]] == [
        "pause",
        "retry",
        "migrate_back",
        "cancel",
    ]


@pytest.mark.parametrize(
    ("query", "shown"),
    [
        ({"state": "failed"}, ["CP-OK-2"]),
        ({"state": "done"}, ["CP-OK-1"]),
        ({"failed_step": "setting_url"}, ["CP-OK-2"]),
        ({"q": "NEW URL"}, ["CP-OK-2"]),
        ({"q": "nothing like this"}, []),
        ({}, ["CP-OFF", "CP-OK-1", "CP-OK-2"]),
    ],
)
def test_the_dashboard_filters_stations_by_state_step_and_reason(
    operator_client, batch, query, shown
):
    response = operator_client.get(dashboard(batch), query)

    rows = response.context["rows"]
    assert [row["migration"].station.identity for row in rows] == shown


def test_the_dashboard_pages_through_many_stations(operator_client, operator, csms1, csms2):
    stations = [
        ChargingStation.objects.create(identity=f"CP-{i:03}", csms=csms1, connected=True)
        for i in range(120)
    ]
    batch = make_batch(stations, csms2)

    first = operator_client.get(dashboard(batch))
    third = operator_client.get(dashboard(batch), {"page": 3})

    assert len(first.context["rows"]) == 50
    assert third.context["rows"][0]["migration"].station.identity == "CP-100"
    assert "page 3 of 3" in third.content.decode()


def test_a_watcher_sees_the_dashboard_without_controls(client, watcher, batch):
    client.force_login(watcher)

    response = client.get(dashboard(batch))

    assert response.status_code == 200
    assert response.context["controls"] == []
    assert "/control/" not in response.content.decode()


def test_the_station_page_shows_the_timeline_of_state_changes_and_exchanges(operator_client, batch):
    failed = batch.stations.get(station__identity="CP-OK-2")

    response = operator_client.get(
        reverse("admin:migrations_app_stationmigration_change", args=[failed.id])
    )

    assert response.status_code == 200
    content = response.content.decode()
    kinds = [row["kind"] for row in response.context["entries"]]
    assert kinds.count("state") == 4 and kinds.count("exchange") == 1
    assert "ChangeConfiguration" in content and "InternalError: flash write failed" in content
    assert "NetworkConnectionProfile2" in content and "40 ms" in content
    assert "Failed at setting_url" in content


# --- the controls ------------------------------------------------------------------------


def test_pause_and_resume_call_the_services_and_record_the_user(operator_client, operator, batch):
    paused = operator_client.post(control(batch, "pause"), {"reason": "CSMS 2 maintenance"})
    batch.refresh_from_db()
    assert paused.status_code == 302 and paused["Location"] == dashboard(batch)
    assert batch.state == BatchState.PAUSED
    assert batch.pause_reason == "CSMS 2 maintenance"

    page = operator_client.get(dashboard(batch)).content.decode()
    assert "CSMS 2 maintenance" in page and "Resume" in page

    resumed = operator_client.post(control(batch, "resume"))
    batch.refresh_from_db()
    assert resumed.status_code == 302 and batch.state == BatchState.RUNNING
    assert list(batch.actions.values_list("kind", "user__username")) == [
        ("start", "operator"),
        ("pause", "operator"),
        ("resume", "operator"),
    ]


def test_retry_failed_puts_them_back_in_line_and_records_the_user(operator_client, batch):
    response = operator_client.post(control(batch, "retry"))

    assert response.status_code == 302
    assert batch.stations.get(station__identity="CP-OK-2").state == State.PENDING
    retry = batch.actions.get(kind=BatchAction.Kind.RETRY)
    assert retry.user.username == "operator" and retry.detail == "1 stations"
    messages = [str(m) for m in operator_client.get(dashboard(batch)).context["messages"]]
    assert messages == ["1 failed station(s) put back in line."]


def test_cancel_cancels_stations_not_started_and_records_the_user(operator_client, batch):
    response = operator_client.post(control(batch, "cancel"))

    batch.refresh_from_db()
    assert response.status_code == 302 and batch.state == BatchState.CANCELLED
    assert batch.stations.get(station__identity="CP-OFF").state == State.CANCELLED
    assert batch.actions.get(kind=BatchAction.Kind.CANCEL).user.username == "operator"


def test_migrate_back_starts_a_batch_in_the_other_direction(operator_client, batch, csms1):
    response = operator_client.post(control(batch, "migrate_back"))

    back = MigrationBatch.objects.exclude(id=batch.id).get()
    assert response.status_code == 302 and response["Location"] == dashboard(back)
    assert back.target == csms1 and back.migrated_back_from == batch
    assert list(back.stations.values_list("station__identity", flat=True)) == ["CP-OK-1"]
    assert batch.actions.get(kind=BatchAction.Kind.MIGRATE_BACK).user.username == "operator"
    assert back.actions.get(kind=BatchAction.Kind.START).user.username == "operator"


def test_a_control_the_state_refuses_shows_the_services_reason(operator_client, batch):
    response = operator_client.post(control(batch, "resume"), follow=True)

    batch.refresh_from_db()
    assert batch.state == BatchState.RUNNING
    shown = [(m.level_tag, str(m)) for m in response.context["messages"]]
    assert shown == [("error", f"cannot resume batch {batch.id}: it is running")]
    assert not batch.actions.filter(kind=BatchAction.Kind.RESUME).exists()


def test_controls_need_a_post_and_the_permission(client, operator_client, watcher, batch):
    assert operator_client.get(control(batch, "pause")).status_code == 405
    assert operator_client.post(control(batch, "explode")).status_code == 404
    client.force_login(watcher)

    assert client.post(control(batch, "pause")).status_code == 403

    batch.refresh_from_db()
    assert batch.state == BatchState.RUNNING


# --- the exports -------------------------------------------------------------------------


def test_the_pending_removal_export_lists_stations_to_delete_on_the_old_csms(
    operator_client, batch
):
    response = operator_client.get(
        reverse("admin:migrations_app_migrationbatch_pending_removal_csv", args=[batch.id])
    )

    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/csv")
    assert f"batch-{batch.id}-pending-removal.csv" in response["Content-Disposition"]
    header, *rows = read_csv(response)
    assert header == [
        "identity",
        "serial",
        "vendor",
        "model",
        "old_csms",
        "new_csms",
        "verified_at",
    ]
    verified = StateChange.objects.get(
        migration__batch=batch, to_state=State.VERIFIED
    ).at.isoformat()
    assert rows == [["CP-OK-1", "SN-CP-OK-1", "Acme", "AC22", "csms-1", "csms-2", verified]]


def test_the_audit_export_lists_every_action_change_and_exchange_in_time_order(
    operator_client, batch
):
    operator_client.post(control(batch, "pause"), {"reason": "=cmd|' /C calc'!A0"})

    response = operator_client.get(
        reverse("admin:migrations_app_migrationbatch_audit_csv", args=[batch.id])
    )

    assert response.status_code == 200
    header, *rows = read_csv(response)
    assert header[:4] == ["at", "record", "station", "user"]
    records = [dict(zip(header, row, strict=True)) for row in rows]
    times = [record["at"] for record in records]
    assert times == sorted(times)
    kinds = [record["record"] for record in records]
    assert kinds.count("state_change") == StateChange.objects.filter(migration__batch=batch).count()
    assert kinds.count("ocpp_exchange") == 2
    assert [(r["action"], r["user"]) for r in records if r["record"] == "batch_action"] == [
        ("start", "operator"),
        ("pause", "operator"),
    ]
    error = next(r for r in records if r["action"] == "ChangeConfiguration")
    assert error["station"] == "CP-OK-2" and error["outcome"] == "error"
    assert error["error"] == "InternalError flash write failed"
    assert error["duration_ms"] == "40.0"
    assert '"key": "NetworkConnectionProfile2"' in error["request"]
    # A cell a spreadsheet would run as a formula is defused.
    pause = next(r for r in records if r["action"] == "pause")
    assert pause["detail"] == "'=cmd|' /C calc'!A0"


def test_an_exchange_a_gateway_refused_unsent_is_shown_as_not_sent(operator_client, batch):
    """The target's gateway holds the station but the rollback is addressed to the
    source's: it answers without sending. The timeline and the audit say so; "via csms-2"
    would read as a rollback sent through the target."""
    failed = batch.stations.get(station__identity="CP-OK-2")
    OcppExchange.objects.create(
        migration=failed,
        step="setting_url:rollback",
        action="ChangeConfiguration",
        csms="csms-2",
        sent=False,
        request={"key": "NetworkConfigurationPriority", "value": "x"},
        outcome="disconnected",
        error_description="addressed to csms-1, not csms-2",
        sent_at=timezone.now(),
        duration_ms=1.0,
    )

    page = operator_client.get(
        reverse("admin:migrations_app_stationmigration_change", args=[failed.id])
    ).content.decode()
    audit = operator_client.get(
        reverse("admin:migrations_app_migrationbatch_audit_csv", args=[batch.id])
    )

    assert "step setting_url:rollback · not sent by csms-2" in page
    assert "via csms-2" not in page
    header, *rows = read_csv(audit)
    records = [dict(zip(header, row, strict=True)) for row in rows]
    refused = next(r for r in records if r["step"] == "setting_url:rollback")
    assert refused["detail"] == "not sent (refused by csms-2)"
    sent = next(r for r in records if r["action"] == "GetConfiguration")
    assert sent["detail"] == "via csms-1"


def test_the_front_page_shows_the_fleet_running_batches_and_last_failures(admin_client):
    source = CsmsBackend.objects.create(name="csms-1", url="ws://csms-1.example.com/ocpp")
    target = CsmsBackend.objects.create(name="csms-2", url="ws://csms-2.example.com/ocpp")
    running = MigrationBatch.objects.create(target=target)
    paused = MigrationBatch.objects.create(
        target=target, state=MigrationBatch.State.PAUSED, pause_reason="brake: 3 of 4 failed"
    )
    MigrationBatch.objects.create(target=target, state=MigrationBatch.State.FINISHED)
    waiting = MigrationBatch.objects.create(target=target, approval_required=True)
    for n, (batch, state) in enumerate(
        [(running, State.DONE), (running, State.PENDING), (paused, State.FAILED)]
    ):
        station = ChargingStation.objects.create(identity=f"CP-{n}", csms=source, connected=n != 1)
        StationMigration.objects.create(
            batch=batch,
            station=station,
            source=source,
            target_url=target.url,
            state=state,
            failed_step=State.SETTING_URL if state == State.FAILED else "",
            failure_kind="rejected" if state == State.FAILED else "",
            reason="the station did not accept the new URL" if state == State.FAILED else "",
        )
    page = admin_client.get("/admin/")
    text = page.content.decode()
    assert 'id="fleet-overview"' in text
    overview = page.context["overview"]
    assert [(b.name, b.connected_count, b.station_count) for b in overview.backends] == [
        ("csms-1", 2, 3),
        ("csms-2", 0, 0),
    ]
    assert [batch.id for batch, _ in overview.batches] == [waiting.id, paused.id, running.id]
    assert [p.ended for _, p in overview.batches] == [0, 1, 1]
    assert "brake: 3 of 4 failed" in text
    assert '<span class="mig-quiet" data-held>awaiting approval by a second person</span>' in text
    assert [m.station.identity for m in overview.failures] == ["CP-2"]
    assert "did not accept the new URL" in text
    # The app list is still there below it.
    assert "app-migrations_app" in text


def test_the_front_page_has_no_overview_for_a_user_who_cannot_see_batches(
    client, django_user_model
):
    django_user_model.objects.create_user("clerk", password="pw", is_staff=True)
    client.login(username="clerk", password="pw")
    assert 'id="fleet-overview"' not in client.get("/admin/").content.decode()


# --- rollout policies and approvals --------------------------------------------------------


@pytest.fixture
def approver(db) -> User:
    return _staff("approver", *VIEW_PERMISSIONS, "migrations_app.approve_migration")


def test_the_form_takes_the_rollout_policies_and_the_page_shows_them(
    operator_client, operator, fleet, csms2
):
    # The creator holds the approve permission too: what keeps the button away is being
    # the creator.
    operator.user_permissions.add(Permission.objects.get(codename="approve_migration"))
    form = options(
        csms2,
        rate_per_minute=6,
        rate_increase_factor="2",
        rate_increase_every=10,
        rate_max_per_minute=120,
        canary_size=1,
        promote_after_canary="on",
        abort_criteria="fallback:10%:20\n\n TIMEOUT:5 \n",
        starts_at="2099-12-24T22:00",
        ends_at="2099-12-25T06:00",
        approval_required="on",
    )
    response = run_action(operator_client, [fleet["CP-OK-1"]], "_confirm", **form)

    batch = MigrationBatch.objects.get()
    assert response.status_code == 302
    assert (batch.rate_increase_factor, batch.rate_increase_every) == (2.0, 10)
    assert batch.rate_max_per_minute == 120
    assert [c["kind"] for c in batch.abort_criteria] == ["fallback", "timeout"]
    assert batch.starts_at == dt.datetime(2099, 12, 24, 22, 0, tzinfo=dt.UTC)
    assert batch.approval_required and batch.promote_after_canary
    page = operator_client.get(dashboard(batch)).content.decode()
    assert "times 2 every 10 done, up to 120 a minute (now 6 a minute, 0 done)" in page
    assert "fallback:10%:20, timeout:5" in page
    assert "from 2099-12-24 22:00 UTC to 2099-12-25 06:00 UTC" in page
    assert "awaiting approval by a second person" in page
    assert batch.created_by == operator
    assert control(batch, "approve") not in page  # its creator may not approve it
    refused = operator_client.post(control(batch, "approve"), follow=True).content.decode()
    assert f"created batch {batch.id}: a second person must approve it" in refused
    assert MigrationBatch.objects.get().approved_at is None


def test_a_bad_abort_criterion_is_shown_and_creates_nothing(operator_client, fleet, csms2):
    form = options(csms2, abort_criteria="fallback:10%\nslow:5")
    response = run_action(operator_client, [fleet["CP-OK-1"]], "_confirm", **form)
    assert response.status_code == 200
    assert "the kind must be one of" in response.content.decode()
    assert not MigrationBatch.objects.exists()


def test_a_second_person_with_the_permission_approves_on_the_page(
    client, operator, approver, watcher, fleet, csms2
):
    batch = make_batch([fleet["CP-OK-1"]], csms2, approval_required=True)
    client.force_login(watcher)
    assert control(batch, "approve") not in client.get(dashboard(batch)).content.decode()
    refused = client.post(control(batch, "approve"), follow=True).content.decode()
    assert "atcher may not approve batches (the approve permission)" in refused

    client.force_login(approver)
    page = client.get(dashboard(batch)).content.decode()
    assert control(batch, "approve") in page
    assert control(batch, "pause") not in page  # approving is all this user may do
    approved = client.post(control(batch, "approve"), follow=True).content.decode()
    assert "Approved: the batch&#x27;s stations may start." in approved
    batch.refresh_from_db()
    assert batch.approved_by == approver and batch.approved_at is not None
    assert list(batch.actions.values_list("kind", "user__username")) == [
        ("start", "operator"),
        ("approve", "approver"),
    ]
    assert "approved by approver at " in client.get(dashboard(batch)).content.decode()


def test_promote_after_the_canary_is_offered_once_the_canary_ended(operator_client, fleet, csms2):
    batch = make_batch(
        [fleet["CP-OK-1"], fleet["CP-OK-2"]], csms2, canary_size=1, promote_after_canary=True
    )
    assert control(batch, "promote") not in operator_client.get(dashboard(batch)).content.decode()
    early = operator_client.post(control(batch, "promote"), follow=True).content.decode()
    assert "its canary wave has not ended yet" in early

    MigrationBatch.objects.filter(id=batch.id).update(canary_ended_at=timezone.now())
    page = operator_client.get(dashboard(batch)).content.decode()
    assert "the canary wave ended: awaiting promotion" in page
    assert control(batch, "promote") in page
    operator_client.post(control(batch, "promote"))
    batch.refresh_from_db()
    assert batch.promoted_by.username == "operator"
    assert "promoted by operator at " in operator_client.get(dashboard(batch)).content.decode()
