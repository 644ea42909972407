"""python manage.py migrate_fleet: start (and optionally follow) a batch of station migrations.

Exit codes with --wait: 0 no station failed; 1 some failed; 2 bad arguments (nothing
created); 3 the batch cannot progress: no state change and no touch of any in-flight
station for MIGRATION_WAIT_STALL_SECONDS while no worker is alive (the batch is left as it
is; it goes on once a worker runs). What is missing (broker, worker, beat) is printed when
the batch starts and when it gives up.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import InterfaceError, OperationalError, connection
from django.db.models import Max

from fleet.models import ChargingStation, CsmsBackend
from migrations_app.management.users import user_named
from migrations_app.models import MigrationBatch
from migrations_app.selectors import batch_counts
from migrations_app.services import policies, workflow
from migrations_app.services.batches import (
    BatchError,
    BatchOptions,
    Webhooks,
    batch_create,
    batch_report,
    held_for,
)
from migrations_app.services.liveness import StackHealth, stack_health
from migrations_app.services.selection import (
    Selection,
    SelectionError,
    StationFilters,
    listed,
    read_stations_file,
    select_stations,
)

POLL_SECONDS = 0.5
BAR_WIDTH = 30
# How often --wait looks at the stack's health (Redis) while it follows a batch.
HEALTH_SECONDS = 2.0
EXIT_STALLED = 3
# How long --wait gives a running batch whose stations all ended to be closed by its drive
# (coalesced 0.25 s after the last end; the beat's tick every second).
BATCH_CLOSE_SECONDS = 5.0


# What --wait reads of the batch on each look: its state and what holds it.
FOLLOWED_FIELDS = (
    "state",
    "pause_reason",
    "approved_at",
    "canary_ended_at",
    "promoted_at",
    "starts_at",
)


class Stalled(Exception):
    """Nothing moved the batch for the stall bound, and no worker lives to move it."""


def _number(
    value: str, kind: type[int] | type[float], test: Callable[[Any], bool], wanted: str
) -> Any:
    """``value`` as a number that passes ``test``; argparse shows ``wanted`` otherwise."""
    try:
        number = kind(value)
    except ValueError:
        number = None
    if number is None or not test(number):
        raise argparse.ArgumentTypeError(f"{value!r} is not {wanted}")
    return number


def _positive(value: str) -> int:
    return _number(value, int, lambda n: n >= 1, "a whole number of at least 1")


def _not_negative(value: str) -> int:
    return _number(value, int, lambda n: n >= 0, "a whole number of at least 0")


def _ratio(value: str) -> float:
    return _number(value, float, lambda r: 0 <= r < 1, "a ratio from 0 up to (not including) 1")


def _factor(value: str) -> float:
    return _number(value, float, lambda f: f > 1, "a factor over 1")


def _criterion(value: str) -> policies.AbortCriterion:
    try:
        return policies.parse_criterion(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _moment(value: str) -> dt.datetime:
    """An ISO 8601 date and time; without an offset, UTC."""
    try:
        moment = dt.datetime.fromisoformat(value.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not an ISO 8601 date and time (e.g. 2026-12-24T22:00, UTC "
            "unless an offset is given)"
        ) from exc
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def _window(value: str) -> tuple[dt.time, dt.time]:
    start, _, end = value.partition("-")
    return dt.time.fromisoformat(start.strip()), dt.time.fromisoformat(end.strip())


class Command(BaseCommand):
    help = (
        "Migrate stations to another CSMS, following the vendor procedure: read the network "
        "keys, write the new URL into the free profile, put it first, Reset Hard, verify the "
        "BootNotification on the target, then mark the old registration for removal. "
        "Exit codes with --wait: 0 none failed, 1 some failed; 2 for bad arguments; "
        "3 when the batch cannot progress (no state change or touch of an in-flight "
        "station for MIGRATION_WAIT_STALL_SECONDS, default 60, and no live worker): it "
        "says what is missing (broker, worker, beat)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--to", required=True, metavar="NAME", help="target CSMS")
        which = parser.add_mutually_exclusive_group()
        which.add_argument(
            "--from", dest="source", metavar="NAME", help="every station now on this CSMS"
        )
        which.add_argument(
            "--station",
            action="append",
            metavar="ID",
            help="a station identity (repeatable); an unknown one is an error",
        )
        which.add_argument(
            "--stations-file",
            metavar="FILE",
            help="the stations listed in FILE: one identity a line (# comments), or a CSV "
            "with an 'identity' column; identities not found are listed and left out",
        )
        parser.add_argument(
            "--vendor",
            default="",
            metavar="NAME",
            help="only stations of this vendor (as in their BootNotification; any case)",
        )
        parser.add_argument(
            "--model", default="", metavar="NAME", help="only stations of this model (any case)"
        )
        parser.add_argument(
            "--firmware-at-least",
            default="",
            metavar="VERSION",
            help="only stations whose firmware is this version or newer, compared part by "
            "part (4.2.9 < 4.2.85); a station with no version number is left out",
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
            "--rate-increase-factor",
            type=_factor,
            default=None,
            metavar="F",
            help="exponential rate: multiply the starts per minute by F (over 1) each time "
            "--rate-increase-every more stations are done, up to --rate-max-per-minute "
            "(default: a constant rate)",
        )
        parser.add_argument(
            "--rate-increase-every",
            type=_positive,
            default=None,
            metavar="N",
            help="stations done between two increases of the exponential rate",
        )
        parser.add_argument(
            "--rate-max-per-minute",
            type=_positive,
            default=None,
            metavar="M",
            help="the exponential rate's ceiling, in starts per minute",
        )
        parser.add_argument(
            "--boot-timeout",
            type=_positive,
            default=BatchOptions.boot_timeout_seconds,
            metavar="SECONDS",
            help="how long to wait for the BootNotification on the target after the Reset, "
            "and for an offline station to come back (default %(default)s)",
        )
        parser.add_argument(
            "--idle-wait",
            type=_not_negative,
            default=BatchOptions.idle_wait_seconds,
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
        brake = parser.add_mutually_exclusive_group()
        brake.add_argument(
            "--brake",
            type=_ratio,
            default=BatchOptions.brake_failure_ratio,
            metavar="RATIO",
            help="pause the batch when failed/(done+failed) exceeds RATIO, e.g. 0.1 "
            "(default %(default)s)",
        )
        brake.add_argument(
            "--no-brake",
            action="store_true",
            help="no failure brake at all (neither the ratio nor the first failures)",
        )
        parser.add_argument(
            "--brake-min-sample",
            type=_positive,
            default=BatchOptions.brake_min_sample,
            metavar="N",
            help="stations that must have ended before the ratio brake acts (default %(default)s)",
        )
        parser.add_argument(
            "--brake-first",
            type=_not_negative,
            default=BatchOptions.brake_first_failed,
            metavar="N",
            help="pause the batch when the first N ended stations all failed; 0 = off "
            "(default %(default)s)",
        )
        parser.add_argument(
            "--pause-when",
            type=_criterion,
            action="append",
            default=[],
            metavar="KIND:THRESHOLD[:MIN_SAMPLE]",
            help="abort criterion (repeatable): pause the batch once failures of KIND "
            f"({', '.join(policies.KINDS)}) reach THRESHOLD, a percent of the ended stations "
            "(10%%) or a count (5), once MIN_SAMPLE stations have ended (default 1); e.g. "
            "fallback:10%%:20 or timeout:5. Like the brake, it counts from the last resume",
        )
        parser.add_argument(
            "--require-approval",
            action="store_true",
            help="no station starts until a second person with the approve permission "
            "approves the batch (the batch page, or manage.py control_batch approve)",
        )
        parser.add_argument(
            "--promote-after-canary",
            action="store_true",
            help="after the --canary wave the rest wait until an operator promotes the "
            "batch (the batch page, or manage.py control_batch promote)",
        )
        parser.add_argument(
            "--start-at",
            type=_moment,
            default=None,
            metavar="WHEN",
            help="schedule: no station starts before WHEN (ISO 8601, UTC unless an offset "
            "is given, e.g. 2026-12-24T22:00)",
        )
        parser.add_argument(
            "--end-at",
            type=_moment,
            default=None,
            metavar="WHEN",
            help="schedule: no station starts after WHEN; the armed ones finish, those not "
            "started are cancelled. Composes with --window",
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
        parser.add_argument(
            "--install-root-ca",
            action="store_true",
            help="for a wss:// target with a root CA: install it (InstallCertificate through "
            "the source) on a station that lacks it, then check again; without it such a "
            "station is skipped",
        )
        parser.add_argument(
            "--security-extension",
            choices=MigrationBatch.SecurityExtension.values,
            default=BatchOptions.security_extension,
            help="a station that does not support GetInstalledCertificateIds (OCPP 1.6 "
            "security extension), for a wss:// target with a root CA: require = skip it, "
            "proceed = go on with a warning in its report (default %(default)s)",
        )
        parser.add_argument(
            "--webhook",
            action="append",
            default=[],
            metavar="URL",
            help="POST the batch's events (started, canary passed, paused, resumed, "
            "cancelled, finished) as JSON to URL (repeatable; a Slack incoming webhook works "
            "as is); MIGRATION_WEBHOOK_URL, when set, is added to every batch",
        )
        parser.add_argument(
            "--webhook-secret",
            default="",
            metavar="SECRET",
            help="sign the --webhook bodies: X-Csms-Migrate-Signature: sha256=HMAC-SHA256 "
            "of the body with SECRET (default: unsigned)",
        )
        parser.add_argument(
            "--webhook-failures",
            action="store_true",
            help="also POST every station that fails to the --webhook URLs",
        )
        parser.add_argument(
            "--user",
            default=None,
            metavar="NAME",
            help="who starts the batch (recorded as its creator, who may not approve it; "
            "default: nobody, and any user with the approve permission may)",
        )
        parser.add_argument("--wait", action="store_true", help="follow the batch to its end")
        parser.add_argument(
            "--json", action="store_true", help="print the report (or the batch id) as JSON"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        creator = user_named(options["user"]) if options["user"] else None
        target = self._csms(options["to"])
        source = self._csms(options["source"]) if options["source"] else None
        selection = self._selection(source, options)
        for note in selection.notes():
            self.stderr.write(f"Selection: {note}.")
        stations = selection.stations
        if not stations:
            raise CommandError("no station matches the selection", returncode=2)
        batch_options = BatchOptions(
            max_in_flight=options["max_in_flight"],
            rate_per_minute=options["rate_per_minute"],
            boot_timeout_seconds=options["boot_timeout"],
            idle_wait_seconds=options["idle_wait"],
            cleanup=options["cleanup"],
            dry_run=options["dry_run"],
            allow_downgrade=options["allow_downgrade"],
            canary_size=options["canary"],
            brake_failure_ratio=None if options["no_brake"] else options["brake"],
            brake_min_sample=options["brake_min_sample"],
            brake_first_failed=0 if options["no_brake"] else options["brake_first"],
            window_start=options["window"][0] if options["window"] else None,
            window_end=options["window"][1] if options["window"] else None,
            offline_wait_seconds=options["offline_wait"],
            install_root_ca=options["install_root_ca"],
            security_extension=options["security_extension"],
            rate_increase_factor=options["rate_increase_factor"],
            rate_increase_every=options["rate_increase_every"] or 0,
            rate_max_per_minute=options["rate_max_per_minute"] or 0,
            abort_criteria=tuple(options["pause_when"]),
            starts_at=options["start_at"],
            ends_at=options["end_at"],
            approval_required=options["require_approval"],
            promote_after_canary=options["promote_after_canary"],
        )
        try:
            batch = batch_create(
                target=target,
                stations=stations,
                options=batch_options,
                source=source,
                created_by=creator,
                selection=selection.record(),
                webhooks=Webhooks(
                    urls=tuple(options["webhook"]),
                    secret=options["webhook_secret"],
                    station_failures=options["webhook_failures"],
                ),
            )
        except BatchError as exc:
            raise CommandError(str(exc), returncode=2) from exc
        self._warn_missing(stack_health())
        if not options["wait"]:
            if options["json"]:
                started = {"batch": batch.id, "stations": len(stations)}
                self.stdout.write(json.dumps({**started, "selection": batch.selection}))
            elif held := held_for(batch):
                self.stdout.write(
                    f"Batch {batch.id} created: {len(stations)} stations to {target}, {held}."
                )
            else:
                self.stdout.write(
                    f"Batch {batch.id} started: {len(stations)} stations to {target}."
                )
            return
        self.stderr.write(f"Batch {batch.id}: {len(stations)} stations to {target}.")
        if batch.approval_required:
            self.stderr.write(
                f"Batch {batch.id} waits for approval by a second person with the approve "
                f"permission: its batch page, or manage.py control_batch approve {batch.id} "
                "--user NAME."
            )
        try:
            self._follow(batch)
        except KeyboardInterrupt:
            self.stderr.write(f"\nStopped following; batch {batch.id} goes on in the workers.")
            sys.exit(130)
        except Stalled as stalled:
            self.stderr.write(
                f"\nGave up following batch {batch.id}: {stalled}. The batch is left as it "
                "is and goes on once a worker runs."
            )
            sys.exit(EXIT_STALLED)
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

    def _selection(self, source: CsmsBackend | None, options: dict[str, Any]) -> Selection:
        filters = StationFilters(
            vendor=options["vendor"],
            model=options["model"],
            firmware_at_least=options["firmware_at_least"],
        )
        identities = options["station"]
        if not (source or identities or options["stations_file"] or filters):
            raise CommandError(
                "say which stations: --from, --station, --stations-file, or a filter "
                "(--vendor, --model, --firmware-at-least) over the whole fleet",
                returncode=2,
            )
        everyone = ChargingStation.objects.all()
        try:
            if source is not None:
                selection = select_stations(stations=everyone.filter(csms=source), filters=filters)
                if not selection.stations and not selection.filtered_out:
                    raise CommandError(f"no stations are on {source}", returncode=2)
                return selection
            if identities:
                selection = select_stations(
                    stations=everyone, identities=identities, filters=filters
                )
                if selection.not_found:
                    # Typed on the command line: a typo to fix, not a station to leave out.
                    raise CommandError(
                        f"unknown station(s): {listed(selection.not_found)}", returncode=2
                    )
                return selection
            if options["stations_file"]:
                path = options["stations_file"]
                return select_stations(
                    stations=everyone,
                    identities=read_stations_file(path),
                    filters=filters,
                    stations_file=path,
                )
            return select_stations(stations=everyone, filters=filters)
        except SelectionError as exc:
            raise CommandError(str(exc), returncode=2) from exc

    def _warn_missing(self, health: StackHealth) -> None:
        for missing in health.missing():
            self.stderr.write(f"Warning: {missing}.")

    def _follow(self, batch: MigrationBatch) -> None:
        tty = self.stderr.isatty()
        last_line = ""
        last_print = 0.0
        progress = _Progress(batch)
        all_ended_at: float | None = None
        while True:
            try:
                batch.refresh_from_db(fields=[*FOLLOWED_FIELDS])
                counts = batch_counts(batch)
            except (OperationalError, InterfaceError) as exc:
                # A restarted database: reconnect on the next look, within the bound.
                connection.close()
                progress.database_down(exc)
                time.sleep(POLL_SECONDS)
                continue
            line = _progress_line(counts)
            if batch.state == MigrationBatch.State.PAUSED:
                line += f" | PAUSED: {batch.pause_reason}"
            held = held_for(batch)
            if held:
                line += f" | {held}"
            now = time.monotonic()
            if tty:
                self.stderr.write("\r" + line.ljust(len(last_line)), ending="")
            elif line != last_line and now - last_print >= 5:
                self.stderr.write(line)
                last_print = now
            last_line = line
            ended = sum(counts.get(s, 0) for s in workflow.TERMINAL)
            if batch.state == MigrationBatch.State.FINISHED:
                break
            if ended == sum(counts.values()):
                # A running batch is closed by its next drive, a moment after its last
                # station ended: wait for it, but not for a drive no worker may run.
                all_ended_at = all_ended_at or now
                if batch.state != MigrationBatch.State.RUNNING or (
                    now - all_ended_at >= BATCH_CLOSE_SECONDS
                ):
                    break
                time.sleep(POLL_SECONDS)
                continue
            all_ended_at = None  # a retry of the failed ones started them again
            try:
                progress.check(counts, batch.state)
            except (OperationalError, InterfaceError) as exc:
                connection.close()
                progress.database_down(exc)
            time.sleep(POLL_SECONDS)
        if tty:
            self.stderr.write("")
        else:
            self.stderr.write(last_line)

    def _print_report(self, report: dict[str, Any]) -> None:
        for role, csms in [
            *(("source", s) for s in report["sources"]),
            ("target", report["target"]),
        ]:
            behind = f" in front of {csms['upstream']}" if csms["upstream"] else ""
            self.stdout.write(f"{role}: {csms['name']} {csms['url']} ({csms['mode']}{behind})")
        width = max([len(s["identity"]) for s in report["stations"]] + [8])
        self.stdout.write(f"{'STATION':<{width}}  {'STATE':<9}  {'STEP':<16}  REASON")
        for s in report["stations"]:
            self.stdout.write(
                f"{s['identity']:<{width}}  {s['state']:<9}  {s['step']:<16}  {s['reason']}"
            )
            for warning in s.get("warnings") or ():
                self.stdout.write(f"{'':<{width}}  warning: {warning}")
        totals = ", ".join(f"{n} {state}" for state, n in report["counts"].items())
        self.stdout.write(f"Batch {report['batch']}: {totals}")
        if report["selection"].get("not_found"):
            not_found = report["selection"]["not_found"]
            self.stdout.write(f"Not found, left out ({len(not_found)}): {', '.join(not_found)}")


class _Progress:
    """Whether a followed batch still moves: its counts, its state, the last touch of a
    station (waiting steps touch theirs). Raises Stalled when it has not moved for the
    bound and no worker is alive; a live worker may be in a long legitimate wait."""

    def __init__(self, batch: MigrationBatch) -> None:
        self.batch = batch
        self.bound = settings.MIGRATION_WAIT_STALL_SECONDS
        self.seen: Any = None
        self.moved_at = time.monotonic()
        self.health_at = 0.0
        self.health: StackHealth | None = None

    def database_down(self, error: Exception) -> None:
        """The database did not answer: not progress; past the bound, give up saying so."""
        if time.monotonic() - self.moved_at >= self.bound:
            raise Stalled(f"the database did not answer for {self.bound:.0f}s ({error})")

    def check(self, counts: dict[str, int], state: str) -> None:
        now = time.monotonic()
        touched = self.batch.stations.aggregate(at=Max("updated_at"))["at"]
        seen = (tuple(sorted(counts.items())), state, touched)
        if seen != self.seen:
            self.seen, self.moved_at = seen, now
            return
        if now - self.health_at >= HEALTH_SECONDS:
            self.health, self.health_at = stack_health(), now
        assert self.health is not None
        if self.health.broker and self.health.workers:
            self.moved_at = now  # a live worker: a long wait is legitimate
            return
        if now - self.moved_at >= self.bound:
            raise Stalled(
                f"nothing moved for {self.bound:.0f}s ({_waiting_for(counts)}) and "
                + "; ".join(self.health.missing())
            )


def _waiting_for(counts: dict[str, int]) -> str:
    waiting = {state: n for state, n in counts.items() if state not in workflow.TERMINAL and n}
    return "waited for: " + ", ".join(f"{n} {state}" for state, n in sorted(waiting.items()))


def _progress_line(counts: dict[str, int]) -> str:
    total = sum(counts.values()) or 1
    ended = sum(counts.get(s, 0) for s in workflow.TERMINAL)
    filled = int(BAR_WIDTH * ended / total)
    in_flight = total - ended - counts.get("pending", 0)
    return (
        f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {ended}/{total} ended: "
        f"{counts.get('done', 0)} done, {counts.get('failed', 0)} failed, "
        f"{counts.get('skipped', 0)} skipped; {in_flight} in flight"
    )
