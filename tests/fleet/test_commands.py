import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from devstack.processes import ROOT
from fleet.models import ChargingStation, CsmsBackend
from tests.conftest import process_env

BAD_URLS = [
    "ws://csms.example.com/oc pp",
    "ws://csms.example.com/ocpp\t",
    "ws://csms.example.com/ocpp\n",
    "'ws://csms.example.com/ocpp'",
    'ws://csms.example.com/"ocpp"',
    "http://csms.example.com/ocpp",
    "ws:///ocpp",
    "wss://csms.example.com/" + "x" * 500,
]


def run(*args: str) -> str:
    out = StringIO()
    call_command(*args, stdout=out, stderr=StringIO())
    return out.getvalue()


class TestAddCsms:
    def test_it_creates_a_backend(self, db):
        output = run("add_csms", "alpha", "wss://alpha.example.com/ocpp")

        assert "Created CSMS alpha" in output
        backend = CsmsBackend.objects.get()
        assert (backend.name, backend.url) == ("alpha", "wss://alpha.example.com/ocpp")

    def test_open_is_an_explicit_opt_in_each_time(self, db):
        assert "admits any station (open)" in run(
            "add_csms", "lab", "ws://lab.example.com/ocpp", "--open"
        )
        assert CsmsBackend.objects.get().open_admission is True

        output = run("add_csms", "lab", "ws://lab.example.com/ocpp")

        assert "admits registered stations only" in output
        assert CsmsBackend.objects.get().open_admission is False

    def test_it_updates_the_url(self, db):
        run("add_csms", "alpha", "wss://alpha.example.com/ocpp")

        output = run("add_csms", "alpha", "ws://alpha-2.example.com:8080/ocpp")

        assert "Updated CSMS alpha" in output
        assert list(CsmsBackend.objects.values_list("name", "url")) == [
            ("alpha", "ws://alpha-2.example.com:8080/ocpp")
        ]

    @pytest.mark.parametrize("url", BAD_URLS)
    def test_it_refuses_a_bad_url_writing_nothing(self, db, url):
        with pytest.raises(CommandError) as raised:
            run("add_csms", "alpha", url)

        assert raised.value.returncode == 2
        assert "url:" in str(raised.value)
        assert not CsmsBackend.objects.exists()

    def test_it_keeps_the_old_url_when_the_new_one_is_bad(self, db):
        run("add_csms", "alpha", "wss://alpha.example.com/ocpp")

        with pytest.raises(CommandError):
            run("add_csms", "alpha", "wss://alpha.example.com/ocpp ")

        assert CsmsBackend.objects.get().url == "wss://alpha.example.com/ocpp"

    @pytest.mark.parametrize("name", ["two words", "a:b", "", "x" * 65])
    def test_it_refuses_a_bad_name(self, db, name):
        with pytest.raises(CommandError) as raised:
            run("add_csms", name, "wss://alpha.example.com/ocpp")

        assert raised.value.returncode == 2
        assert "name:" in str(raised.value)
        assert not CsmsBackend.objects.exists()

    def test_it_exits_2_from_the_shell(self, transactional_db, redis_url):
        def manage(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run(
                [sys.executable, "manage.py", *args],
                cwd=ROOT,
                env={**os.environ, **process_env(redis_url)},
                capture_output=True,
                text=True,
                timeout=60,
            )

        bad = manage("add_csms", "alpha", "ws://alpha.example.com/ oc pp")
        assert bad.returncode == 2, bad.stderr
        assert "whitespace" in bad.stderr
        assert not CsmsBackend.objects.exists()

        good = manage("add_csms", "alpha", "ws://alpha.example.com/ocpp")
        assert good.returncode == 0, good.stderr
        assert CsmsBackend.objects.get().url == "ws://alpha.example.com/ocpp"

        missing = manage(
            "add_csms", "alpha", "wss://other.example.com/ocpp", "--root-ca", "/nonexistent.pem"
        )
        assert missing.returncode == 2, missing.stderr
        assert "cannot read it" in missing.stderr
        assert CsmsBackend.objects.get().url == "ws://alpha.example.com/ocpp"


class TestAddCsmsProxyAndRootCa:
    UPSTREAM = "wss://real-csms-2.example.com/ocpp"

    def test_it_records_the_upstream_and_the_root_ca(self, db, tmp_path, root_ca):
        (tmp_path / "csms2-root.pem").write_text(root_ca.pem)

        output = run(
            "add_csms",
            "csms-2",
            "wss://csms-2-proxy.example.com/ocpp",
            "--upstream",
            self.UPSTREAM,
            "--root-ca",
            str(tmp_path / "csms2-root.pem"),
        )

        backend = CsmsBackend.objects.get()
        assert backend.url == "wss://csms-2-proxy.example.com/ocpp"
        assert backend.upstream_url == self.UPSTREAM
        assert backend.root_ca_pem.strip() == root_ca.pem.strip()
        assert f"mode: proxy -> {self.UPSTREAM}" in output
        assert "CN=CSMS 2 Root CA" in output
        assert f"SHA-256 {root_ca.sha256}" in output

    def test_without_the_options_it_is_an_endpoint_with_no_root_ca(self, db):
        output = run("add_csms", "alpha", "wss://alpha.example.com/ocpp")

        assert "mode: endpoint" in output
        assert "root CA: none" in output
        backend = CsmsBackend.objects.get()
        assert (backend.upstream_url, backend.root_ca_pem) == ("", "")

    def test_it_refuses_upstream_credentials_without_echoing_them(self, db):
        with pytest.raises(CommandError) as raised:
            run(
                "add_csms",
                "csms-1",
                "wss://csms-1.example.com/ocpp",
                "--upstream",
                "wss://proxy:s3cret-passw0rd@real-csms-1.example.com/ocpp",
            )

        message = str(raised.value)
        assert raised.value.returncode == 2
        assert "upstream_url: The upstream URL contains credentials" in message
        assert "put per-station credentials in the gateway's --upstream-auth-file" in message
        assert "s3cret" not in message
        assert not CsmsBackend.objects.exists()

    def test_it_refuses_an_upstream_that_is_the_csms_own_url(self, db):
        with pytest.raises(CommandError) as raised:
            run(
                "add_csms",
                "csms-1",
                "wss://csms-1.example.com/ocpp",
                "--upstream",
                "wss://csms-1.example.com/ocpp/",
            )

        assert raised.value.returncode == 2
        assert "upstream_url: The upstream is this CSMS's own URL" in str(raised.value)
        assert not CsmsBackend.objects.exists()

    def test_a_rerun_without_the_options_removes_them_and_says_so(self, db, tmp_path, root_ca):
        (tmp_path / "root.pem").write_text(root_ca.pem)
        url = "wss://csms-2-proxy.example.com/ocpp"
        run(
            "add_csms",
            "csms-2",
            url,
            "--upstream",
            self.UPSTREAM,
            "--root-ca",
            str(tmp_path / "root.pem"),
        )

        output = run("add_csms", "csms-2", url)

        backend = CsmsBackend.objects.get()
        assert (backend.upstream_url, backend.root_ca_pem) == ("", "")
        assert f"upstream {self.UPSTREAM} removed" in output
        assert "root CA removed" in output

    def test_a_der_root_ca_is_stored_as_pem(self, db, tmp_path, root_ca):
        (tmp_path / "root.cer").write_bytes(root_ca.der)

        run(
            "add_csms",
            "csms-2",
            "wss://csms-2.example.com/ocpp",
            "--root-ca",
            str(tmp_path / "root.cer"),
        )

        assert CsmsBackend.objects.get().root_ca_pem.strip() == root_ca.pem.strip()

    def test_the_text_openssl_prints_before_a_pem_is_left_out(self, db, tmp_path, root_ca):
        (tmp_path / "root.pem").write_text("Certificate:\n    Data: ...\n" + root_ca.pem)

        run(
            "add_csms",
            "csms-2",
            "wss://csms-2.example.com/ocpp",
            "--root-ca",
            str(tmp_path / "root.pem"),
        )

        assert CsmsBackend.objects.get().root_ca_pem == root_ca.pem

    def test_a_root_ca_on_a_ws_url_is_flagged_as_unchecked(self, db, tmp_path, root_ca):
        (tmp_path / "root.pem").write_text(root_ca.pem)

        output = run(
            "add_csms", "lab", "ws://lab.example.com/ocpp", "--root-ca", str(tmp_path / "root.pem")
        )

        assert "not checked by pre-flight" in output

    @pytest.mark.parametrize(
        ("content", "expected"),
        [
            ("leaf", "not a CA certificate"),
            ("two", "not a chain"),
            ("key", "private key"),
            ("garbage", "neither a PEM nor a DER"),
            ("empty", "empty"),
            ("bad-pem", "not a PEM certificate"),
        ],
    )
    def test_a_file_that_is_not_one_ca_certificate_saves_nothing(
        self, db, tmp_path, root_ca, leaf, content, expected
    ):
        data = {
            "leaf": leaf.pem.encode(),
            "two": (root_ca.pem + leaf.pem).encode(),
            "key": (root_ca.key_pem + root_ca.pem).encode(),
            "garbage": b"\x00\x01 not a certificate",
            "empty": b"",
            "bad-pem": b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        }[content]
        (tmp_path / "root.pem").write_bytes(data)

        with pytest.raises(CommandError) as raised:
            run(
                "add_csms",
                "csms-2",
                "wss://csms-2.example.com/ocpp",
                "--root-ca",
                str(tmp_path / "root.pem"),
            )

        assert raised.value.returncode == 2
        assert expected in str(raised.value)
        assert "Nothing saved" in str(raised.value)
        assert not CsmsBackend.objects.exists()

    def test_an_unreadable_file_saves_nothing_and_keeps_the_old_record(self, db, tmp_path, root_ca):
        (tmp_path / "root.pem").write_text(root_ca.pem)
        run(
            "add_csms",
            "csms-2",
            "wss://csms-2.example.com/ocpp",
            "--root-ca",
            str(tmp_path / "root.pem"),
        )

        for missing in (tmp_path / "nope.pem", tmp_path):  # absent, a directory
            with pytest.raises(CommandError) as raised:
                run("add_csms", "csms-2", "wss://other.example.com/ocpp", "--root-ca", str(missing))
            assert raised.value.returncode == 2
            assert "cannot read it" in str(raised.value)

        backend = CsmsBackend.objects.get()
        assert backend.url == "wss://csms-2.example.com/ocpp"
        assert backend.root_ca_pem.strip() == root_ca.pem.strip()

    @pytest.mark.parametrize("upstream", BAD_URLS)
    def test_it_refuses_a_bad_upstream_writing_nothing(self, db, upstream):
        with pytest.raises(CommandError) as raised:
            run("add_csms", "csms-1", "wss://csms-1.example.com/ocpp", "--upstream", upstream)

        assert raised.value.returncode == 2
        assert "upstream_url:" in str(raised.value)
        assert "url:" not in str(raised.value).replace("upstream_url:", "")
        assert not CsmsBackend.objects.exists()

    def test_the_help_says_what_a_rerun_without_an_option_does(self):
        from fleet.management.commands.add_csms import Command

        text = " ".join(Command().create_parser("manage.py", "add_csms").format_help().split())

        assert "an option left out on a rerun is turned off (--open), removed (--upstream" in text
        assert "--root-ca FILE.pem" in text


class TestListStations:
    @pytest.fixture
    def fleet(self, alpha, beta):
        boot = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
        ChargingStation.objects.create(
            identity="CP-1",
            csms=alpha,
            vendor="Acme",
            model="AC22",
            firmware_version="1.2.3",
            connected=True,
            last_boot_at=boot,
            last_seen_at=boot,
            connector_status={"1": {"status": "Charging", "error_code": "NoError", "at": ""}},
        )
        ChargingStation.objects.create(identity="CP-2", csms=beta, firmware_version="2.0")
        ChargingStation.objects.create(identity="CP-3")

    def test_it_prints_json(self, fleet):
        rows = json.loads(run("list_stations", "--json"))

        assert [row["identity"] for row in rows] == ["CP-1", "CP-2", "CP-3"]
        assert rows[0] == {
            "identity": "CP-1",
            "csms": "alpha",
            "connected": True,
            "firmware": "1.2.3",
            "vendor": "Acme",
            "model": "AC22",
            "serial": "",
            "last_boot": "2025-03-01T12:00:00+00:00",
            "last_seen": "2025-03-01T12:00:00+00:00",
            "connectors": {"1": {"status": "Charging", "error_code": "NoError", "at": ""}},
        }
        assert rows[2]["csms"] is None
        assert rows[2]["last_boot"] is None
        assert rows[2]["connected"] is False

    def test_it_filters_by_csms(self, fleet):
        rows = json.loads(run("list_stations", "--csms", "beta", "--json"))

        assert [(row["identity"], row["csms"]) for row in rows] == [("CP-2", "beta")]

    def test_it_prints_a_table(self, fleet):
        output = run("list_stations", "--csms", "alpha")

        header, row, footer = output.strip().splitlines()
        assert header.split()[:3] == ["IDENTITY", "CSMS", "CONNECTED"]
        assert row.split()[:4] == ["CP-1", "alpha", "yes", "1.2.3"]
        assert "2025-03-01 12:00:00" in row
        assert row.endswith("1 Charging")
        assert footer == "1 station"

    def test_it_prints_an_empty_json_array(self, db):
        assert json.loads(run("list_stations", "--json")) == []

    def test_it_refuses_an_unknown_csms(self, db):
        with pytest.raises(CommandError) as raised:
            run("list_stations", "--csms", "nowhere")

        assert raised.value.returncode == 2
        assert "nowhere" in str(raised.value)
