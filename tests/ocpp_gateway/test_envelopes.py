"""Typed OCPP across Redis: the dataclasses in, the same JSON on the wire, typed results out."""

from __future__ import annotations

import json

import pytest
from ocpp.v16 import call, call_result
from ocpp.v16.enums import ConfigurationStatus, ResetType

from ocpp_gateway.envelopes import Command, EnvelopeError, Outcome, Reply


def test_a_command_carries_its_request_as_action_and_snake_case_payload():
    command = Command.calling("CP-1", call.Reset(type=ResetType.hard), deadline=10.0, csms="c")
    data = json.loads(command.to_json())
    # The shape gateways and workers of the previous version read and write.
    assert (data["action"], data["payload"], data["csms"]) == ("Reset", {"type": "Hard"}, "c")
    assert Command.calling("CP-1", call.GetConfiguration(), deadline=1.0).payload == {}
    assert Command.from_json(command.to_json()).request() == call.Reset(type="Hard")


def test_a_command_no_request_fits_is_an_envelope_error():
    with pytest.raises(EnvelopeError, match="unknown action 'NoSuchAction'"):
        Command("CP-1", "NoSuchAction", {}, 1.0).request()
    with pytest.raises(EnvelopeError, match="bad payload"):
        Command("CP-1", "Reset", {"kind": "Hard"}, 1.0).request()


def test_a_reply_gives_the_result_typed_with_its_enums():
    reply = Reply("id", "CP-1", "csms-1", Outcome.RESULT, payload={"status": "RebootRequired"})
    result = reply.result(call_result.ChangeConfiguration)
    assert result == call_result.ChangeConfiguration(status=ConfigurationStatus.reboot_required)
    assert result is not None and result.status is ConfigurationStatus.reboot_required


@pytest.mark.parametrize(
    "reply",
    [
        Reply("id", "CP-1", "csms-1", Outcome.CALL_ERROR, error_code="NotImplemented"),
        Reply("id", "CP-1", "csms-1", Outcome.TIMEOUT),
        Reply("id", "CP-1", "csms-1", Outcome.RESULT, payload={"status": "Maybe"}),
        Reply("id", "CP-1", "csms-1", Outcome.RESULT, payload={"configuration_key": []}),
    ],
    ids=["call error", "timeout", "not an enum value", "another action's result"],
)
def test_a_reply_that_is_no_such_result_gives_none(reply):
    assert reply.result(call_result.Reset) is None
