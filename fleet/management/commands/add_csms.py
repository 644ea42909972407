from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser

from fleet.services.inventory import csms_backend_upsert


class Command(BaseCommand):
    help = (
        "Create a CSMS backend, or change the URL of an existing one. Its gateways admit only "
        "the stations registered on it (manage.py import_registrations), unless --open."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("name", help="The name its gateways run with (--csms NAME).")
        parser.add_argument("url", help="ws:// or wss:// URL written into the stations.")
        parser.add_argument(
            "--open",
            dest="open_admission",
            action="store_true",
            help="A lab CSMS: its gateways admit any station. Without it (also when run "
            "again for an existing CSMS) only registered stations are admitted.",
        )

    def handle(self, *args: Any, name: str, url: str, open_admission: bool, **options: Any) -> None:
        try:
            backend, created = csms_backend_upsert(
                name=name, url=url, open_admission=open_admission
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
