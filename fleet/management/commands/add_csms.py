from __future__ import annotations

from pathlib import Path
from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser

from fleet.models import CsmsBackend
from fleet.selectors import csms_backend_get
from fleet.services.inventory import csms_backend_upsert
from fleet.validators import ROOT_CA_MAX_BYTES, root_ca_pem_from_file, root_ca_summary


class Command(BaseCommand):
    help = (
        "Create a CSMS backend, or set again everything about an existing one. Its gateways "
        "admit only the stations registered on it (manage.py import_registrations), unless "
        "--open. The command line is the whole record: an option left out on a rerun is "
        "turned off (--open), removed (--upstream: back to endpoint mode) or cleared "
        "(--root-ca), and the output says so."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("name", help="The name its gateways run with (--csms NAME).")
        parser.add_argument(
            "url",
            help="ws:// or wss:// URL written into the stations: in proxy mode the public URL "
            "of its gateways, not the upstream's.",
        )
        parser.add_argument(
            "--open",
            dest="open_admission",
            action="store_true",
            help="A lab CSMS: its gateways admit any station. Without it (also when run "
            "again for an existing CSMS) only registered stations are admitted.",
        )
        parser.add_argument(
            "--upstream",
            metavar="UPSTREAM_URL",
            default="",
            help="Proxy mode: the operator's real CSMS its gateways run in front of (record of "
            "what they run with: python -m ocpp_gateway --csms NAME --upstream UPSTREAM_URL). "
            "No user:password@ in it (refused): per-station credentials go in the gateway's "
            "--upstream-auth-file. Not this CSMS's own URL (a loop). Without it (also when run "
            "again) the CSMS is in endpoint mode: its gateways are "
            "the CSMS.",
        )
        parser.add_argument(
            "--root-ca",
            metavar="FILE.pem",
            type=Path,
            help="The root CA certificate (PEM, or DER) the stations need to trust URL; "
            "pre-flight checks that each station has it installed (wss:// URLs). Without it "
            "(also when run again) the CSMS has no root CA.",
        )

    def handle(
        self,
        *args: Any,
        name: str,
        url: str,
        open_admission: bool,
        upstream: str,
        root_ca: Path | None,
        **options: Any,
    ) -> None:
        root_ca_pem = _read_root_ca(root_ca) if root_ca is not None else ""
        previous = csms_backend_get(name=name)
        try:
            backend, created = csms_backend_upsert(
                name=name,
                url=url,
                open_admission=open_admission,
                upstream_url=upstream,
                root_ca_pem=root_ca_pem,
            )
        except ValidationError as exc:
            problems = [
                f"{field}: {message}"
                for field, messages in exc.message_dict.items()
                for message in messages
            ]
            raise CommandError(
                f"CSMS {name!r} not saved:\n  " + "\n  ".join(problems), returncode=2
            ) from exc
        verb = "Created" if created else "Updated"
        admits = "any station (open)" if backend.open_admission else "registered stations only"
        self.stdout.write(
            self.style.SUCCESS(f"{verb} CSMS {backend.name}: {backend.url}, admits {admits}")
        )
        for line in _describe(backend):
            self.stdout.write(f"  {line}")
        for line in _removed(previous, backend):
            self.stdout.write(self.style.WARNING(f"  {line}"))


def _read_root_ca(path: Path) -> str:
    try:
        with path.open("rb") as file:
            data = file.read(ROOT_CA_MAX_BYTES + 1)
    except OSError as exc:
        raise CommandError(
            f"--root-ca {path}: cannot read it ({exc.strerror or exc}). Nothing saved.",
            returncode=2,
        ) from exc
    if len(data) > ROOT_CA_MAX_BYTES:
        raise CommandError(
            f"--root-ca {path}: larger than {ROOT_CA_MAX_BYTES} bytes, not a certificate. "
            "Nothing saved.",
            returncode=2,
        )
    try:
        return root_ca_pem_from_file(data)
    except ValueError as exc:
        raise CommandError(f"--root-ca {path}: {exc} Nothing saved.", returncode=2) from exc


def _describe(backend: CsmsBackend) -> list[str]:
    if backend.upstream_url:
        mode = f"mode: proxy -> {backend.upstream_shown} (its gateways run with --upstream)"
    else:
        mode = "mode: endpoint (its gateways are the CSMS)"
    if not backend.root_ca_pem:
        root_ca = "root CA: none"
    else:
        root_ca = f"root CA: {root_ca_summary(backend.root_ca_pem)}"
        if not backend.url.lower().startswith("wss://"):
            # Pre-flight checks the certificate for wss:// targets only: say so now rather
            # than let the operator believe the stations were checked.
            root_ca += " (not checked by pre-flight: the URL is not wss://)"
    return [mode, root_ca]


def _removed(previous: CsmsBackend | None, backend: CsmsBackend) -> list[str]:
    """What a rerun took away because its option was left out: easy to do by accident."""
    if previous is None:
        return []
    lines = []
    if previous.upstream_url and not backend.upstream_url:
        lines.append(
            f"upstream {previous.upstream_shown} removed (no --upstream): now endpoint mode"
        )
    if previous.root_ca_pem and not backend.root_ca_pem:
        lines.append("root CA removed (no --root-ca)")
    return lines
