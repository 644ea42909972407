from __future__ import annotations

from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from fleet.selectors import csms_backend_get
from fleet.services.registrations import (
    FILE_FORMAT_HELP,
    RegistrationFileError,
    RegistrationRowsError,
    registrations_import,
    registrations_parse,
)


class Command(BaseCommand):
    help = (
        "Register the stations of a CSV file on a CSMS (its gateways admit only registered "
        "stations), all or nothing: with any error nothing is written, every error is "
        "printed and the exit code is 1; an unknown CSMS or a file that cannot be read "
        "(missing, not UTF-8, no identity column) exits 2. " + FILE_FORMAT_HELP
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("csms", help="The CSMS to register the stations on (add_csms NAME).")
        parser.add_argument("file", type=Path, help="The CSV file.")

    def handle(self, *args: Any, csms: str, file: Path, **options: Any) -> None:
        backend = csms_backend_get(name=csms)
        if backend is None:
            raise CommandError(
                f"No CSMS backend named {csms!r} (add it with manage.py add_csms).", returncode=2
            )
        try:
            data = file.read_bytes()
        except OSError as exc:
            raise CommandError(f"Cannot read {file}: {exc.strerror or exc}.", returncode=2) from exc
        try:
            rows = registrations_parse(data)
        except RegistrationFileError as exc:
            raise CommandError(f"{file}: {exc}. Nothing imported.", returncode=2) from exc
        except RegistrationRowsError as exc:
            for error in exc.errors:
                self.stderr.write(f"{file}: {error}")
            raise CommandError(
                f"{len(exc.errors)} error(s) in {file}; nothing imported.", returncode=1
            ) from exc
        result = registrations_import(csms=backend, rows=rows)
        self.stdout.write(self.style.SUCCESS(result.summary()))
