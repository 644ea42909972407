"""migrate_fleet refuses bad arguments with exit code 2 and creates nothing."""

from __future__ import annotations

import datetime as dt
import io

import pytest
from django.core.management import CommandError, call_command

from fleet.models import ChargingStation, CsmsBackend
from migrations_app.models import MigrationBatch


@pytest.fixture
def two_csms(db):
    source = CsmsBackend.objects.create(name="csms-1", url="wss://csms-1.example.com/ocpp")
    target = CsmsBackend.objects.create(name="csms-2", url="wss://csms-2.example.com/ocpp")
    ChargingStation.objects.create(identity="CP-1", csms=source, firmware_version="4.2.85")
    return source, target


@pytest.mark.parametrize(
    "args",
    [
        ["--to", "nowhere", "--from", "csms-1"],
        ["--to", "csms-2", "--from", "nowhere"],
        ["--to", "csms-2", "--station", "CP-1", "--station", "CP-UNKNOWN"],
        ["--to", "csms-2", "--from", "csms-2"],  # no stations there
    ],
)
def test_bad_arguments_exit_2_and_create_no_batch(two_csms, args):
    with pytest.raises(CommandError) as refused:
        call_command("migrate_fleet", *args)
    assert refused.value.returncode == 2
    assert not MigrationBatch.objects.exists()


def test_a_target_with_an_unusable_url_is_refused_before_anything_is_sent(two_csms):
    _, target = two_csms
    CsmsBackend.objects.filter(id=target.id).update(url="wss://csms-2.example.com/ ocpp")
    with pytest.raises(CommandError, match="unusable URL") as refused:
        call_command("migrate_fleet", "--to", "csms-2", "--station", "CP-1")
    assert refused.value.returncode == 2
    assert not MigrationBatch.objects.exists()


@pytest.mark.usefixtures("redis_client")
def test_rollout_options_reach_the_batch(two_csms):
    call_command(
        "migrate_fleet", "--to", "csms-2", "--from", "csms-1", "--canary", "1",
        "--brake", "0.2", "--brake-min-sample", "5", "--window", "22:00-05:30",
        "--offline-wait", "600", "--max-in-flight", "7", "--rate-per-minute", "0",
    )  # fmt: skip
    batch = MigrationBatch.objects.get()
    assert (batch.canary_size, batch.brake_failure_ratio, batch.brake_min_sample) == (1, 0.2, 5)
    assert (str(batch.window_start), str(batch.window_end)) == ("22:00:00", "05:30:00")
    assert (batch.offline_wait_seconds, batch.max_in_flight) == (600, 7)
    assert batch.stations.get().canary
    assert batch.actions.get().kind == "start"


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--brake", "1.5"], "'1.5' is not a ratio from 0 up to"),
        (["--window", "22:00"], "--window"),
        (["--canary", "-1"], "'-1' is not a whole number of at least 0"),
        (["--max-in-flight", "many"], "'many' is not a whole number of at least 1"),
    ],
)
def test_bad_rollout_options_are_refused(two_csms, args, error):
    with pytest.raises(CommandError, match=error):
        call_command("migrate_fleet", "--to", "csms-2", "--from", "csms-1", *args)
    assert not MigrationBatch.objects.exists()


def test_help_documents_the_brake_defaults_and_the_exit_code_of_a_dead_stack():
    from migrations_app.management.commands.migrate_fleet import Command

    text = " ".join(Command().create_parser("manage.py", "migrate_fleet").format_help().split())
    assert "(default 0.5)" in text and "--no-brake" in text
    assert "all failed; 0 = off (default 5)" in text
    assert "3 when the batch cannot progress" in text


def test_brake_defaults_reach_the_batch_and_no_brake_turns_both_off(two_csms, redis_client):
    ChargingStation.objects.create(identity="CP-2", csms=two_csms[0], firmware_version="4.2.85")
    call_command("migrate_fleet", "--to", "csms-2", "--station", "CP-1")
    batch = MigrationBatch.objects.get()
    assert (batch.brake_failure_ratio, batch.brake_min_sample, batch.brake_first_failed) == (
        0.5,
        10,
        5,
    )
    call_command("migrate_fleet", "--to", "csms-2", "--station", "CP-2", "--no-brake")
    off = MigrationBatch.objects.exclude(id=batch.id).get()
    assert (off.brake_failure_ratio, off.brake_first_failed) == (None, 0)


@pytest.mark.usefixtures("redis_client")
def test_rollout_policies_reach_the_batch(two_csms, django_user_model):
    django_user_model.objects.create_user("alice")
    out = io.StringIO()
    call_command(
        "migrate_fleet", "--to", "csms-2", "--from", "csms-1", "--canary", "1",
        "--rate-per-minute", "6", "--rate-increase-factor", "2", "--rate-increase-every", "5",
        "--rate-max-per-minute", "120", "--pause-when", "fallback:10%:20",
        "--pause-when", "TIMEOUT:5", "--require-approval", "--promote-after-canary",
        "--start-at", "2099-12-24T22:00", "--end-at", "2099-12-25T06:00+01:00",
        "--user", "alice", stdout=out,
    )  # fmt: skip
    batch = MigrationBatch.objects.get()
    # Not "started": nothing starts before the approval.
    assert out.getvalue().strip() == (
        f"Batch {batch.id} created: 1 stations to csms-2, awaiting approval by a second person."
    )
    assert (batch.rate_per_minute, batch.rate_increase_factor) == (6, 2.0)
    assert (batch.rate_increase_every, batch.rate_max_per_minute) == (5, 120)
    assert batch.abort_criteria == [
        {"kind": "fallback", "percent": 10.0, "count": None, "min_sample": 20},
        {"kind": "timeout", "percent": None, "count": 5, "min_sample": 1},
    ]
    assert batch.approval_required and batch.promote_after_canary
    assert batch.starts_at == dt.datetime(2099, 12, 24, 22, 0, tzinfo=dt.UTC)
    assert batch.ends_at == dt.datetime(2099, 12, 25, 5, 0, tzinfo=dt.UTC)
    assert batch.created_by.username == "alice"  # so alice may not approve it


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--pause-when", "fallback"], "must read KIND:THRESHOLD"),
        (["--pause-when", "slow:5"], "the kind must be one of"),
        (["--pause-when", "timeout:0%"], "the percent must be over 0"),
        (["--pause-when", "timeout:five"], "the threshold is a number"),
        (["--start-at", "christmas"], "not an ISO 8601 date and time"),
        (["--end-at", "2020-01-01T00:00"], "already past"),
        (["--start-at", "2099-01-02T00:00", "--end-at", "2099-01-01T00:00"], "after its start"),
        (["--rate-increase-factor", "2"], "the stations done between increases"),
        (["--rate-increase-factor", "1"], "not a factor over 1"),
        (["--rate-increase-factor", "2", "--rate-increase-every", "3"], "a maximum above"),
        (["--promote-after-canary"], "needs a canary"),
        (["--rate-increase-every", "5"], "need an increase factor"),
        (["--rate-max-per-minute", "60"], "need an increase factor"),
        (["--user", "nobody"], "unknown user 'nobody'"),
    ],
)
def test_bad_rollout_policies_are_refused_with_the_reason(two_csms, args, error):
    with pytest.raises(CommandError, match=error):
        call_command("migrate_fleet", "--to", "csms-2", "--from", "csms-1", *args)
    assert not MigrationBatch.objects.exists()


def test_help_lists_every_rollout_policy_option():
    from migrations_app.management.commands.migrate_fleet import Command

    text = Command().create_parser("manage.py", "migrate_fleet").format_help()
    for option in (
        "--rate-increase-factor",
        "--rate-increase-every",
        "--rate-max-per-minute",
        "--pause-when",
        "--require-approval",
        "--promote-after-canary",
        "--start-at",
        "--end-at",
        "--user",
    ):
        assert option in text
    assert "fallback:10%:20" in text
