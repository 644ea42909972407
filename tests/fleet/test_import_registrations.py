"""`manage.py import_registrations CSMS FILE.csv` and the admin import: all or nothing."""

import json
import os
import subprocess
import sys
from io import StringIO
from pathlib import Path

import pytest
from django.contrib.auth.models import Permission, User
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import CommandError, call_command
from django.urls import reverse

from devstack.processes import ROOT
from fleet.models import ChargingStation, Registration
from ocpp_gateway.envelopes import password_matches, registry_key, registry_meta_key
from tests.conftest import process_env

State = Registration.State


def csv_file(tmp_path: Path, text: str, name: str = "stations.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode())
    return path


def run(*args: str) -> tuple[str, str]:
    out, err = StringIO(), StringIO()
    call_command("import_registrations", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def registrations() -> dict[str, tuple[str, str]]:
    return {
        reg.station.identity: (reg.state, reg.serial_number)
        for reg in Registration.objects.select_related("station")
    }


class TestCommand:
    def test_it_registers_every_row_and_adds_unknown_stations(self, alpha, tmp_path):
        ChargingStation.objects.create(identity="CP-1", csms=alpha, firmware_version="4.2.9")
        path = csv_file(
            tmp_path,
            "\ufeffidentity,serial_number,password\r\n"
            "CP-1,SN-1,pw-one-0123456789\r\n"
            "CP-2,,\r\n"
            "\r\n"
            'CP-3,"SN-3",\r\n',
        )

        out, err = run("alpha", str(path))

        assert out.strip() == "alpha: 3 registered (3 new, 0 updated, 0 unchanged)"
        assert err == ""
        assert registrations() == {
            "CP-1": ("active", "SN-1"),
            "CP-2": ("active", ""),
            "CP-3": ("active", "SN-3"),
        }
        digest = Registration.objects.get(station__identity="CP-1").password_sha256
        assert password_matches(digest, "pw-one-0123456789")
        assert "pw-one" not in digest
        assert Registration.objects.get(station__identity="CP-2").password_sha256 == ""
        # A station new to the inventory has its identity only; its first boot says more.
        new = ChargingStation.objects.get(identity="CP-3")
        assert (new.csms, new.firmware_version) == (None, "")
        assert ChargingStation.objects.get(identity="CP-1").firmware_version == "4.2.9"

    def test_a_reimport_is_idempotent_and_applies_changes(self, alpha, tmp_path):
        first = "identity,serial_number,password\nCP-1,SN-1,pw-1\nCP-2,SN-2,pw-2\nCP-3,,\n"
        run("alpha", str(csv_file(tmp_path, first)))
        digests = dict(Registration.objects.values_list("station__identity", "password_sha256"))

        out, _ = run("alpha", str(csv_file(tmp_path, first)))
        assert out.strip() == "alpha: 3 registered (0 new, 0 updated, 3 unchanged)"
        assert digests == dict(
            Registration.objects.values_list("station__identity", "password_sha256")
        )

        Registration.objects.filter(station__identity="CP-3").update(state=State.REMOVED)
        changed = "identity,serial_number,password\nCP-1,SN-1b,pw-1\nCP-2,SN-2,pw-2b\nCP-3,,\n"
        out, _ = run("alpha", str(csv_file(tmp_path, changed)))

        assert out.strip() == "alpha: 3 registered (0 new, 3 updated, 0 unchanged)"
        assert registrations() == {
            "CP-1": ("active", "SN-1b"),
            "CP-2": ("active", "SN-2"),
            "CP-3": ("active", ""),
        }
        cp2 = Registration.objects.get(station__identity="CP-2").password_sha256
        assert password_matches(cp2, "pw-2b")

    def test_a_column_left_out_keeps_what_a_registration_has(self, alpha, tmp_path):
        run("alpha", str(csv_file(tmp_path, "identity,serial_number,password\nCP-1,SN-1,pw\n")))

        out, _ = run("alpha", str(csv_file(tmp_path, "identity\nCP-1\n")))

        assert "1 unchanged" in out
        registration = Registration.objects.get()
        assert registration.serial_number == "SN-1"
        assert password_matches(registration.password_sha256, "pw")

    def test_a_pending_removal_stays_pending(self, alpha, tmp_path):
        cp = ChargingStation.objects.create(identity="CP-1")
        Registration.objects.create(station=cp, csms=alpha, state=State.PENDING_REMOVAL)

        out, _ = run("alpha", str(csv_file(tmp_path, "identity\nCP-1\n")))

        assert "1 unchanged" in out
        assert Registration.objects.get().state == State.PENDING_REMOVAL

    def test_every_row_error_is_printed_and_nothing_is_written(self, alpha, tmp_path):
        path = csv_file(
            tmp_path,
            "identity,serial_number,password\n"
            "CP-OK,SN-1,\n"
            ",SN-2,\n"
            f"{'X' * 256},,\n"
            "CP 4,,\n"
            "CP-5\u200b,,\n"
            "CP-OK,SN-6,\n"
            f"CP-7,{'9' * 26},\n"
            "CP-8, SN-8,\n"
            "CP-9,SN-9\n",
        )
        err = StringIO()

        with pytest.raises(CommandError) as raised:
            call_command("import_registrations", "alpha", str(path), stderr=err)

        assert raised.value.returncode == 1
        assert str(raised.value) == f"8 error(s) in {path}; nothing imported."
        assert not Registration.objects.exists()
        assert not ChargingStation.objects.exists()
        lines = err.getvalue().splitlines()
        expected = [
            "line 3: identity '' is empty",
            "line 4: identity 'XXX",
            "line 5: identity 'CP 4' contains whitespace",
            "line 6: identity 'CP-5\\u200b' contains whitespace or an invisible character",
            "line 7: identity 'CP-OK' is already on line 2",
            "line 8: serial_number is 26 characters long; OCPP allows 25",
            "line 9: serial_number ' SN-8' has surrounding whitespace",
            "line 10: 2 cell(s), the header has 3",
        ]
        assert len(lines) == len(expected)
        for line, start in zip(lines, expected, strict=True):
            assert line.startswith(f"{path}: {start}"), line

    @pytest.mark.parametrize(
        ("content", "message"),
        [
            (b"", "the file is empty"),
            (b"serial_number,password\nSN-1,pw\n", "no 'identity' column"),
            (b"identity,serial\nCP-1,SN-1\n", "unknown column(s) 'serial'"),
            (b"identity;serial_number\nCP-1;SN-1\n", "separated by commas"),
            (b"identity,identity\nCP-1,CP-1\n", "given twice: identity"),
            ("identity\nCP-\u00e9\n".encode("latin-1"), "not UTF-8"),
        ],
    )
    def test_a_file_it_cannot_read_is_refused(self, alpha, tmp_path, content, message):
        path = tmp_path / "bad.csv"
        path.write_bytes(content)

        with pytest.raises(CommandError) as raised:
            run("alpha", str(path))

        assert raised.value.returncode == 2
        assert message in str(raised.value)
        assert not Registration.objects.exists()

    def test_an_unknown_csms_or_a_missing_file_is_refused(self, alpha, tmp_path):
        path = csv_file(tmp_path, "identity\nCP-1\n")
        with pytest.raises(CommandError, match="No CSMS backend named 'nowhere'") as raised:
            run("nowhere", str(path))
        assert raised.value.returncode == 2

        with pytest.raises(CommandError, match="Cannot read") as raised:
            run("alpha", str(tmp_path / "missing.csv"))
        assert raised.value.returncode == 2

    def test_it_runs_from_the_shell_and_publishes_the_registry(
        self, transactional_db, redis_client, redis_url, tmp_path
    ):
        from fleet.models import CsmsBackend

        CsmsBackend.objects.create(name="csms-2", url="ws://csms-2.example.com/ocpp")
        good = csv_file(tmp_path, "identity,serial_number\nCP-1,SN-1\nCP-2,SN-2\n")
        bad = csv_file(tmp_path, "identity,serial_number\nCP-3,\nCP-3,\n", "bad.csv")

        def manage(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run(
                [sys.executable, "manage.py", "import_registrations", *args],
                cwd=ROOT,
                env={**os.environ, **process_env(redis_url)},
                capture_output=True,
                text=True,
                timeout=60,
            )

        done = manage("csms-2", str(good))
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "csms-2: 2 registered (2 new, 0 updated, 0 unchanged)"
        published = redis_client.hgetall(registry_key("csms-2"))
        assert {key: json.loads(value)["serial"] for key, value in published.items()} == {
            b"CP-1": "SN-1",
            b"CP-2": "SN-2",
        }
        assert redis_client.hget(registry_meta_key("csms-2"), "version") == b"1"

        refused = manage("csms-2", str(bad))
        assert refused.returncode == 1
        assert "line 3: identity 'CP-3' is already on line 2" in refused.stderr
        assert not ChargingStation.objects.filter(identity="CP-3").exists()

        assert manage("csms-9", str(good)).returncode == 2
        assert "any other column is an error" in " ".join(manage("--help").stdout.split())


class TestAdmin:
    URL = "admin:fleet_registration_import"

    def upload(self, client, csms, text: str, name: str = "stations.csv"):
        return client.post(
            reverse(self.URL),
            {"csms": csms.pk, "file": SimpleUploadedFile(name, text.encode(), "text/csv")},
            follow=True,
        )

    def test_the_changelist_links_to_the_import_page(self, admin_client, alpha):
        page = admin_client.get(reverse("admin:fleet_registration_changelist"))
        assert reverse(self.URL).encode() in page.content
        form = admin_client.get(reverse(self.URL))
        assert form.status_code == 200
        assert b"alpha" in form.content and b'type="file"' in form.content

    def test_an_import_registers_and_reports_the_summary(self, admin_client, alpha):
        response = self.upload(admin_client, alpha, "identity,serial_number\nCP-1,SN-1\n")

        assert response.redirect_chain[-1][0] == reverse("admin:fleet_registration_changelist")
        messages = [str(m) for m in response.context["messages"]]
        assert messages == ["alpha: 1 registered (1 new, 0 updated, 0 unchanged)"]
        assert registrations() == {"CP-1": ("active", "SN-1")}

    def test_row_errors_are_messages_and_nothing_is_written(self, admin_client, alpha):
        response = self.upload(admin_client, alpha, "identity,serial_number\nCP-1,SN-1\n,SN\n")

        messages = [str(m) for m in response.context["messages"]]
        assert messages == [
            "stations.csv: line 3: identity '' is empty",
            "1 error(s) in stations.csv; nothing imported.",
        ]
        assert not Registration.objects.exists()

    def test_a_bad_file_is_one_message(self, admin_client, alpha):
        response = self.upload(admin_client, alpha, "identity,serial\nCP-1,SN-1\n")

        messages = [str(m) for m in response.context["messages"]]
        assert len(messages) == 1 and "unknown column(s) 'serial'" in messages[0]
        assert not Registration.objects.exists()

    def test_it_needs_the_add_registration_permission(self, client, alpha):
        user = User.objects.create_user("viewer", password="pw", is_staff=True)
        user.user_permissions.add(Permission.objects.get(codename="view_registration"))
        client.force_login(user)

        assert client.get(reverse(self.URL)).status_code == 403
        page = client.get(reverse("admin:fleet_registration_changelist"))
        assert reverse(self.URL).encode() not in page.content

        user.user_permissions.add(Permission.objects.get(codename="add_registration"))
        assert client.get(reverse(self.URL)).status_code == 200

    def test_a_registration_saved_in_the_admin_keeps_only_a_digest(
        self, admin_client, alpha, redis_client, django_capture_on_commit_callbacks
    ):
        station = ChargingStation.objects.create(identity="CP-1")
        with django_capture_on_commit_callbacks(execute=True):
            admin_client.post(
                reverse("admin:fleet_registration_add"),
                {
                    "station": station.pk,
                    "csms": alpha.pk,
                    "state": "active",
                    "serial_number": "SN-1",
                    "password": "pw-1",
                },
            )

        registration = Registration.objects.get()
        assert password_matches(registration.password_sha256, "pw-1")
        entry = json.loads(redis_client.hget(registry_key("alpha"), "CP-1"))
        assert entry == {"serial": "SN-1", "password_sha256": registration.password_sha256}

        with django_capture_on_commit_callbacks(execute=True):
            admin_client.post(
                reverse("admin:fleet_registration_delete", args=[registration.pk]),
                {"post": "yes"},
            )
        assert not redis_client.exists(registry_key("alpha"))
        assert redis_client.hget(registry_meta_key("alpha"), "version") == b"2"
