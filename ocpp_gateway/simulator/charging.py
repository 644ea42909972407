"""A charging session as the station keeps it until the CSMS has heard of its start and stop."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime

from ocpp.v16.enums import Reason

# A simulated 11 kW AC charger.
_POWER_W = 11_000


def ocpp_timestamp(epoch: float | None = None) -> str:
    moment = datetime.fromtimestamp(time.time() if epoch is None else epoch, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(slots=True)
class Transaction:
    connector_id: int
    id_tag: str
    meter_start: int
    started_at: float
    # Set once StartTransaction.conf arrived; None means the CSMS has not heard of it yet.
    transaction_id: int | None = None
    stop_reason: Reason | None = None
    meter_stop: int | None = None
    stopped_at: float | None = None
    # Stops by itself after this many seconds (the --charging IDS:SECONDS behaviour).
    limit_seconds: float | None = None

    @property
    def running(self) -> bool:
        return self.stop_reason is None

    def meter_now(self) -> int:
        if self.meter_stop is not None:
            return self.meter_stop
        return self.meter_start + int((time.time() - self.started_at) * _POWER_W / 3600)

    def stop(self, reason: Reason) -> None:
        """End the session locally; StopTransaction goes out when the station is online."""
        if self.running:
            self.meter_stop = self.meter_now()
            self.stopped_at = time.time()
            self.stop_reason = reason
