"""Firmware gating of the network keys: in the version logic and over the wire."""

from __future__ import annotations

import pytest
from ocpp.v16 import call
from ocpp.v16.enums import ConfigurationStatus

from devstack.processes import wait_until_async
from ocpp_gateway.simulator import NETWORK_KEYS, Fleet, StationSpec, has_network_keys, parse_version
from tests.simulator.csms import FAST, CentralSystem, run

WITH_KEYS = ["4.2.85", "3.5.54", "5.0.1", "4.2.100", "3.5.60", "4.3.0"]
WITHOUT_KEYS = ["4.2.9", "4.2.84", "3.5.9", "3.5.53"]


def test_it_compares_versions_part_by_part():
    assert parse_version("4.2.9") < parse_version("4.2.85")
    assert parse_version("4.2.85-rc1") == (4, 2, 85)
    with pytest.raises(ValueError):
        parse_version("latest")


@pytest.mark.parametrize("version", WITH_KEYS)
def test_it_has_network_keys_from_the_first_release_of_each_line(version):
    assert has_network_keys(version)


@pytest.mark.parametrize("version", WITHOUT_KEYS)
def test_it_has_no_network_keys_before_it(version):
    assert not has_network_keys(version)


def test_it_reports_the_keys_by_firmware_over_ocpp():
    versions = ["4.2.85", "3.5.54", "5.0.1", "4.2.9", "4.2.84", "3.5.9"]

    async def scenario():
        async with CentralSystem() as csms:
            specs = [
                StationSpec(f"FW-{i}", url=csms.url, firmware=version)
                for i, version in enumerate(versions)
            ]
            async with Fleet(specs, timing=FAST) as fleet:
                await wait_until_async(
                    lambda: all(s.online for s in fleet), 10, "all stations booted"
                )
                for spec in specs:
                    asked = [*NETWORK_KEYS, "HeartbeatInterval"]
                    conf = await csms.call(spec.identity, call.GetConfiguration(key=asked))
                    known = {kv["key"] for kv in conf.configuration_key}
                    change = await csms.call(
                        spec.identity,
                        call.ChangeConfiguration(key="NetworkConnectionProfile2", value=csms.url),
                    )
                    if has_network_keys(spec.firmware):
                        assert known == set(asked), spec.firmware
                        assert not conf.unknown_key
                        assert change.status == ConfigurationStatus.accepted
                    else:
                        assert known == {"HeartbeatInterval"}, spec.firmware
                        assert conf.unknown_key == list(NETWORK_KEYS)
                        assert change.status == ConfigurationStatus.not_supported

    run(scenario())
