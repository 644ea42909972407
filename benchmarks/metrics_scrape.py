"""Scrape cost: how one scrape of the web process's ``/metrics`` costs as a batch grows.

The web metrics are computed from the database on each scrape (deploy/README.md,
"Monitoring"), so a scrape reads what the batch's stations did: its cost must grow no faster
than the stations it covers. This times ``migrations_app.metrics.exposition()`` (what the
view returns) in process, on a throwaway SQLite database made with ``migrate``: for each
size in turn, one more batch as drive_cost.py makes it (40 % done, 10 % failed, 15 in
flight, the rest pending), each station that started with the history it would have (eight
state changes a done station, five a failed one, six one in flight), then ``--calls``
scrapes, which cover every batch made so far (the database is one per run: Django is set up
once). Reported: the median ms per scrape, the µs per station covered, and the ratio of
the last figure to the first (flat: about 1 or below).

    python benchmarks/metrics_scrape.py [--sizes 1000,10000] [--calls 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.drive_cost import make_batch, setup_django

# The states a station passes through, in order, up to the end its state says.
DONE_PATH = (
    "preflight",
    "reading_config",
    "setting_url",
    "setting_priority",
    "resetting",
    "awaiting_boot",
    "verified",
    "done",
)
FAILED_PATH = ("preflight", "reading_config", "setting_url", "setting_priority", "failed")
IN_FLIGHT_PATH = (
    "preflight",
    "reading_config",
    "setting_url",
    "setting_priority",
    "resetting",
    "awaiting_boot",
)


def add_history(batch_id: int) -> int:
    """The state changes each started station of the batch would have; returns how many."""
    from django.utils import timezone

    from migrations_app.models import StateChange, StationMigration

    paths = {"done": DONE_PATH, "failed": FAILED_PATH, "awaiting_boot": IN_FLIGHT_PATH}
    began = timezone.now() - timedelta(hours=1)
    rows = []
    for migration_id, state in StationMigration.objects.filter(batch_id=batch_id).values_list(
        "id", "state"
    ):
        previous = "pending"
        for step, to_state in enumerate(paths.get(state, ())):
            at = began + timedelta(seconds=step * 1.5 + migration_id % 7)
            rows.append(
                StateChange(
                    migration_id=migration_id, from_state=previous, to_state=to_state, at=at
                )
            )
            previous = to_state
    StateChange.objects.bulk_create(rows, batch_size=5000)
    return len(rows)


def time_scrapes(calls: int) -> tuple[float, int]:
    """(median ms per scrape, bytes of the last exposition)."""
    from migrations_app.metrics import exposition

    times = []
    body = b""
    for _ in range(calls):
        begin = time.perf_counter()
        body = exposition()
        times.append((time.perf_counter() - begin) * 1000)
    return statistics.median(times), len(body)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000")
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args(argv)
    sizes = [int(size) for size in args.sizes.split(",")]
    per_station = []
    with tempfile.TemporaryDirectory(prefix="metrics-scrape-") as workdir:
        setup_django(Path(workdir))
        from fleet.models import CsmsBackend

        source = CsmsBackend.objects.create(name="csms-1", url="ws://127.0.0.1:1/ocpp")
        target = CsmsBackend.objects.create(name="csms-2", url="ws://127.0.0.1:2/ocpp")
        covered = history = 0
        for size in sizes:
            history += add_history(make_batch(size, target, source))
            covered += size
            median, length = time_scrapes(args.calls)
            per_station.append(1000 * median / covered)
            print(
                f"+{size:>6} stations, {covered:>6} covered ({history} history rows): "
                f"{median:8.2f} ms per scrape, {per_station[-1]:6.1f} µs a station, "
                f"{length} bytes"
            )
    print(f"µs a station, ratio last/first: {per_station[-1] / per_station[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
