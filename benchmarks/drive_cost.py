"""Drive cost: how one ``batch_drive`` call costs as the batch grows (1,000 and 10,000).

``batch_drive`` runs each time a station ends, so a drive that reads the whole batch makes a
migration's cost per station grow with the batch (quadratic in all). This times the drive
alone, in process, on a throwaway SQLite database made with ``migrate``: for each size, a
batch part way through (40 % done, 10 % failed, 15 of max 20 in flight, the rest pending,
two canary stations done, the rate limit on), then ``--calls`` drives of each (the sizes
in turn), each in a transaction rolled back so each sees the same batch (and nothing is
sent to a broker: the steps and the next drive are sent on commit). Reported: the median
ms per drive for each size and the ratio of the largest to the smallest (flat: about 1).

    python benchmarks/drive_cost.py [--sizes 1000,10000] [--calls 200]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def setup_django(workdir: Path) -> None:
    os.environ["DATABASE_URL"] = f"sqlite:///{workdir / 'drive.sqlite3'}"
    os.environ.setdefault("SECRET_KEY", "benchmark-only-not-secret")
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "fleet.settings")
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", verbosity=0)


def make_batch(size: int, target, source) -> int:
    from django.utils import timezone

    from fleet.models import ChargingStation
    from migrations_app.models import MigrationBatch, StationMigration

    state = StationMigration.State
    prefix = f"CP-{size}-"
    ChargingStation.objects.bulk_create(
        (ChargingStation(identity=f"{prefix}{i:06}", csms=source) for i in range(size)),
        batch_size=2000,
    )
    stations = ChargingStation.objects.filter(identity__startswith=prefix).order_by("identity")
    batch = MigrationBatch.objects.create(
        target=target, max_in_flight=20, rate_per_minute=600, canary_size=2
    )
    long_ago = timezone.now() - timedelta(hours=1)
    done, failed, in_flight = int(size * 0.4), int(size * 0.1), 15
    rows = []
    for index, station in enumerate(stations):
        if index < done:
            row_state = state.DONE
        elif index < done + failed:
            row_state = state.FAILED
        elif index < done + failed + in_flight:
            row_state = state.AWAITING_BOOT
        else:
            row_state = state.PENDING
        ended = row_state in (state.DONE, state.FAILED)
        rows.append(
            StationMigration(
                batch=batch,
                station=station,
                target_url=target.url,
                canary=index < 2,
                state=row_state,
                started_at=None if row_state == state.PENDING else long_ago,
                finished_at=long_ago + timedelta(seconds=index) if ended else None,
            )
        )
    StationMigration.objects.bulk_create(rows, batch_size=2000)
    # What services.progress would have counted as these stations ended.
    MigrationBatch.objects.filter(id=batch.id).update(
        ended_done=done, ended_failed=failed, failed_before_done=0
    )
    return batch.id


def time_drives(batches: dict[int, int], calls: int) -> dict[int, tuple[float, int]]:
    """{size: (median ms per drive, stations each started)}; the sizes take turns, so a
    drift of the machine (other processes, caches) weighs on each alike."""
    from django.db import transaction

    from migrations_app.services.batches import batch_drive

    times: dict[int, list[float]] = {size: [] for size in batches}
    started: dict[int, int] = {}
    for _ in range(calls):
        for size, batch_id in batches.items():
            with transaction.atomic():
                begin = time.perf_counter()
                started[size] = batch_drive(batch_id=batch_id)
                times[size].append((time.perf_counter() - begin) * 1000)
                transaction.set_rollback(True)
    return {size: (statistics.median(times[size]), started[size]) for size in batches}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000")
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args(argv)
    sizes = [int(size) for size in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="drive-cost-") as workdir:
        setup_django(Path(workdir))
        from fleet.models import CsmsBackend

        source = CsmsBackend.objects.create(name="csms-1", url="ws://127.0.0.1:1/ocpp")
        target = CsmsBackend.objects.create(name="csms-2", url="ws://127.0.0.1:2/ocpp")
        batches = {size: make_batch(size, target, source) for size in sizes}
        results = time_drives(batches, args.calls)
    for size, (median, started) in results.items():
        print(f"{size:>7} stations: {median:7.2f} ms per drive (starts {started})")
    ratio = results[sizes[-1]][0] / results[sizes[0]][0]
    print(f"ratio {sizes[-1]}/{sizes[0]}: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
