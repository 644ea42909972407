"""ChangeConfiguration and GetConfiguration as the firmware answers them."""

from __future__ import annotations

import pytest
from ocpp.v16 import call
from ocpp.v16.enums import ConfigurationStatus as Status

from devstack.processes import wait_until_async
from ocpp_gateway.simulator import Fleet, StationConfig, StationSpec
from ocpp_gateway.simulator.config import key_table
from tests.simulator.csms import FAST, CentralSystem, run

ID = "SIM-0001"
P1, P2 = "NetworkConnectionProfile1", "NetworkConnectionProfile2"
PRIORITY = "NetworkConfigurationPriority"
TIMEOUT = "NetworkProfileConnectionTimeoutSec"


@pytest.mark.parametrize(
    ("key", "value", "status"),
    [
        (P2, "wss://csms-2.example.com/ocpp", Status.accepted),
        (P2, "", Status.accepted),
        (P2, "wss://csms-2.example.com/ocpp ", Status.rejected),
        (P2, "wss://csms-2.example.com/\tocpp", Status.rejected),
        (P2, "wss://csms-2.example.com/ocpp\n", Status.rejected),
        (P2, '"wss://csms-2.example.com/ocpp"', Status.rejected),
        (P2, "'wss://csms-2.example.com/ocpp'", Status.rejected),
        (P2, f"wss://csms-2.example.com/ocpp/{ID}", Status.rejected),
        (P2, f"wss://csms-2.example.com/ocpp/{ID}/", Status.rejected),
        (P2, "https://csms-2.example.com/ocpp", Status.rejected),
        (P1, "ws://csms-1.example.com:8080/ocpp", Status.accepted),
        (PRIORITY, f"{P2},{P1}", Status.reboot_required),
        (PRIORITY, f"{P1},{P2}", Status.reboot_required),
        (PRIORITY, f"{P2}, {P1}", Status.rejected),
        (PRIORITY, f"{P2},{P2}", Status.rejected),
        (PRIORITY, P2, Status.rejected),
        (PRIORITY, f"{P2},NetworkConnectionProfile3", Status.rejected),
        (TIMEOUT, "60", Status.accepted),
        (TIMEOUT, "soon", Status.rejected),
        ("HeartbeatInterval", "120", Status.accepted),
        ("LocalPreAuthorize", "true", Status.accepted),
        ("LocalPreAuthorize", "yes", Status.rejected),
        ("NumberOfConnectors", "2", Status.rejected),
        ("NoSuchKey", "1", Status.not_supported),
    ],
)
def test_it_checks_changes_like_the_firmware(key, value, status):
    config = StationConfig(key_table(True), {})
    assert config.check(key, value, identity=ID).status == status


def test_it_answers_change_and_get_configuration_over_ocpp():
    async def scenario():
        async with (
            CentralSystem() as csms,
            Fleet([StationSpec(ID, url=csms.url, connectors=2)], timing=FAST) as fleet,
        ):
            station = fleet[ID]
            await wait_until_async(lambda: station.online, 10, "boot")

            async def change(key, value):
                result = await csms.call(ID, call.ChangeConfiguration(key=key, value=value))
                return result.status

            assert await change(P2, "ws://new csms/ocpp") == Status.rejected
            assert await change(P2, '"ws://new/ocpp"') == Status.rejected
            assert await change(P2, f"ws://new/ocpp/{ID}") == Status.rejected
            assert await change(P2, "wss://csms-2.example.com/ocpp") == Status.accepted
            assert await change(PRIORITY, f"{P2},{P1}") == Status.reboot_required
            assert await change(TIMEOUT, "5") == Status.accepted
            assert await change("NumberOfConnectors", "3") == Status.rejected
            assert await change("Bogus", "1") == Status.not_supported

            everything = await csms.call(ID, call.GetConfiguration())
            values = {kv["key"]: kv for kv in everything.configuration_key}
            assert values[P1]["value"] == csms.url
            assert values[P2]["value"] == "wss://csms-2.example.com/ocpp"
            assert values[PRIORITY]["value"] == f"{P2},{P1}"
            assert values[TIMEOUT]["value"] == "5"
            assert values["NumberOfConnectors"] == {
                "key": "NumberOfConnectors",
                "readonly": True,
                "value": "2",
            }
            assert values[P1]["readonly"] is False
            assert "HeartbeatInterval" in values and "AuthorizeRemoteTxRequests" in values
            assert not everything.unknown_key

            some = await csms.call(ID, call.GetConfiguration(key=[P1, "Bogus"]))
            assert [kv["key"] for kv in some.configuration_key] == [P1]
            assert some.unknown_key == ["Bogus"]

            changes = station.events("config_changed")
            assert len(changes) == 8
            assert changes[0]["status"] == "Rejected" and changes[0]["reason"]

    run(scenario())
