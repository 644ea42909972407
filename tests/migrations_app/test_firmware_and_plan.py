"""Pure rules: the firmware gate and reading the network keys."""

from __future__ import annotations

import pytest
from ocpp.v16 import call_result

from migrations_app.services.firmware import firmware_gate, version_parts
from migrations_app.services.plan import MissingKeys, PlanError, configuration_values, plan_switch

MINIMUMS = {"4.2": "4.2.85", "3.5": "3.5.54"}


@pytest.mark.parametrize(
    ("version", "parts"),
    [("4.2.85", (4, 2, 85)), ("v4.2.9", (4, 2, 9)), ("3.5.54-rc1", (3, 5, 54)), ("", ())],
)
def test_versions_are_compared_as_numbers(version, parts):
    assert version_parts(version) == parts


@pytest.mark.parametrize("version", ["4.2.9", "4.2.84", "3.5.9", "3.5.53", "4.2"])
def test_old_firmware_on_a_gated_line_is_skipped_with_the_reason(version):
    reason = firmware_gate(version, MINIMUMS)
    assert reason is not None and version in reason


@pytest.mark.parametrize("version", ["4.2.85", "4.2.100", "3.5.54", "3.6.0", "5.0.1", "4.10.1", ""])
def test_current_firmware_and_other_lines_go_on(version):
    assert firmware_gate(version, MINIMUMS) is None


def _result(**values: str) -> call_result.GetConfiguration:
    return call_result.GetConfiguration(
        configuration_key=[
            {"key": key, "readonly": False, "value": value} for key, value in values.items()
        ],
        unknown_key=[],
    )


def test_the_active_profile_is_the_first_of_the_priority_and_the_free_slot_the_other():
    values = configuration_values(
        _result(
            NetworkConnectionProfile1="wss://old/ocpp",
            NetworkConnectionProfile2="",
            NetworkConfigurationPriority="NetworkConnectionProfile1,NetworkConnectionProfile2",
        )
    )
    plan = plan_switch(values)
    assert (plan.active_slot, plan.free_slot) == (
        "NetworkConnectionProfile1",
        "NetworkConnectionProfile2",
    )
    assert plan.new_priority == "NetworkConnectionProfile2,NetworkConnectionProfile1"
    assert plan.active_slot_holds("wss://old/ocpp")

    values["NetworkConfigurationPriority"] = "NetworkConnectionProfile2,NetworkConnectionProfile1"
    plan = plan_switch(values)
    assert plan.free_slot == "NetworkConnectionProfile1"


def test_missing_keys_and_a_strange_priority_are_reported():
    with pytest.raises(MissingKeys, match="lacks network profile keys"):
        plan_switch({"NetworkConnectionProfile1": "ws://a/"})
    with pytest.raises(PlanError, match="cannot tell which profile"):
        plan_switch(
            {
                "NetworkConnectionProfile1": "ws://a/",
                "NetworkConnectionProfile2": "",
                "NetworkConfigurationPriority": "Ethernet,Wifi",
            }
        )
