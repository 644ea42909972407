"""The root CA pre-flight against a wss:// target: real gateways (the target's serving TLS with
a certificate from a test CA), a real worker and simulated stations that verify the target
against the roots they have installed, so a missing root is a real failure, not a flag."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fleet.models import CsmsBackend
from fleet.services.inventory import csms_backend_upsert
from migrations_app.models import OcppExchange, StationMigration
from ocpp_gateway.certificates import hash_data
from ocpp_gateway.simulator import read_journal
from ocpp_gateway.simulator.spec import Behaviour
from tests.migrations_app.conftest import WORKER_ENV, Stack, by_identity, migrate
from tests.simulator.certs import Ca, make_root, make_signed_root, write_server_cert

State = StationMigration.State


@pytest.fixture
def ca() -> Ca:
    return make_root("CSMS 2 Root CA")


@dataclass
class TlsStack(Stack):
    # Keyword-only: Stack's last field (upstreams) has a default.
    worker_log: Path = field(kw_only=True)


@pytest.fixture
def tls_stack(start_gateway, start_worker, redis_client, tmp_path, ca) -> TlsStack:
    return _tls_stack(start_gateway, start_worker, redis_client, tmp_path, ca)


def _tls_stack(start_gateway, start_worker, redis_client, tmp_path, ca: Ca) -> TlsStack:
    """csms-1 (ws://, open) and csms-2 at wss:// (a server certificate issued by ``ca``)
    whose CsmsBackend carries ``ca`` as its root CA."""
    certfile, keyfile = write_server_cert(ca, tmp_path, name="csms-2")
    source_url = start_gateway("csms-1", "--open")
    served = start_gateway("csms-2", "--certfile", str(certfile), "--keyfile", str(keyfile))
    target_url = "wss://" + served.removeprefix("ws://")
    csms_backend_upsert(name="csms-1", url=source_url, open_admission=True)
    target, _ = csms_backend_upsert(name="csms-2", url=target_url)
    target.root_ca_pem = ca.pem
    target.full_clean()
    target.save(update_fields=["root_ca_pem"])
    worker, log = start_worker("w1", beat=True, **WORKER_ENV)
    return TlsStack(
        source_url, target_url, start_worker, worker, redis_client, target, worker_log=log
    )


def exchanges(identity: str) -> list[tuple[str, str, str]]:
    return list(
        OcppExchange.objects.filter(migration__station__identity=identity).values_list(
            "step", "action", "csms"
        )
    )


def journal_of(journal: Path, identity: str) -> list[str]:
    return [e["event"] for e in read_journal(journal) if e["station"] == identity]


def test_stations_lacking_the_root_or_the_extension_are_skipped_and_left_untouched(
    tls_stack, ca, tmp_path
):
    stack = tls_stack
    mine = make_root("CSMS 1 Root CA")
    specs = [
        stack.station("CP-MISSING"),
        stack.station("CP-DRY"),
        stack.station("CP-NOEXT", behaviour=Behaviour(no_security_extension=True)),
        # AdditionalRootCertificateCheck: a root not signed by its own cannot work, even
        # though the batch would allow installing it.
        stack.station(
            "CP-STRICT",
            root_certificates=(mine.pem,),
            additional_root_certificate_check=True,
        ),
    ]
    journal = tmp_path / "stations.jsonl"
    with stack.fleet(specs, journal=journal) as fleet:
        code, report = migrate("--to", "csms-2", "--station", "CP-MISSING", "--station",
                               "CP-NOEXT", "--rate-per-minute", "0")  # fmt: skip
        assert code == 0, report
        entries = by_identity(report)
        assert {e["state"] for e in entries.values()} == {"skipped"}
        assert {e["step"] for e in entries.values()} == {"skipped"}
        serial = format(ca.certificate.serial_number, "x")
        assert entries["CP-MISSING"]["reason"] == (
            f"the root CA certificate of csms-2 (serial {serial}) is not installed on the "
            "station: install it first (or allow it: migrate_fleet --install-root-ca)"
        )
        assert entries["CP-NOEXT"]["reason"].startswith(
            "the station does not support the OCPP 1.6 security extension "
            "(GetInstalledCertificateIds: station answered CALLERROR NotImplemented"
        )
        assert entries["CP-NOEXT"]["reason"].endswith("(batch option: require)")

        code, report = migrate("--to", "csms-2", "--station", "CP-STRICT", "--install-root-ca")
        assert code == 0, report
        strict = by_identity(report)["CP-STRICT"]
        assert strict["state"] == "skipped"
        assert "AdditionalRootCertificateCheck is true" in strict["reason"]
        assert "no installed root signed it" in strict["reason"]

        # A dry run says what it would install, and installs nothing.
        code, report = migrate(
            "--to", "csms-2", "--station", "CP-DRY", "--install-root-ca", "--dry-run"
        )  # fmt: skip
        assert code == 0, report
        dry = by_identity(report)["CP-DRY"]
        assert dry["state"] == "done"
        assert dry["reason"].startswith(
            f"the root CA certificate of csms-2 (serial {serial}) is not installed: would "
            "install it; dry run: would write NetworkConnectionProfile2="
        )

        for spec in specs:
            station = fleet[spec.identity]
            assert station.connected_url == stack.source_url
            assert station.reset_count == 0
    for identity in ("CP-MISSING", "CP-DRY", "CP-NOEXT", "CP-STRICT"):
        # Asked, never changed: no ChangeConfiguration, no InstallCertificate, no Reset.
        assert exchanges(identity) == [
            ("reading_config", "GetConfiguration", "csms-1"),
            ("checking_root_ca", "GetInstalledCertificateIds", "csms-1"),
        ]
        events = journal_of(journal, identity)
        assert not {"config_changed", "reset", "certificate_installed"} & set(events), events
    assert not (
        StationMigration.objects.filter(station__identity="CP-STRICT")
        .get()
        .state_changes.filter(to_state=State.SETTING_URL)
        .exists()
    )


def test_with_the_root_installed_allowed_or_not_checkable_stations_migrate_over_tls(
    tls_stack, ca, tmp_path
):
    stack = tls_stack
    specs = [
        stack.station("CP-HAS", root_certificates=(ca.pem,)),
        stack.station("CP-INSTALL"),
        # Trusts the CA through its own store, but cannot say so.
        stack.station(
            "CP-NOEXT",
            root_certificates=(ca.pem,),
            behaviour=Behaviour(no_security_extension=True),
        ),
    ]
    journal = tmp_path / "stations.jsonl"
    with stack.fleet(specs, journal=journal) as fleet:
        code, report = migrate("--to", "csms-2", "--from", "csms-1", "--rate-per-minute", "0",
                               "--install-root-ca", "--security-extension", "proceed")  # fmt: skip
        assert code == 0, report
        entries = by_identity(report)
        assert {e["state"] for e in entries.values()} == {"done"}, report
        for spec in specs:
            # On the target through a verified TLS connection: the root really is there.
            station = fleet[spec.identity]
            assert station.connected_url == stack.target_url
            assert station.reset_count == 1
        installed = fleet["CP-INSTALL"].installed_root_hash_data()
        assert installed == [hash_data(ca.certificate)]
    assert entries["CP-HAS"]["warnings"] == [] and entries["CP-INSTALL"]["warnings"] == []
    [warning] = entries["CP-NOEXT"]["warnings"]
    assert warning.startswith("the station does not support the OCPP 1.6 security extension")
    assert warning.endswith("proceeding as the batch allows")

    steps = [(step, action) for step, action, _ in exchanges("CP-HAS")]
    assert steps[:3] == [
        ("reading_config", "GetConfiguration"),
        ("checking_root_ca", "GetInstalledCertificateIds"),
        ("setting_url", "ChangeConfiguration"),
    ]
    assert exchanges("CP-INSTALL")[:4] == [
        ("reading_config", "GetConfiguration", "csms-1"),
        ("checking_root_ca", "GetInstalledCertificateIds", "csms-1"),
        ("checking_root_ca", "InstallCertificate", "csms-1"),
        ("checking_root_ca", "GetInstalledCertificateIds", "csms-1"),
    ]
    install = OcppExchange.objects.get(
        migration__station__identity="CP-INSTALL", action="InstallCertificate"
    )
    assert install.request == {
        "certificate_type": "CentralSystemRootCertificate",
        "certificate": ca.pem.strip(),
    }
    assert install.response == {"status": "Accepted"}
    events = journal_of(journal, "CP-INSTALL")
    # Installed before anything was written, and before the Reset.
    assert events.index("certificate_installed") < events.index("config_changed")
    reasons = dict(
        StationMigration.objects.get(station__identity="CP-INSTALL")
        .state_changes.filter(from_state=State.CHECKING_ROOT_CA)
        .values_list("to_state", "reason")
    )
    assert "installed (InstallCertificate) and verified" in reasons[State.SETTING_URL]
    assert CsmsBackend.objects.get(name="csms-2").root_ca_pem == ca.pem
    # Its own task, named after the step, as Flower lists it.
    log = stack.worker_log.read_text()
    assert "Task migrations.check_root_ca[" in log and "succeeded" in log


def test_under_additional_root_check_a_root_signed_by_the_installed_one_is_installed(
    start_gateway, start_worker, redis_client, tmp_path
):
    # The target's root was signed by the one the stations have: the firmware takes it.
    old = make_root("CSMS 1 Root CA")
    new = make_signed_root("CSMS 2 Root CA", old)
    stack = _tls_stack(start_gateway, start_worker, redis_client, tmp_path, new)
    spec = stack.station(
        "CP-ROLL", root_certificates=(old.pem,), additional_root_certificate_check=True
    )
    journal = tmp_path / "stations.jsonl"
    with stack.fleet([spec], journal=journal) as fleet:
        code, report = migrate("--to", "csms-2", "--station", "CP-ROLL", "--install-root-ca")
        assert code == 0, report
        entry = by_identity(report)["CP-ROLL"]
        assert entry["state"] == "done", report
        station = fleet["CP-ROLL"]
        assert station.connected_url == stack.target_url
        # It keeps one root: the new one replaced the old, which it dropped once it had
        # connected to the target using the new one (OCPP 1.6 security whitepaper).
        assert station.installed_root_hash_data() == [
            hash_data(new.certificate, issuer=old.certificate)
        ]
        assert station.root_fallback == ()
    [warning] = entry["warnings"]
    assert "installed under AdditionalRootCertificateCheck" in warning
    assert warning.endswith(
        "moving it back to a wss:// csms-1 will need csms-1's root certificate reinstalled first"
    )
    lines = [e for e in read_journal(journal) if e["station"] == "CP-ROLL"]
    events = [e["event"] for e in lines]
    assert events.index("certificate_installed") < events.index("reset")
    assert "root_certificate_replaced" in events
    removed = next(e for e in lines if e["event"] == "root_fallback_removed")
    assert removed["url"] == stack.target_url
    assert removed["removed"] == [hash_data(old.certificate).as_payload()]
    assert removed["root_certificates"] == [
        hash_data(new.certificate, issuer=old.certificate).as_payload()
    ]
    # Removed on the connection to the target, after the Reset; never used as a fallback.
    assert events.index("reset") < events.index("root_fallback_removed")
    assert "root_fallback_used" not in events
    assert [action for _, action, _ in exchanges("CP-ROLL")][:4] == [
        "GetConfiguration",
        "GetInstalledCertificateIds",
        "InstallCertificate",
        "GetInstalledCertificateIds",
    ]
    snapshot = StationMigration.objects.get(station__identity="CP-ROLL").config_snapshot
    assert snapshot["AdditionalRootCertificateCheck"] == "true"


def test_a_lost_install_certificate_answer_is_retried_and_found_installed(tls_stack, ca, tmp_path):
    """The station applies InstallCertificate but its answer never comes: the step times
    out and runs again, finds the root installed and proceeds; one install, one Reset."""
    stack = tls_stack
    spec = stack.station("CP-LOST", behaviour=Behaviour(lose_install_certificate_answer=True))
    journal = tmp_path / "stations.jsonl"
    with stack.fleet([spec], journal=journal) as fleet:
        code, report = migrate("--to", "csms-2", "--station", "CP-LOST", "--install-root-ca")
        assert code == 0, report
        entry = by_identity(report)["CP-LOST"]
        assert entry["state"] == "done", report
        station = fleet["CP-LOST"]
        assert station.connected_url == stack.target_url
        assert station.reset_count == 1
        assert station.installed_root_hash_data() == [hash_data(ca.certificate)]
    assert entry["warnings"] == []
    root_steps = [
        (action, outcome)
        for action, outcome in OcppExchange.objects.filter(
            migration__station__identity="CP-LOST", step=State.CHECKING_ROOT_CA
        ).values_list("action", "outcome")
    ]
    assert root_steps == [
        ("GetInstalledCertificateIds", "result"),
        ("InstallCertificate", "timeout"),
        ("GetInstalledCertificateIds", "result"),
    ]
    events = journal_of(journal, "CP-LOST")
    assert events.count("answer_lost") == 1
    assert events.count("certificate_installed") == 1
    assert events.count("reset") == 1
    reasons = list(
        StationMigration.objects.get(station__identity="CP-LOST")
        .state_changes.filter(from_state=State.CHECKING_ROOT_CA)
        .values_list("to_state", "reason")
    )
    assert reasons[-1][0] == State.SETTING_URL
    assert reasons[-1][1].endswith("is installed"), reasons
