import pytest
from django.urls import reverse

from fleet.models import ChargingStation, Registration
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
