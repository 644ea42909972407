"""Register a whole whitelist of stations on one CSMS from a CSV file, in one step.

Every row is checked before anything is written, and the rows are then written in one
transaction: a file with an error imports nothing, so the operator fixes it and runs the
same import again. Importing a file again is idempotent.
"""

from __future__ import annotations

import csv
import io
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from django.db import transaction
from django.utils import timezone

from fleet.models import (
    IDENTITY_MAX_LENGTH,
    SERIAL_NUMBER_MAX_LENGTH,
    ChargingStation,
    CsmsBackend,
    Registration,
)
from fleet.services.registry import registry_publish_on_commit
from ocpp_gateway.envelopes import password_digest, password_matches

IDENTITY, SERIAL_NUMBER, PASSWORD = "identity", "serial_number", "password"
COLUMNS = (IDENTITY, SERIAL_NUMBER, PASSWORD)
# Rows per query: SQLite caps the parameters of one statement.
_CHUNK = 500

# What `import_registrations --help` and the admin page say about the file.
FILE_FORMAT_HELP = (
    "UTF-8 CSV, comma-separated, with a header row. Columns: identity (required), "
    "serial_number and password (optional); any other column is an error (a misspelt "
    "'serial' must not import stations without their serial number). An empty serial_number "
    "means any serial, an empty password no password; a column left out keeps what a "
    "registration already has. Re-importing is idempotent; a removed registration listed "
    "again becomes active (one pending removal stays so: the migration's record)."
)


class RegistrationFileError(ValueError):
    """The file as a whole cannot be read (encoding, header)."""


class RegistrationRowsError(ValueError):
    """Rows that cannot be imported, each message starting with its line number."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__(f"{len(errors)} error(s)")
        self.errors = errors


@dataclass(frozen=True)
class RegistrationRow:
    line: int
    identity: str
    # None: the file has no such column (keep what the registration has).
    serial_number: str | None
    password: str | None


@dataclass(frozen=True)
class ImportResult:
    csms: str
    new: int
    updated: int
    unchanged: int

    def summary(self) -> str:
        total = self.new + self.updated + self.unchanged
        return (
            f"{self.csms}: {total} registered "
            f"({self.new} new, {self.updated} updated, {self.unchanged} unchanged)"
        )


def registrations_parse(data: bytes) -> list[RegistrationRow]:
    """Check the whole file; return its rows or raise with every problem found.

    Raises RegistrationFileError for the file as a whole, RegistrationRowsError for rows.
    """
    try:
        # utf-8-sig: spreadsheets put a byte order mark in front of the header.
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise RegistrationFileError(
            f"the file is not UTF-8 (byte {exc.start + 1} cannot be decoded): "
            "save it as 'CSV UTF-8'"
        ) from exc
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        columns = _header_parse(header)
        rows: list[RegistrationRow] = []
        errors: list[str] = []
        first_line: dict[str, int] = {}
        for cells in reader:
            if not any(cell.strip() for cell in cells):
                continue  # blank lines (a trailing newline, spacing) are not rows
            row, problems = _row_parse(reader.line_num, cells, columns, first_line)
            errors += problems
            if row is not None:
                rows.append(row)
    except csv.Error as exc:
        raise RegistrationFileError(f"line {reader.line_num}: not valid CSV: {exc}") from exc
    if errors:
        raise RegistrationRowsError(errors)
    return rows


def _header_parse(header: list[str] | None) -> list[str]:
    if not header or not any(cell.strip() for cell in header):
        raise RegistrationFileError("the file is empty: expected a header row with 'identity'")
    columns = [cell.strip().lower() for cell in header]
    problems = []
    unknown = [cell for cell in columns if cell not in COLUMNS]
    if unknown:
        hint = ""
        if len(header) == 1 and (";" in header[0] or "\t" in header[0]):
            hint = " (columns must be separated by commas)"
        problems.append(
            "unknown column(s) "
            + ", ".join(repr(cell) for cell in unknown)
            + f"{hint}; expected {', '.join(COLUMNS)}"
        )
    repeated = sorted({cell for cell in columns if columns.count(cell) > 1})
    if repeated:
        problems.append("column(s) given twice: " + ", ".join(repeated))
    if IDENTITY not in columns:
        problems.append("no 'identity' column")
    if problems:
        raise RegistrationFileError("line 1: " + "; ".join(problems))
    return columns


def _row_parse(
    line: int, cells: list[str], columns: list[str], first_line: dict[str, int]
) -> tuple[RegistrationRow | None, list[str]]:
    if len(cells) != len(columns):
        return None, [f"line {line}: {len(cells)} cell(s), the header has {len(columns)}"]
    values = dict(zip(columns, cells, strict=True))
    problems = []
    identity = values[IDENTITY]
    problem = identity_problem(identity)
    if problem:
        problems.append(f"line {line}: identity {identity!r} {problem}")
    elif identity in first_line:
        problems.append(
            f"line {line}: identity {identity!r} is already on line {first_line[identity]}"
        )
    else:
        first_line[identity] = line
    serial = values.get(SERIAL_NUMBER)
    if serial is not None:
        if len(serial) > SERIAL_NUMBER_MAX_LENGTH:
            problems.append(
                f"line {line}: serial_number is {len(serial)} characters long; "
                f"OCPP allows {SERIAL_NUMBER_MAX_LENGTH}"
            )
        elif serial != serial.strip():
            problems.append(f"line {line}: serial_number {serial!r} has surrounding whitespace")
    if problems:
        return None, problems
    password = values.get(PASSWORD)
    return RegistrationRow(line, identity, serial, password), []


def identity_problem(identity: str) -> str:
    """Why ``identity`` cannot be a station identity ('' if it can).

    It is the last segment of the station's URL: whitespace or an invisible character
    pasted from a spreadsheet would register a station that never connects.
    """
    if not identity:
        return "is empty"
    if len(identity) > IDENTITY_MAX_LENGTH:
        return f"is {len(identity)} characters long; at most {IDENTITY_MAX_LENGTH}"
    for char in identity:
        if char.isspace() or unicodedata.category(char)[0] in "CZ":
            return f"contains whitespace or an invisible character (U+{ord(char):04X})"
    if "/" in identity:
        return "contains '/' (it is the last segment of the station's URL)"
    return ""


def registrations_import(*, csms: CsmsBackend, rows: Iterable[RegistrationRow]) -> ImportResult:
    """Register ``rows`` on ``csms`` in one transaction (checked rows: registrations_parse).

    A station not yet in the inventory is added (identity only; its first boot fills in
    the rest). A registration pending removal stays so: that is the migration's record.
    """
    rows = list(rows)
    identities = [row.identity for row in rows]
    now = timezone.now()
    with transaction.atomic():
        ChargingStation.objects.bulk_create(
            [ChargingStation(identity=identity) for identity in identities],
            batch_size=_CHUNK,
            ignore_conflicts=True,
        )
        station_ids: dict[str, int] = {}
        existing: dict[int, Registration] = {}
        for start in range(0, len(identities), _CHUNK):
            chunk = identities[start : start + _CHUNK]
            station_ids.update(
                ChargingStation.objects.filter(identity__in=chunk).values_list("identity", "id")
            )
            existing.update(
                (registration.station_id, registration)
                for registration in Registration.objects.select_for_update().filter(
                    csms=csms, station__identity__in=chunk
                )
            )
        new: list[Registration] = []
        changed: list[Registration] = []
        unchanged = 0
        for row in rows:
            station_id = station_ids[row.identity]
            registration = existing.get(station_id)
            if registration is None:
                registration = Registration(station_id=station_id, csms=csms, state_changed_at=now)
                _credentials_apply(registration, row)
                new.append(registration)
            elif _registration_update(registration, row, now):
                changed.append(registration)
            else:
                unchanged += 1
        Registration.objects.bulk_create(new, batch_size=_CHUNK)
        Registration.objects.bulk_update(
            changed,
            ["state", "state_changed_at", "serial_number", "password_sha256"],
            batch_size=_CHUNK,
        )
        if new or changed:
            registry_publish_on_commit([csms.name])
    return ImportResult(csms.name, len(new), len(changed), unchanged)


def _credentials_apply(registration: Registration, row: RegistrationRow) -> bool:
    changed = False
    if row.serial_number is not None and registration.serial_number != row.serial_number:
        registration.serial_number = row.serial_number
        changed = True
    if row.password is not None:
        if not row.password:
            changed |= registration.password_sha256 != ""
            registration.password_sha256 = ""
        elif not password_matches(registration.password_sha256, row.password):
            # Salted: the same password gives another digest, so compare, do not rehash.
            registration.password_sha256 = password_digest(row.password)
            changed = True
    return changed


def _registration_update(registration: Registration, row: RegistrationRow, now: datetime) -> bool:
    changed = _credentials_apply(registration, row)
    if registration.state == Registration.State.REMOVED:
        registration.state = Registration.State.ACTIVE
        registration.state_changed_at = now
        changed = True
    return changed
