"""Simulated OCPP 1.6J charging stations that behave like the vendor firmware.

A real OCPP-J client over a websocket per station, many stations per asyncio process:

    fleet = Fleet([StationSpec("SIM-0001", url="ws://127.0.0.1:9000/ocpp")])
    with fleet:                      # or: async with fleet / await fleet.run()
        ...                          # fleet["SIM-0001"].online once it has booted

The command line (`python -m ocpp_gateway.simulator --help`) is a thin layer on top.
No Django here: this package lives in the gateway's asyncio world.
"""

from ocpp_gateway.simulator.config import NETWORK_KEYS, StationConfig
from ocpp_gateway.simulator.firmware import has_network_keys, parse_version
from ocpp_gateway.simulator.fleet import Fleet, run_fleet
from ocpp_gateway.simulator.journal import Event, Journal, read_journal
from ocpp_gateway.simulator.spec import Behaviour, StationSpec, Timing
from ocpp_gateway.simulator.station import SimulatedStation, StationState

__all__ = [
    "NETWORK_KEYS",
    "Behaviour",
    "Event",
    "Fleet",
    "Journal",
    "SimulatedStation",
    "StationConfig",
    "StationSpec",
    "StationState",
    "Timing",
    "has_network_keys",
    "parse_version",
    "read_journal",
    "run_fleet",
]
