import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse

from fleet.models import ChargingStation, CsmsBackend, Registration
from fleet.services.events import events_ingest
from ocpp_gateway.envelopes import EventKind


@pytest.fixture
def inventory(alpha, beta, publish, make_event):
    publish(
        make_event(EventKind.CONNECT, "CP-1", at=0),
        make_event(EventKind.BOOT, "CP-1", at=1, firmware="1.0"),
        make_event(EventKind.STATUS, "CP-1", at=2, connector_id=1, status="Charging"),
    )
    events_ingest(consumer="test")
    return ChargingStation.objects.get(identity="CP-1")


@pytest.mark.parametrize(
    "page",
    [
        "admin:fleet_csmsbackend_changelist",
        "admin:fleet_chargingstation_changelist",
        "admin:fleet_registration_changelist",
        "admin:fleet_stationevent_changelist",
    ],
)
def test_the_lists_render(admin_client, inventory, page):
    response = admin_client.get(reverse(page))

    assert response.status_code == 200
    assert b"CP-1" in response.content or b"alpha" in response.content


def test_the_station_list_filters_and_searches(admin_client, inventory):
    url = reverse("admin:fleet_chargingstation_changelist")

    found = admin_client.get(url, {"csms__id__exact": inventory.csms_id, "q": "CP-"})
    empty = admin_client.get(url, {"connected__exact": "0"})

    assert b"1 Charging" in found.content
    assert b"CP-1" not in empty.content


def test_the_station_page_shows_registrations_and_recent_events(admin_client, inventory):
    response = admin_client.get(reverse("admin:fleet_chargingstation_change", args=[inventory.pk]))

    assert response.status_code == 200
    assert b"boot" in response.content
    assert b"All events of this station" in response.content
    assert b"active" in response.content


def test_events_are_read_only(admin_client, inventory):
    event = inventory.events.first()
    change = reverse("admin:fleet_stationevent_change", args=[event.pk])

    assert admin_client.get(reverse("admin:fleet_stationevent_add")).status_code == 403
    assert admin_client.post(change, {"kind": "connect"}).status_code == 403


def test_an_operator_marks_a_pending_registration_removed(admin_client, inventory):
    registration = Registration.objects.get()
    Registration.objects.filter(pk=registration.pk).update(state="pending_removal")

    admin_client.post(
        reverse("admin:fleet_registration_changelist"),
        {"action": "mark_removed", "_selected_action": [registration.pk]},
    )

    registration.refresh_from_db()
    assert registration.state == Registration.State.REMOVED


def test_admission_changes_in_the_admin_reach_the_registry(
    admin_client, alpha, redis_client, django_capture_on_commit_callbacks
):
    from ocpp_gateway.envelopes import registry_key, registry_meta_key

    station = ChargingStation.objects.create(identity="CP-1", csms=alpha)
    Registration.objects.create(station=station, csms=alpha)
    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(
            reverse("admin:fleet_csmsbackend_change", args=[alpha.pk]),
            {"name": "alpha", "url": alpha.url, "open_admission": "on"},
        )
    assert response.status_code == 302
    assert redis_client.hget(registry_meta_key("alpha"), "open") == b"1"
    assert redis_client.hexists(registry_key("alpha"), "CP-1")

    with django_capture_on_commit_callbacks(execute=True):
        admin_client.post(
            reverse("admin:fleet_chargingstation_changelist"),
            {"action": "delete_selected", "_selected_action": [station.pk], "post": "yes"},
        )
    assert not ChargingStation.objects.exists()
    assert not redis_client.exists(registry_key("alpha"))


class TestCsmsBackendAdmin:
    UPSTREAM = "wss://real-csms-2.example.com/ocpp"

    @pytest.fixture
    def backend(self, db):
        return CsmsBackend.objects.create(name="csms-2", url="wss://csms-2-proxy.example.com/ocpp")

    def change(self, admin_client, backend, **fields):
        data = {"name": backend.name, "url": backend.url, "upstream_url": "", **fields}
        return admin_client.post(reverse("admin:fleet_csmsbackend_change", args=[backend.pk]), data)

    def test_the_upstream_is_editable_and_the_list_shows_the_mode(self, admin_client, backend):
        response = self.change(admin_client, backend, upstream_url=self.UPSTREAM)
        assert response.status_code == 302

        listing = admin_client.get(reverse("admin:fleet_csmsbackend_changelist")).content

        backend.refresh_from_db()
        assert backend.upstream_url == self.UPSTREAM
        assert f"proxy -&gt; {self.UPSTREAM}".encode() in listing

    def test_an_upstream_with_credentials_is_refused_saying_where_they_go(
        self, admin_client, backend
    ):
        response = self.change(
            admin_client, backend, upstream_url="wss://proxy:s3cret@real-csms-2.example.com/ocpp"
        )

        assert response.status_code == 200
        assert b"contains credentials (user:password@)" in response.content
        assert b"put per-station credentials in the gateway&#x27;s --upstream-auth-file" in (
            response.content
        )
        backend.refresh_from_db()
        assert backend.upstream_url == ""

    @pytest.mark.parametrize(
        "upstream",
        [
            "wss://csms-2-proxy.example.com/ocpp",
            "WSS://CSMS-2-proxy.example.com:443/ocpp/",
        ],
    )
    def test_an_upstream_that_is_the_csms_own_url_is_refused(self, admin_client, backend, upstream):
        response = self.change(admin_client, backend, upstream_url=upstream)

        assert response.status_code == 200
        assert b"The upstream is this CSMS&#x27;s own URL" in response.content
        backend.refresh_from_db()
        assert backend.upstream_url == ""

    def test_the_search_does_not_look_into_the_upstream(self, admin_client, backend):
        CsmsBackend.objects.filter(pk=backend.pk).update(upstream_url=self.UPSTREAM)
        url = reverse("admin:fleet_csmsbackend_changelist")

        assert (
            b"csms-2-proxy.example.com" not in admin_client.get(url, {"q": "real-csms-2"}).content
        )
        assert b"csms-2-proxy.example.com" in admin_client.get(url, {"q": "csms-2"}).content

    def test_without_an_upstream_the_list_says_endpoint(self, admin_client, backend):
        listing = admin_client.get(reverse("admin:fleet_csmsbackend_changelist")).content

        assert b'<td class="field-mode">endpoint</td>' in listing

    def test_a_bad_upstream_is_refused_saying_why(self, admin_client, backend):
        response = self.change(admin_client, backend, upstream_url="https://real.example.com/ocpp")

        assert response.status_code == 200
        assert b"must start with ws:// or wss://" in response.content
        backend.refresh_from_db()
        assert backend.upstream_url == ""

    @pytest.mark.parametrize("encoding", ["pem", "der"])
    def test_an_uploaded_root_ca_fills_the_certificate(
        self, admin_client, backend, root_ca, encoding
    ):
        data = root_ca.pem.encode() if encoding == "pem" else root_ca.der
        upload = SimpleUploadedFile(f"csms2-root.{encoding}", data)

        response = self.change(admin_client, backend, root_ca_file=upload)

        assert response.status_code == 302
        backend.refresh_from_db()
        assert backend.root_ca_pem.strip() == root_ca.pem.strip()
        page = admin_client.get(reverse("admin:fleet_csmsbackend_change", args=[backend.pk]))
        assert b"CN=CSMS 2 Root CA" in page.content
        assert root_ca.sha256.encode() in page.content
        listing = admin_client.get(reverse("admin:fleet_csmsbackend_changelist")).content
        assert b'<td class="field-has_root_ca"><img src="/static/admin/img/icon-yes.svg"' in listing

    def test_a_save_without_a_file_keeps_the_root_ca(self, admin_client, backend, root_ca):
        CsmsBackend.objects.filter(pk=backend.pk).update(root_ca_pem=root_ca.pem)

        assert self.change(admin_client, backend, open_admission="on").status_code == 302

        backend.refresh_from_db()
        assert backend.open_admission is True
        assert backend.root_ca_pem == root_ca.pem

    def test_the_root_ca_can_be_removed(self, admin_client, backend, root_ca):
        CsmsBackend.objects.filter(pk=backend.pk).update(root_ca_pem=root_ca.pem)

        assert self.change(admin_client, backend, clear_root_ca="on").status_code == 302

        backend.refresh_from_db()
        assert backend.root_ca_pem == ""

    @pytest.mark.parametrize(
        ("content", "expected"),
        [
            ("leaf", b"not a CA certificate"),
            ("key", b"private key"),
            ("garbage", b"neither a PEM nor a DER"),
        ],
    )
    def test_a_file_that_is_not_a_ca_certificate_is_refused(
        self, admin_client, backend, root_ca, leaf, content, expected
    ):
        data = {
            "leaf": leaf.pem.encode(),
            "key": (root_ca.key_pem + root_ca.pem).encode(),
            "garbage": b"\x00\x01 not a certificate",
        }[content]

        response = self.change(
            admin_client, backend, root_ca_file=SimpleUploadedFile("root.pem", data)
        )

        assert response.status_code == 200
        assert expected in response.content
        backend.refresh_from_db()
        assert backend.root_ca_pem == ""

    def test_upload_and_remove_together_is_refused(self, admin_client, backend, root_ca):
        response = self.change(
            admin_client,
            backend,
            clear_root_ca="on",
            root_ca_file=SimpleUploadedFile("root.pem", root_ca.pem.encode()),
        )

        assert response.status_code == 200
        assert b"not both" in response.content

    def test_a_proxied_csms_with_its_root_ca_is_added_in_one_form(self, admin_client, root_ca):
        add = reverse("admin:fleet_csmsbackend_add")
        assert admin_client.get(add).status_code == 200

        response = admin_client.post(
            add,
            {
                "name": "csms-2",
                "url": "wss://csms-2-proxy.example.com/ocpp",
                "upstream_url": self.UPSTREAM,
                "root_ca_file": SimpleUploadedFile("csms2-root.pem", root_ca.pem.encode()),
            },
        )

        assert response.status_code == 302
        backend = CsmsBackend.objects.get()
        assert (backend.upstream_url, backend.root_ca_pem) == (self.UPSTREAM, root_ca.pem)
