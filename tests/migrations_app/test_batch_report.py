"""The batch report names where the stations go and, for a proxy, the real CSMS behind it."""

from __future__ import annotations

import io

import pytest
from django.contrib.auth.models import User

from fleet.models import ChargingStation, CsmsBackend
from migrations_app.management.commands.migrate_fleet import Command
from migrations_app.services.batches import BatchOptions, batch_create, batch_report

pytestmark = pytest.mark.django_db


def test_the_report_shows_each_csms_mode_and_upstream_without_credentials() -> None:
    source = CsmsBackend.objects.create(name="csms-1", url="wss://csms-1.example.com/ocpp")
    target = CsmsBackend.objects.create(
        name="csms-2",
        url="wss://csms-2-proxy.example.com/ocpp",
        upstream_url="wss://user:secret@real-csms-2.example.com/ocpp",
    )
    station = ChargingStation.objects.create(identity="CP-1", csms=source, connected=True)
    batch = batch_create(
        target=target,
        stations=[station],
        options=BatchOptions(),
        created_by=User.objects.create_user("operator"),
    )

    report = batch_report(batch)

    assert report["target"] == {
        "name": "csms-2",
        "url": "wss://csms-2-proxy.example.com/ocpp",
        "mode": "proxy",
        "upstream": "wss://real-csms-2.example.com/ocpp",
    }
    assert report["sources"] == [
        {
            "name": "csms-1",
            "url": "wss://csms-1.example.com/ocpp",
            "mode": "endpoint",
            "upstream": None,
        }
    ]
    out = io.StringIO()
    command = Command(stdout=out)
    command._print_report(report)
    text = out.getvalue()
    assert "target: csms-2 wss://csms-2-proxy.example.com/ocpp (proxy in front of " in text
    assert "secret" not in text
    assert "source: csms-1 wss://csms-1.example.com/ocpp (endpoint)" in text
