"""A scriptable OCPP-J station for gateway tests: answers as each test needs, over a socket."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from ocpp.routing import on
from ocpp.v16 import ChargePoint, call, call_result
from ocpp.v16.enums import ConfigurationStatus, ResetStatus
from websockets.asyncio.client import connect


class ScriptedStation(ChargePoint):
    """Answers GetConfiguration with its identity; ChangeConfiguration as told; counts Resets."""

    change_configuration_error: Exception | None = None
    silent: bool = False
    boot_result: call_result.BootNotification | None = None
    resets: int = 0

    @on("GetConfiguration")
    async def on_get_configuration(self, key: list[str] | None = None, **_: Any):
        if self.silent:
            await asyncio.sleep(3600)
        return call_result.GetConfiguration(
            configuration_key=[{"key": "Identity", "readonly": True, "value": self.id}],
            unknown_key=[],
        )

    @on("ChangeConfiguration")
    def on_change_configuration(self, key: str, value: str):
        if self.change_configuration_error is not None:
            raise self.change_configuration_error
        return call_result.ChangeConfiguration(status=ConfigurationStatus.accepted)

    @on("Reset")
    def on_reset(self, type: str):
        self.resets += 1
        return call_result.Reset(status=ResetStatus.accepted)


@contextlib.asynccontextmanager
async def station_on(
    base_url: str,
    identity: str,
    *,
    boot: bool = True,
    serial: str | None = None,
    **connect_kwargs: Any,
) -> AsyncIterator[ScriptedStation]:
    connect_kwargs.setdefault("subprotocols", ["ocpp1.6"])
    async with connect(f"{base_url}/{identity}", **connect_kwargs) as ws:
        station = ScriptedStation(identity, ws)
        runner = asyncio.create_task(station.start())
        try:
            if boot:
                station.boot_result = await station.call(
                    call.BootNotification(
                        charge_point_vendor="TestVendor",
                        charge_point_model="T1",
                        firmware_version="4.2.85",
                        charge_point_serial_number=serial,
                    )
                )
            yield station
        finally:
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await runner
