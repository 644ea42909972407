"""The per-command work both session kinds share: our own request checked against its
schema (remembered only once it passed), and the library's key spellings."""

from __future__ import annotations

import asyncio

import pytest
from ocpp.charge_point import camel_to_snake_case, snake_to_camel_case
from ocpp.exceptions import OCPPError
from ocpp.messages import Call

from ocpp_gateway.commands import camel_case_keys, snake_case_keys, validate_request


def test_a_request_that_fails_its_schema_is_refused_every_time():
    too_long = {"key": "K" * 51, "value": "v"}  # ChangeConfiguration's key: maxLength 50
    fitting = {"key": "K" * 50, "value": "v"}
    for _ in range(2):
        asyncio.run(validate_request(Call("1", "ChangeConfiguration", fitting)))
        with pytest.raises(OCPPError):
            asyncio.run(validate_request(Call("2", "ChangeConfiguration", too_long)))
    # The same payload under another action is checked against that action's schema.
    with pytest.raises(OCPPError):
        asyncio.run(validate_request(Call("3", "Reset", fitting)))


def test_the_key_spellings_are_the_librarys():
    answer = {
        "configurationKey": [{"key": "CentralSystemURL", "readonly": False, "value": "x"}],
        "unknownKey": ["SecurityProfile"],
        "idTagInfo": {"expiryDate": None, "parentIdTag": "p"},
        "transactionId": 7,
    }
    assert snake_case_keys(answer) == camel_to_snake_case(answer)
    request = {"connector_id": 1, "cs_charging_profiles": {"charging_profile_id": 3}, "soc": 1}
    assert camel_case_keys(request) == snake_to_camel_case(request)
