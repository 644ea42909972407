"""Many simulated stations on one event loop, started at a bounded rate and stopped cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import TypeVar

from ocpp_gateway.simulator.journal import Journal
from ocpp_gateway.simulator.spec import StationSpec, Timing
from ocpp_gateway.simulator.station import SimulatedStation

T = TypeVar("T")


class Fleet:
    """A set of stations: run it in the current loop (`await fleet.run()`, `async with`)
    or in a background thread with its own loop (`fleet.start()` / `fleet.stop()`, `with`).
    """

    def __init__(
        self,
        specs: Iterable[StationSpec],
        *,
        timing: Timing | None = None,
        journal: str | Path | None = None,
        connect_rate: float = 200.0,
        history_size: int = 128,
    ) -> None:
        self.timing = timing or Timing()
        self.journal = Journal(journal)
        self.connect_rate = connect_rate
        self.stations: dict[str, SimulatedStation] = {}
        for spec in specs:
            if spec.identity in self.stations:
                raise ValueError(f"duplicate station identity {spec.identity}")
            self.stations[spec.identity] = SimulatedStation(
                spec, timing=self.timing, journal=self.journal, history_size=history_size
            )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._stop_requested = False
        self._running = threading.Event()
        self._thread: threading.Thread | None = None
        self._thread_error: BaseException | None = None
        self._task: asyncio.Task[None] | None = None

    def __getitem__(self, identity: str) -> SimulatedStation:
        return self.stations[identity]

    def __iter__(self) -> Iterator[SimulatedStation]:
        return iter(self.stations.values())

    def __len__(self) -> int:
        return len(self.stations)

    def summary(self) -> Counter[str]:
        """How many stations are in each state."""
        return Counter(station.state.value for station in self.stations.values())

    # -- in the current event loop -------------------------------------------------------

    async def run(self, duration: float | None = None) -> None:
        """Start every station and run until `request_stop()` or `duration` seconds."""
        if self._loop is not None:
            raise RuntimeError("this fleet is already running")
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        if self._stop_requested:
            self._stop_event.set()
        self.journal.open()
        starter = self._loop.create_task(self._start_all())
        self._running.set()
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_event.wait(), duration)
        finally:
            starter.cancel()
            await asyncio.gather(starter, return_exceptions=True)
            await asyncio.gather(*(s.stop() for s in self.stations.values()))
            self.journal.close()
            self._loop = None
            self._stop_event = None

    async def _start_all(self) -> None:
        # Spread connections over time so a large fleet does not stampede the CSMS.
        loop = asyncio.get_running_loop()
        interval = 1.0 / self.connect_rate if self.connect_rate > 0 else 0.0
        began = loop.time()
        for i, station in enumerate(self.stations.values()):
            delay = began + i * interval - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            station.start()

    def request_stop(self) -> None:
        """Ask the fleet to stop; safe from any thread and from signal handlers."""
        self._stop_requested = True
        loop, event = self._loop, self._stop_event
        if loop is not None and event is not None and not loop.is_closed():
            loop.call_soon_threadsafe(event.set)

    async def __aenter__(self) -> Fleet:
        self._task = asyncio.get_running_loop().create_task(self.run())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.request_stop()
        if self._task is not None:
            await self._task

    # -- in a background thread ----------------------------------------------------------

    def start(self, timeout: float = 10.0) -> Fleet:
        """Run the fleet in a thread with its own event loop (for sync tests and tools)."""
        self._thread = threading.Thread(target=self._thread_main, name="sim-fleet", daemon=True)
        self._thread.start()
        if not self._running.wait(timeout):
            raise RuntimeError("the fleet's event loop did not start")
        return self

    def _thread_main(self) -> None:
        try:
            asyncio.run(self.run())
        except BaseException as error:  # handed to the thread that calls stop()
            self._thread_error = error
        finally:
            self._running.set()

    def stop(self, timeout: float = 30.0) -> None:
        self.request_stop()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise RuntimeError(f"the fleet did not stop within {timeout}s")
            self._thread = None
        if self._thread_error is not None:
            raise self._thread_error

    def __enter__(self) -> Fleet:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


async def run_fleet(
    specs: Iterable[StationSpec],
    *,
    timing: Timing | None = None,
    journal: str | Path | None = None,
    connect_rate: float = 200.0,
    duration: float | None = None,
    history_size: int = 128,
) -> Fleet:
    """Run stations in the current loop until cancelled or `duration`; return the fleet."""
    fleet = Fleet(
        specs,
        timing=timing,
        journal=journal,
        connect_rate=connect_rate,
        history_size=history_size,
    )
    await fleet.run(duration)
    return fleet
