"""The security extension on simulated stations: installed roots, GetInstalledCertificateIds,
InstallCertificate, AdditionalRootCertificateCheck, firmware without it, and wss:// checked
against the installed roots. Real sockets, a central system written with `ocpp`."""

from __future__ import annotations

import asyncio
import json
import ssl

import pytest
from ocpp import exceptions as ocpp_errors
from ocpp.v16 import call
from ocpp.v16.enums import CertificateUse, ResetStatus, ResetType

from devstack.processes import wait_until_async
from ocpp_gateway.certificates import CertificateHashData, hash_data
from ocpp_gateway.simulator import Behaviour, Fleet, StationSpec, read_journal
from ocpp_gateway.simulator.cli import build_parser, build_specs
from tests.simulator.certs import make_root, make_signed_root, write_server_cert
from tests.simulator.csms import FAST, CentralSystem, run
from tests.simulator.test_migration import point_at

ID = "SIM-0001"
ROOT = CertificateUse.central_system_root_certificate


def listed(answer) -> list[CertificateHashData]:
    return [CertificateHashData.from_payload(d) for d in answer.certificate_hash_data or []]


def test_it_lists_its_installed_roots_and_journals_them_at_power_on(tmp_path):
    root = make_root("CSMS 1 Root", rsa_key=True)
    journal = tmp_path / "journal.jsonl"

    async def scenario():
        async with CentralSystem() as csms:
            spec = StationSpec(ID, url=csms.url, root_certificates=(root.pem,))
            async with Fleet([spec], timing=FAST, journal=journal) as fleet:
                await wait_until_async(lambda: fleet[ID].online, 10, "boot")
                answer = await csms.call(ID, call.GetInstalledCertificateIds(certificate_type=ROOT))
                assert answer.status == "Accepted"
                assert listed(answer) == [hash_data(root.certificate)]
                manufacturer = await csms.call(
                    ID,
                    call.GetInstalledCertificateIds(
                        certificate_type=CertificateUse.manufacturer_root_certificate
                    ),
                )
                assert manufacturer.status == "NotFound"

    run(scenario())
    powered_on = [e for e in read_journal(journal) if e["event"] == "powered_on"]
    assert powered_on[0]["root_certificates"] == [hash_data(root.certificate).as_payload()]
    assert powered_on[0]["security_extension"] is True


def test_a_station_without_roots_answers_not_found_then_installs_one(tmp_path):
    root = make_root("CSMS 2 Root")
    journal = tmp_path / "journal.jsonl"

    async def scenario():
        async with (
            CentralSystem() as csms,
            Fleet([StationSpec(ID, url=csms.url)], timing=FAST, journal=journal) as fleet,
        ):
            await wait_until_async(lambda: fleet[ID].online, 10, "boot")
            before = await csms.call(ID, call.GetInstalledCertificateIds(certificate_type=ROOT))
            assert before.status == "NotFound" and before.certificate_hash_data is None
            bad = await csms.call(
                ID, call.InstallCertificate(certificate_type=ROOT, certificate="not a PEM")
            )
            assert bad.status == "Rejected"
            installed = await csms.call(
                ID, call.InstallCertificate(certificate_type=ROOT, certificate=root.pem)
            )
            assert installed.status == "Accepted"
            # A second install of the same root changes nothing.
            again = await csms.call(
                ID, call.InstallCertificate(certificate_type=ROOT, certificate=root.pem)
            )
            assert again.status == "Accepted"
            after = await csms.call(ID, call.GetInstalledCertificateIds(certificate_type=ROOT))
            assert after.status == "Accepted"
            assert listed(after) == [hash_data(root.certificate)]

    run(scenario())
    events = [e for e in read_journal(journal) if e["event"].startswith("certificate_")]
    assert [e["event"] for e in events] == [
        "certificate_rejected",
        "certificate_installed",
        "certificate_installed",
    ]
    assert "not a PEM certificate" in events[0]["reason"]
    assert events[1]["root_certificates"] == [hash_data(root.certificate).as_payload()]


def test_with_additional_root_check_only_a_root_signed_by_an_installed_one_is_accepted():
    old, stranger = make_root("CSMS 1 Root"), make_root("Stranger Root")
    new = make_signed_root("CSMS 2 Root", old)

    async def scenario():
        async with CentralSystem() as csms:
            spec = StationSpec(
                ID,
                url=csms.url,
                root_certificates=(old.pem,),
                additional_root_certificate_check=True,
            )
            async with Fleet([spec], timing=FAST) as fleet:
                await wait_until_async(lambda: fleet[ID].online, 10, "boot")
                conf = await csms.call(
                    ID, call.GetConfiguration(key=["AdditionalRootCertificateCheck"])
                )
                assert conf.configuration_key == [
                    {"key": "AdditionalRootCertificateCheck", "readonly": True, "value": "true"}
                ]
                foreign = await csms.call(
                    ID, call.InstallCertificate(certificate_type=ROOT, certificate=stranger.pem)
                )
                assert foreign.status == "Rejected"
                signed = await csms.call(
                    ID, call.InstallCertificate(certificate_type=ROOT, certificate=new.pem)
                )
                assert signed.status == "Accepted"
                after = await csms.call(ID, call.GetInstalledCertificateIds(certificate_type=ROOT))
                # It keeps one root: the new one replaced the old (kept only as a fallback).
                assert listed(after) == [hash_data(new.certificate, issuer=old.certificate)]
                assert fleet[ID].events("certificate_rejected")[0]["reason"] == (
                    "AdditionalRootCertificateCheck: not signed by an installed root"
                )

    run(scenario())


def test_under_additional_root_check_the_old_root_is_a_fallback_until_the_new_one_connects(
    tmp_path,
):
    """OCPP 1.6 security whitepaper: the new root replaces the old one, which stays as a
    fallback until the station has connected successfully using the new one."""
    old = make_root("CSMS 1 Root")
    new = make_signed_root("CSMS 2 Root", old)
    journal = tmp_path / "journal.jsonl"

    def server(ca, name):
        certfile, keyfile = write_server_cert(ca, tmp_path, name=name)
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(certfile, keyfile)
        return CentralSystem(tls=tls)

    async def scenario():
        async with server(old, "csms-1") as csms_1, server(new, "csms-2") as csms_2:
            spec = StationSpec(
                ID, url=csms_1.url, root_certificates=(old.pem,),
                additional_root_certificate_check=True,
            )  # fmt: skip
            async with Fleet([spec], timing=FAST, journal=journal) as fleet:
                station = fleet[ID]
                await wait_until_async(lambda: station.online, 10, "boot on csms-1 (old root)")
                installed = await csms_1.call(
                    ID, call.InstallCertificate(certificate_type=ROOT, certificate=new.pem)
                )
                assert installed.status == "Accepted"
                assert station.installed_root_hash_data() == [
                    hash_data(new.certificate, issuer=old.certificate)
                ]
                assert len(station.root_fallback) == 1

                # Reconnecting to csms-1 (its certificate from the old root) still works,
                # through the fallback, which stays.
                reset = await csms_1.call(ID, call.Reset(type=ResetType.hard))
                assert reset.status == ResetStatus.accepted
                await wait_until_async(
                    lambda: station.events("root_fallback_used"), 10, "the fallback"
                )
                await wait_until_async(lambda: station.online, 10, "back on csms-1")
                assert station.connected_url == csms_1.url
                assert len(station.root_fallback) == 1

                # The first connection the new root verifies removes the old one.
                await point_at(csms_1, csms_2.url)
                await wait_until_async(
                    lambda: station.events("root_fallback_removed"), 10, "removal"
                )
                await wait_until_async(lambda: station.online, 10, "online on csms-2")
                assert station.connected_url == csms_2.url
                assert station.root_fallback == ()
                assert station.installed_root_hash_data() == [
                    hash_data(new.certificate, issuer=old.certificate)
                ]

    run(scenario())
    events = [e for e in read_journal(journal) if e["station"] == ID]
    names = [e["event"] for e in events]
    assert names.index("root_certificate_replaced") < names.index("root_fallback_used")
    assert names.index("root_fallback_used") < names.index("root_fallback_removed")
    replaced = next(e for e in events if e["event"] == "root_certificate_replaced")
    assert replaced["replaced"] == [hash_data(old.certificate).as_payload()]
    removed = next(e for e in events if e["event"] == "root_fallback_removed")
    assert removed["removed"] == [hash_data(old.certificate).as_payload()]
    assert removed["url"].startswith("wss://")
    assert removed["root_certificates"] == [
        hash_data(new.certificate, issuer=old.certificate).as_payload()
    ]


def test_a_lost_install_certificate_answer_leaves_the_root_installed(tmp_path):
    root = make_root("CSMS 2 Root")
    journal = tmp_path / "journal.jsonl"

    async def scenario():
        async with CentralSystem() as csms:
            spec = StationSpec(
                ID, url=csms.url, behaviour=Behaviour(lose_install_certificate_answer=True)
            )
            async with Fleet([spec], timing=FAST, journal=journal) as fleet:
                await wait_until_async(lambda: fleet[ID].online, 10, "boot")
                install = call.InstallCertificate(certificate_type=ROOT, certificate=root.pem)
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(csms.call(ID, install), 2)
                listing = await csms.call(
                    ID, call.GetInstalledCertificateIds(certificate_type=ROOT)
                )
                assert listed(listing) == [hash_data(root.certificate)]
                # Only the first answer is lost; installing it again changes nothing.
                assert (await csms.call(ID, install)).status == "Accepted"
                assert fleet[ID].installed_root_hash_data() == [hash_data(root.certificate)]

    run(scenario())
    names = [e["event"] for e in read_journal(journal) if e["station"] == ID]
    assert names.count("answer_lost") == 1
    assert names.count("certificate_installed") == 2


def test_firmware_without_the_security_extension_answers_not_implemented():
    async def scenario():
        async with CentralSystem() as csms:
            spec = StationSpec(ID, url=csms.url, behaviour=Behaviour(no_security_extension=True))
            async with Fleet([spec], timing=FAST) as fleet:
                await wait_until_async(lambda: fleet[ID].online, 10, "boot")
                with pytest.raises(ocpp_errors.NotImplementedError):
                    await csms.call(ID, call.GetInstalledCertificateIds(certificate_type=ROOT))
                with pytest.raises(ocpp_errors.NotImplementedError):
                    await csms.call(
                        ID,
                        call.InstallCertificate(
                            certificate_type=ROOT, certificate=make_root("R").pem
                        ),
                    )
                conf = await csms.call(
                    ID, call.GetConfiguration(key=["AdditionalRootCertificateCheck"])
                )
                assert conf.unknown_key == ["AdditionalRootCertificateCheck"]
                # The station is still fine for everything else.
                assert fleet[ID].online

    run(scenario())


def test_a_wss_profile_is_verified_against_the_installed_roots(tmp_path):
    ca, other = make_root("CSMS TLS Root"), make_root("Other Root")
    certfile, keyfile = write_server_cert(ca, tmp_path)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(certfile, keyfile)

    async def scenario():
        async with CentralSystem(tls=tls) as csms:
            trusting = StationSpec("SIM-TRUST", url=csms.url, root_certificates=(ca.pem,))
            foreign = StationSpec("SIM-OTHER", url=csms.url, root_certificates=(other.pem,))
            async with Fleet([trusting, foreign], timing=FAST) as fleet:
                await wait_until_async(
                    lambda: fleet["SIM-TRUST"].online, 10, "the trusting station"
                )
                await wait_until_async(
                    lambda: fleet["SIM-OTHER"].events("connect_failed"), 10, "a refused handshake"
                )
                error = fleet["SIM-OTHER"].events("connect_failed")[0]["error"]
                assert "CERTIFICATE_VERIFY_FAILED" in error
                assert not csms.seen("SIM-OTHER", "BootNotification")
                assert fleet["SIM-TRUST"].connected_url.startswith("wss://")

    run(scenario())


def test_the_command_line_installs_roots_and_sets_the_security_options(tmp_path):
    root_a, root_b = make_root("A"), make_root("B")
    bundle = tmp_path / "roots.pem"
    bundle.write_text(root_a.pem + root_b.pem)
    args = build_parser().parse_args(
        ["--url", "ws://a/ocpp", "--count", "3", "--root-certificate", str(bundle),
         "--additional-root-check", "2", "--no-security-extension", "3"]
    )  # fmt: skip
    specs = build_specs(args)
    assert all(spec.root_certificates == (root_a.pem, root_b.pem) for spec in specs)
    assert [s.additional_root_certificate_check for s in specs] == [False, True, False]
    assert [s.behaviour.no_security_extension for s in specs] == [False, False, True]
    lossy = build_specs(
        build_parser().parse_args(
            ["--url", "ws://a/ocpp", "--count", "2", "--lose-install-certificate-answer", "2"]
        )
    )
    assert [s.behaviour.lose_install_certificate_answer for s in lossy] == [False, True]
    assert "--lose-install-certificate-answer IDS" in build_parser().format_help()
    assert "--root-certificate FILE" in build_parser().format_help()


def test_a_spec_file_entry_sets_roots_the_check_and_the_missing_extension(tmp_path):
    root = make_root("Spec Root")
    pem_file = tmp_path / "root.pem"
    pem_file.write_text(root.pem)
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(
        json.dumps(
            [
                {"identity": "SIM-0001", "root_certificates": [str(pem_file)],
                 "additional_root_certificate_check": True},
                {"identity": "LEGACY-1", "root_certificates": [root.pem],
                 "behaviour": {"no_security_extension": True}},
            ]
        )
    )  # fmt: skip
    args = build_parser().parse_args(["--url", "ws://a/ocpp", "--spec", str(spec_file)])
    specs = {spec.identity: spec for spec in build_specs(args)}
    assert specs["SIM-0001"].root_certificates == (root.pem,)
    assert specs["SIM-0001"].additional_root_certificate_check
    assert specs["LEGACY-1"].behaviour.no_security_extension
    with pytest.raises(ValueError, match="root certificate"):
        StationSpec("X", url="ws://a/ocpp", root_certificates=("nope -----BEGIN x",))
