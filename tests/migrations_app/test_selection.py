"""Selections: a stations file and the vendor / model / firmware filters, in the command
and the admin's preview; what they leave out is counted, what is not found is listed."""

from __future__ import annotations

import io
import json

import pytest
from django.core.management import CommandError, call_command

from fleet.models import ChargingStation, CsmsBackend
from migrations_app.admin import ACTION_NAME
from migrations_app.models import MigrationBatch
from migrations_app.services.selection import (
    SelectionError,
    StationFilters,
    read_identities,
    read_stations_file,
)
from tests.migrations_app.conftest import by_identity, migrate


def test_a_stations_file_is_one_identity_a_line_with_comments_and_blanks():
    text = "# exported 2026-12-01\nCP-1\n\n  CP-2  \nCP-1\n# CP-3\n"
    assert read_identities(text) == ["CP-1", "CP-2"]


def test_a_csv_stations_file_is_read_by_its_identity_column():
    text = 'site,Identity,note\nnorth,CP-1,"a, b"\nsouth,CP-2,\nsouth,,empty\n'
    assert read_identities(text) == ["CP-1", "CP-2"]


def test_a_csv_without_an_identity_column_is_refused_naming_its_header():
    with pytest.raises(SelectionError, match=r"no 'identity' column.*site, id"):
        read_identities("site,id\nnorth,CP-1\n")


def test_a_stations_file_may_start_with_a_byte_order_mark(tmp_path):
    path = tmp_path / "stations.csv"
    path.write_bytes("identity\r\nCP-1\r\n".encode("utf-8-sig"))
    assert read_stations_file(str(path)) == ["CP-1"]


@pytest.mark.parametrize(
    ("content", "error"),
    [(None, "cannot read"), (b"\xff\xfe\x00", "not UTF-8"), (b"\n# none\n", "lists no station")],
)
def test_an_unreadable_or_empty_stations_file_is_refused(tmp_path, content, error):
    path = tmp_path / "stations.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(SelectionError, match=error):
        read_stations_file(str(path))


@pytest.mark.parametrize(
    ("firmware", "matches"),
    [("4.2.85", True), ("4.2.100", True), ("v5.0", True), ("4.2.9", False), ("", False)],
)
def test_the_firmware_filter_compares_versions_part_by_part(firmware, matches):
    filters = StationFilters(firmware_at_least="4.2.85")
    assert filters.matches_values("Acme", "X", firmware) is matches


def test_vendor_and_model_filters_ignore_case_and_surrounding_spaces():
    filters = StationFilters(vendor=" acme ", model="AC-22")
    assert filters.matches_values("ACME", "ac-22", "1.0")
    assert not filters.matches_values("Other", "AC-22", "1.0")
    assert StationFilters(firmware_at_least="latest").problems()


@pytest.fixture
def fleet_inventory(db):
    source = CsmsBackend.objects.create(name="csms-1", url="wss://csms-1.example.com/ocpp")
    CsmsBackend.objects.create(name="csms-2", url="wss://csms-2.example.com/ocpp")
    for identity, vendor, firmware in [
        ("CP-A1", "Acme", "4.2.85"),
        ("CP-A2", "Acme", "4.2.9"),
        ("CP-B1", "Bolt", "4.2.90"),
    ]:
        ChargingStation.objects.create(
            identity=identity, csms=source, vendor=vendor, model="M1", firmware_version=firmware
        )
    return source


def run(*args: str) -> tuple[dict, str]:
    out, err = io.StringIO(), io.StringIO()
    call_command("migrate_fleet", "--to", "csms-2", "--json", *args, stdout=out, stderr=err)
    return json.loads(out.getvalue()), err.getvalue()


@pytest.mark.usefixtures("redis_client")
def test_a_stations_file_with_unknown_identities_lists_them_and_takes_the_rest(
    fleet_inventory, tmp_path
):
    path = tmp_path / "wave-1.txt"
    path.write_text("CP-A1\nCP-GONE\nCP-B1\nCP-LOST\n")
    started, err = run("--stations-file", str(path))
    assert "2 station(s) not found, left out: CP-GONE, CP-LOST" in err
    batch = MigrationBatch.objects.get()
    assert started == {"batch": batch.id, "stations": 2, "selection": batch.selection}
    assert batch.selection == {"stations_file": str(path), "not_found": ["CP-GONE", "CP-LOST"]}
    assert sorted(batch.stations.values_list("station__identity", flat=True)) == [
        "CP-A1",
        "CP-B1",
    ]
    assert "2 not found" in batch.actions.get().detail


@pytest.mark.usefixtures("redis_client")
def test_filters_narrow_a_source_and_the_batch_records_what_they_left_out(fleet_inventory):
    _, err = run("--from", "csms-1", "--vendor", "acme", "--firmware-at-least", "4.2.85")
    batch = MigrationBatch.objects.get()
    assert list(batch.stations.values_list("station__identity", flat=True)) == ["CP-A1"]
    assert batch.selection == {
        "filters": {"vendor": "acme", "firmware_at_least": "4.2.85"},
        "filtered_out": 2,
    }
    assert "left out 2 station(s); 1 match" in err


@pytest.mark.usefixtures("redis_client")
def test_a_filter_alone_selects_over_the_whole_fleet(fleet_inventory):
    run("--model", "m1", "--vendor", "Bolt")
    batch = MigrationBatch.objects.get()
    assert list(batch.stations.values_list("station__identity", flat=True)) == ["CP-B1"]


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ([], "say which stations"),
        (["--from", "csms-1", "--vendor", "Nobody"], "no station matches"),
        (["--from", "csms-1", "--firmware-at-least", "latest"], "no version number"),
        (["--stations-file", "/nonexistent/stations.txt"], "cannot read"),
    ],
)
def test_a_selection_that_cannot_be_made_exits_2_and_creates_nothing(fleet_inventory, args, error):
    with pytest.raises(CommandError, match=error) as refused:
        call_command("migrate_fleet", "--to", "csms-2", *args, stderr=io.StringIO())
    assert refused.value.returncode == 2
    assert not MigrationBatch.objects.exists()


def test_help_lists_the_selection_options():
    from migrations_app.management.commands.migrate_fleet import Command

    text = Command().create_parser("manage.py", "migrate_fleet").format_help()
    for option in ("--stations-file", "--vendor", "--model", "--firmware-at-least"):
        assert option in text


@pytest.mark.usefixtures("redis_client")
def test_the_admin_preview_applies_the_filters_and_the_batch_takes_only_matches(
    fleet_inventory, admin_client
):
    ids = list(ChargingStation.objects.order_by("identity").values_list("pk", flat=True))
    target = CsmsBackend.objects.get(name="csms-2")
    form = {
        "action": ACTION_NAME,
        "_selected_action": ids,
        "_migrate": "1",
        "target": target.pk,
        "vendor": "ACME",
        "firmware_at_least": "4.2.85",
        "max_in_flight": 5,
        "rate_per_minute": 0,
        "canary_size": 0,
        "brake_failure_ratio": 0.5,
        "brake_first_failed": 5,
        "brake_min_sample": 10,
        "boot_timeout_seconds": 60,
        "idle_wait_seconds": 60,
        "offline_wait_seconds": 0,
        "security_extension": "require",
    }
    url = "/admin/fleet/chargingstation/"
    preview = admin_client.post(url, form)
    assert preview.status_code == 200
    page = preview.content.decode()
    assert 'data-count="filtered-out"' in page
    assert preview.context["preview"].total == 1
    assert preview.context["preview"].filtered_out.count == 2
    assert "vendor ACME, firmware at least 4.2.85" in page

    created = admin_client.post(url, {**form, "_confirm": "1"})
    assert created.status_code == 302
    batch = MigrationBatch.objects.get()
    assert list(batch.stations.values_list("station__identity", flat=True)) == ["CP-A1"]
    assert batch.selection["filtered_out"] == 2
    dashboard = admin_client.get(f"/admin/migrations_app/migrationbatch/{batch.id}/change/")
    assert "Left out by the filters" in dashboard.content.decode()


def test_a_firmware_filter_without_a_number_is_a_form_error(fleet_inventory, admin_client):
    target = CsmsBackend.objects.get(name="csms-2")
    ids = list(ChargingStation.objects.values_list("pk", flat=True))
    page = admin_client.post(
        "/admin/fleet/chargingstation/",
        {
            "action": ACTION_NAME,
            "_selected_action": ids,
            "_migrate": "1",
            "target": target.pk,
            "firmware_at_least": "newest",
            "max_in_flight": 5,
            "rate_per_minute": 0,
            "canary_size": 0,
            "brake_min_sample": 10,
            "boot_timeout_seconds": 60,
            "idle_wait_seconds": 60,
            "offline_wait_seconds": 0,
        },
    )
    assert "has no version number" in page.content.decode()
    assert not MigrationBatch.objects.exists()


def test_a_stations_file_migrates_the_listed_stations_end_to_end(stack, tmp_path):
    specs = [stack.station(f"CP-F{i}", vendor="Acme" if i < 2 else "Bolt") for i in range(3)]
    path = tmp_path / "stations.csv"
    path.write_text("identity,site\nCP-F0,north\nCP-F1,north\nCP-F2,south\nCP-NONE,x\n")
    with stack.fleet(specs) as fleet:
        code, report = migrate("--to", "csms-2", "--stations-file", str(path), "--vendor", "Acme")
        assert code == 0
        assert {k: v["state"] for k, v in by_identity(report).items()} == {
            "CP-F0": "done",
            "CP-F1": "done",
        }
        assert report["selection"]["not_found"] == ["CP-NONE"]
        assert report["selection"]["filtered_out"] == 1
        for identity in ("CP-F0", "CP-F1"):
            assert fleet[identity].connected_url == stack.target_url
            assert fleet[identity].reset_count == 1
        # The station the filter left out was never touched.
        left_out = fleet["CP-F2"]
        assert left_out.connected_url == stack.source_url and left_out.reset_count == 0
