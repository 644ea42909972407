"""python manage.py migrate_fleet: start (and optionally follow) a batch of station migrations."""

from __future__ import annotations

import datetime as dt
import json
import sys
import time
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from fleet.celery import app as celery_app
from fleet.models import ChargingStation, CsmsBackend
from migrations_app.models import MigrationBatch, StationMigration
from migrations_app.selectors import batch_counts
from migrations_app.services.batches import BatchError, BatchOptions, batch_create, batch_report

POLL_SECONDS = 0.5
BAR_WIDTH = 30


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise ValueError(value)
    return number


def _not_negative(value: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError(value)
    return number


def _ratio(value: str) -> float:
    ratio = float(value)
    if not 0 <= ratio < 1:
        raise ValueError(value)
    return ratio


def _window(value: str) -> tuple[dt.time, dt.time]:
    start, _, end = value.partition("-")
    return dt.time.fromisoformat(start.strip()), dt.time.fromisoformat(end.strip())


class Command(BaseCommand):
    help = (
        "Migrate stations to another CSMS, following the vendor procedure: read the network "
        "keys, write the new URL into the free profile, put it first, Reset Hard, verify the "
        "BootNotification on the target, then mark the old registration for removal. "
        "Exit codes with --wait: 0 none failed, 1 some failed; 2 for bad arguments."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--to", required=True, metavar="NAME", help="target CSMS")
        which = parser.add_mutually_exclusive_group(required=True)
        which.add_argument(
            "--from", dest="source", metavar="NAME", help="every station now on this CSMS"
        )
        which.add_argument(
            "--station", action="append", metavar="ID", help="a station identity (repeatable)"
        )
        parser.add_argument(
            "--max-in-flight",
            type=_positive,
            default=BatchOptions.max_in_flight,
            metavar="N",
            help="stations migrating at once, across all workers (default %(default)s)",
        )
        parser.add_argument(
            "--rate-per-minute",
            type=_not_negative,
            default=BatchOptions.rate_per_minute,
            metavar="R",
            help="stations started per minute, across all workers; 0 = no limit "
            "(default %(default)s)",
        )
        parser.add_argument(
            "--boot-timeout",
            type=_positive,
            default=300,
            metavar="SECONDS",
            help="how long to wait for the BootNotification on the target after the Reset, "
            "and for an offline station to come back (default %(default)s)",
        )
        parser.add_argument(
            "--idle-wait",
            type=_not_negative,
            default=1800,
            metavar="SECONDS",
            help="how long a station with a charging session may delay its Reset "
            "(default %(default)s)",
        )
        parser.add_argument(
            "--canary",
            type=_not_negative,
            default=0,
            metavar="K",
            help="the first K stations must all verify before the rest start; a canary "
            "failure pauses the batch (default %(default)s: no canary)",
        )
        parser.add_argument(
            "--brake",
            type=_ratio,
            default=None,
            metavar="RATIO",
            help="pause the batch when failed/(done+failed) exceeds RATIO, e.g. 0.1 "
            "(default: no brake)",
        )
        parser.add_argument(
            "--brake-min-sample",
            type=_positive,
            default=10,
            metavar="N",
            help="stations that must have ended before the brake acts (default %(default)s)",
        )
        parser.add_argument(
            "--window",
            type=_window,
            default=None,
            metavar="HH:MM-HH:MM",
            help="maintenance window (UTC, may span midnight): stations start only inside it",
        )
        parser.add_argument(
            "--offline-wait",
            type=_not_negative,
            default=0,
            metavar="SECONDS",
            help="queue stations offline when their turn comes until they reconnect, up to "
            "this long (default %(default)s: fail them as offline after the boot timeout)",
        )
        parser.add_argument(
            "--cleanup", action="store_true", help="blank the old profile slot afterwards"
        )
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="pre-flight and read the configuration only; report what each station would get",
        )
        parser.add_argument(
            "--allow-downgrade", action="store_true", help="allow moving from wss:// to ws://"
        )
        parser.add_argument("--wait", action="store_true", help="follow the batch to its end")
        parser.add_argument(
            "--json", action="store_true", help="print the report (or the batch id) as JSON"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        target = self._csms(options["to"])
        source = self._csms(options["source"]) if options["source"] else None
        stations = self._stations(source, options["station"])
        batch_options = BatchOptions(
            max_in_flight=options["max_in_flight"],
            rate_per_minute=options["rate_per_minute"],
            boot_timeout_seconds=options["boot_timeout"],
            idle_wait_seconds=options["idle_wait"],
            cleanup=options["cleanup"],
            dry_run=options["dry_run"],
            allow_downgrade=options["allow_downgrade"],
            canary_size=options["canary"],
            brake_failure_ratio=options["brake"],
            brake_min_sample=options["brake_min_sample"],
            window_start=options["window"][0] if options["window"] else None,
            window_end=options["window"][1] if options["window"] else None,
            offline_wait_seconds=options["offline_wait"],
        )
        try:
            batch = batch_create(
                target=target, stations=stations, options=batch_options, source=source
            )
        except BatchError as exc:
            raise CommandError(str(exc), returncode=2) from exc
        self._warn_without_workers()
        if not options["wait"]:
            if options["json"]:
                self.stdout.write(json.dumps({"batch": batch.id, "stations": len(stations)}))
            else:
                self.stdout.write(
                    f"Batch {batch.id} started: {len(stations)} stations to {target}."
                )
            return
        self.stderr.write(f"Batch {batch.id}: {len(stations)} stations to {target}.")
        try:
            self._follow(batch)
        except KeyboardInterrupt:
            self.stderr.write(f"\nStopped following; batch {batch.id} goes on in the workers.")
            sys.exit(130)
        batch.refresh_from_db()
        report = batch_report(batch)
        if options["json"]:
            self.stdout.write(json.dumps(report, indent=2))
        else:
            self._print_report(report)
        if report["counts"].get("failed"):
            sys.exit(1)

    def _csms(self, name: str) -> CsmsBackend:
        backend = CsmsBackend.objects.filter(name=name).first()
        if backend is None:
            known = ", ".join(CsmsBackend.objects.values_list("name", flat=True)) or "none"
            raise CommandError(f"unknown CSMS {name!r} (known: {known})", returncode=2)
        return backend

    def _stations(
        self, source: CsmsBackend | None, identities: list[str] | None
    ) -> list[ChargingStation]:
        if source is not None:
            stations = list(ChargingStation.objects.filter(csms=source).order_by("identity"))
            if not stations:
                raise CommandError(f"no stations are on {source}", returncode=2)
            return stations
        assert identities
        wanted = list(dict.fromkeys(identities))
        found = {s.identity: s for s in ChargingStation.objects.filter(identity__in=wanted)}
        unknown = [identity for identity in wanted if identity not in found]
        if unknown:
            raise CommandError(f"unknown station(s): {', '.join(unknown)}", returncode=2)
        return [found[identity] for identity in wanted]

    def _warn_without_workers(self) -> None:
        try:
            answered = celery_app.control.ping(timeout=1.0)
        except Exception:  # the broker itself is unreachable: batch_create already committed
            answered = []
        if not answered:
            self.stderr.write(
                "Warning: no Celery worker answered; the batch starts when one runs "
                "(celery -A fleet worker -B)."
            )

    def _follow(self, batch: MigrationBatch) -> None:
        tty = self.stderr.isatty()
        last_line = ""
        last_print = 0.0
        while True:
            batch.refresh_from_db(fields=["state", "pause_reason"])
            counts = batch_counts(batch)
            line = _progress_line(counts)
            if batch.state == MigrationBatch.State.PAUSED:
                line += f" | PAUSED: {batch.pause_reason}"
            now = time.monotonic()
            if tty:
                self.stderr.write("\r" + line.ljust(len(last_line)), ending="")
            elif line != last_line and now - last_print >= 5:
                self.stderr.write(line)
                last_print = now
            last_line = line
            ended = sum(counts.get(s, 0) for s in StationMigration.TERMINAL)
            if batch.state == MigrationBatch.State.FINISHED or ended == sum(counts.values()):
                break
            time.sleep(POLL_SECONDS)
        if tty:
            self.stderr.write("")
        else:
            self.stderr.write(last_line)

    def _print_report(self, report: dict[str, Any]) -> None:
        width = max([len(s["identity"]) for s in report["stations"]] + [8])
        self.stdout.write(f"{'STATION':<{width}}  {'STATE':<9}  {'STEP':<16}  REASON")
        for s in report["stations"]:
            self.stdout.write(
                f"{s['identity']:<{width}}  {s['state']:<9}  {s['step']:<16}  {s['reason']}"
            )
        totals = ", ".join(f"{n} {state}" for state, n in report["counts"].items())
        self.stdout.write(f"Batch {report['batch']}: {totals}")


def _progress_line(counts: dict[str, int]) -> str:
    total = sum(counts.values()) or 1
    ended = sum(counts.get(s, 0) for s in ("done", "failed", "skipped", "cancelled"))
    filled = int(BAR_WIDTH * ended / total)
    in_flight = total - ended - counts.get("pending", 0)
    return (
        f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {ended}/{total} ended: "
        f"{counts.get('done', 0)} done, {counts.get('failed', 0)} failed, "
        f"{counts.get('skipped', 0)} skipped; {in_flight} in flight"
    )
