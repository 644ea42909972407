"""The root CA options (migrate_fleet, the admin form, the batch) and when the check runs."""

from __future__ import annotations

import pytest
from django.core.management import CommandError, call_command

from fleet.models import ChargingStation, CsmsBackend
from migrations_app.forms import MigrateStationsForm
from migrations_app.models import MigrationBatch, OcppExchange, StationMigration
from migrations_app.services.batches import BatchOptions, batch_create
from migrations_app.services.runner import run_step
from migrations_app.services.steps import root_ca_check_needed
from tests.simulator.certs import make_root

State = StationMigration.State


@pytest.fixture
def two_csms(db):
    source = CsmsBackend.objects.create(name="csms-1", url="ws://csms-1.example.com/ocpp")
    target = CsmsBackend.objects.create(
        name="csms-2", url="wss://csms-2.example.com/ocpp", root_ca_pem=make_root("R").pem
    )
    ChargingStation.objects.create(identity="CP-1", csms=source, firmware_version="4.2.85")
    ChargingStation.objects.create(identity="CP-2", csms=source, firmware_version="4.2.85")
    return source, target


@pytest.mark.usefixtures("redis_client")
def test_migrate_fleet_passes_the_root_ca_options_to_the_batch(two_csms):
    call_command("migrate_fleet", "--to", "csms-2", "--station", "CP-1")
    default = MigrationBatch.objects.get()
    assert (default.install_root_ca, default.security_extension) == (False, "require")
    call_command(
        "migrate_fleet", "--to", "csms-2", "--station", "CP-2", "--install-root-ca",
        "--security-extension", "proceed",
    )  # fmt: skip
    chosen = MigrationBatch.objects.exclude(id=default.id).get()
    assert (chosen.install_root_ca, chosen.security_extension) == (True, "proceed")


def test_migrate_fleet_refuses_an_unknown_security_extension_choice(two_csms):
    with pytest.raises(CommandError, match="invalid choice"):
        call_command(
            "migrate_fleet", "--to", "csms-2", "--station", "CP-1", "--security-extension", "x"
        )
    assert not MigrationBatch.objects.exists()
    assert BatchOptions(security_extension="x").problems() == [
        "security extension must be one of require, proceed"
    ]


def test_the_admin_form_carries_the_root_ca_options(two_csms):
    _, target = two_csms
    base = {"target": target.id, "max_in_flight": 5, "rate_per_minute": 0, "canary_size": 0,
            "brake_min_sample": 10, "boot_timeout_seconds": 300, "idle_wait_seconds": 60,
            "offline_wait_seconds": 0}  # fmt: skip
    form = MigrateStationsForm({**base, "install_root_ca": "on", "security_extension": "proceed"})
    assert form.is_valid(), form.errors
    options = form.options()
    assert (options.install_root_ca, options.security_extension) == (True, "proceed")
    # Left out (an older page, a script): the defaults.
    form = MigrateStationsForm(base)
    assert form.is_valid(), form.errors
    assert (form.options().install_root_ca, form.options().security_extension) == (
        False,
        "require",
    )
    titles = [title for title, _ in form.fieldsets()]
    assert "Root certificate" in titles


@pytest.mark.usefixtures("redis_client")
def test_the_check_runs_only_for_a_wss_target_with_a_root_ca(two_csms):
    target = two_csms[1]
    batch = batch_create(
        target=target, stations=ChargingStation.objects.filter(identity="CP-1"),
        options=BatchOptions(),
    )  # fmt: skip
    migration = batch.stations.select_related("batch__target").get()
    assert root_ca_check_needed(migration)
    migration.batch.target.root_ca_pem = ""
    assert not root_ca_check_needed(migration)
    migration.batch.target.root_ca_pem = target.root_ca_pem
    migration.target_url = "ws://csms-2.example.com/ocpp"
    assert not root_ca_check_needed(migration)


@pytest.mark.usefixtures("redis_client")
def test_an_unreadable_root_ca_fails_the_check_before_asking_the_station(two_csms):
    _, target = two_csms
    batch = batch_create(
        target=target, stations=ChargingStation.objects.filter(identity="CP-1"),
        options=BatchOptions(),
    )  # fmt: skip
    migration = batch.stations.get()
    # Stored before the validator existed, or edited in the database.
    CsmsBackend.objects.filter(id=target.id).update(root_ca_pem="garbage")
    StationMigration.objects.filter(id=migration.id).update(state=State.CHECKING_ROOT_CA)
    run_step(migration.id, State.CHECKING_ROOT_CA)
    migration.refresh_from_db()
    assert migration.state == State.FAILED
    assert migration.failed_step == State.CHECKING_ROOT_CA
    assert migration.reason.startswith("the root CA certificate of csms-2 cannot be read")
    assert not OcppExchange.objects.exists()
