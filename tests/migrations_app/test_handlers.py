"""Step handlers against a scripted station at the network edge (tests/migrations_app/links.py).

Fast: no Redis, gateway, worker or simulator; the handler runs in this process and every
exchange it makes is recorded as in production. The end-to-end tests beside these run the
same steps through the whole stack.
"""

from __future__ import annotations

import pytest
from ocpp.v16 import call, call_result
from ocpp.v16.enums import ConfigurationStatus

from fleet.models import ChargingStation, CsmsBackend
from migrations_app.models import StationMigration
from migrations_app.services.batches import BatchOptions, batch_create
from migrations_app.services.exchanges import station_link
from migrations_app.services.plan import PRIORITY, PROFILE_1, PROFILE_2
from migrations_app.services.steps import set_priority
from tests.migrations_app.links import ScriptedStation

State = StationMigration.State
SOURCE_URL, TARGET_URL = "ws://old/ocpp", "ws://new/ocpp"
ORIGINAL = {PROFILE_1: SOURCE_URL, PROFILE_2: "", PRIORITY: f"{PROFILE_1},{PROFILE_2}"}


def _migration(state: str, **fields: object) -> StationMigration:
    """A migration of CP-1 from csms-1 to csms-2 that has read the original configuration."""
    source = CsmsBackend.objects.create(name="csms-1", url=SOURCE_URL)
    target = CsmsBackend.objects.create(name="csms-2", url=TARGET_URL, open_admission=True)
    station = ChargingStation.objects.create(identity="CP-1", csms=source, connected=True)
    batch = batch_create(target=target, stations=[station], options=BatchOptions())
    StationMigration.objects.filter(batch=batch).update(
        state=state,
        config_snapshot=ORIGINAL,
        active_slot=PROFILE_1,
        free_slot=PROFILE_2,
        original_priority=ORIGINAL[PRIORITY],
        **fields,
    )
    return StationMigration.objects.select_related("batch__target", "source", "station").get(
        batch=batch
    )


class Firmware:
    """The station's configuration keys; refuses the new priority, takes anything else."""

    def __init__(self, config: dict[str, str]) -> None:
        self.config = dict(config)

    def __call__(self, request: object) -> object:
        assert isinstance(request, call.ChangeConfiguration), request
        if request.key == PRIORITY and request.value != ORIGINAL[PRIORITY]:
            return call_result.ChangeConfiguration(status=ConfigurationStatus.rejected)
        self.config[request.key] = request.value
        return call_result.ChangeConfiguration(status=ConfigurationStatus.accepted)


@pytest.mark.django_db
def test_a_rejected_priority_is_rolled_back_through_the_source_and_both_writes_recorded():
    # The URL is already in the free slot (set_url ran): the rollback blanks it again.
    migration = _migration(State.SETTING_PRIORITY)
    firmware = Firmware({**ORIGINAL, PROFILE_2: TARGET_URL})
    station = ScriptedStation(firmware, csms="csms-1")

    with station_link(station):
        next_ = set_priority(migration)

    assert next_.state == State.FAILED
    assert next_.reason == (
        "the station did not accept the new priority (station answered Rejected); "
        f"{PRIORITY} and {PROFILE_2} restored"
    )
    assert firmware.config == ORIGINAL
    # The priority asked of whichever gateway holds the station; the rollback only ever
    # through the source.
    assert [(sent.request, sent.csms) for sent in station.sent] == [
        (call.ChangeConfiguration(key=PRIORITY, value=f"{PROFILE_2},{PROFILE_1}"), ""),
        (call.ChangeConfiguration(key=PRIORITY, value=ORIGINAL[PRIORITY]), "csms-1"),
        (call.ChangeConfiguration(key=PROFILE_2, value=""), "csms-1"),
    ]
    recorded = list(
        migration.exchanges.order_by("id").values_list(
            "step", "action", "request", "csms", "outcome", "sent", "response"
        )
    )
    assert recorded == [
        (
            State.SETTING_PRIORITY,
            "ChangeConfiguration",
            {"key": PRIORITY, "value": f"{PROFILE_2},{PROFILE_1}"},
            "csms-1",
            "result",
            True,
            {"status": "Rejected"},
        ),
        (
            f"{State.SETTING_PRIORITY}:rollback",
            "ChangeConfiguration",
            {"key": PRIORITY, "value": ORIGINAL[PRIORITY]},
            "csms-1",
            "result",
            True,
            {"status": "Accepted"},
        ),
        (
            f"{State.SETTING_PRIORITY}:rollback",
            "ChangeConfiguration",
            {"key": PROFILE_2, "value": ""},
            "csms-1",
            "result",
            True,
            {"status": "Accepted"},
        ),
    ]
