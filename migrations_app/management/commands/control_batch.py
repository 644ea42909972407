"""python manage.py control_batch: what the batch page's buttons do, from a terminal.

Every control is recorded in the batch's history with the user named by --user, who needs
the permission the batch page asks for: approve, the approve permission (and not to have
created the batch); the others, the run permission.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from migrations_app.management.users import user_named
from migrations_app.models import MigrationBatch
from migrations_app.services.controls import (
    RUN_PERMISSION,
    ControlError,
    batch_approve,
    batch_cancel,
    batch_pause,
    batch_promote,
    batch_resume,
    batch_retry_failed,
)

CONTROLS: dict[str, tuple[str, Callable[..., Any]]] = {
    "approve": ("approved: its stations may start", batch_approve),
    "promote": ("promoted: the rest of the batch starts", batch_promote),
    "pause": ("paused: no new station starts; those already armed finish", batch_pause),
    "resume": ("resumed", batch_resume),
    "cancel": ("cancelled: stations not started are cancelled; armed ones finish", batch_cancel),
    "retry": ("failed stations put back in line", batch_retry_failed),
}


class Command(BaseCommand):
    help = (
        "Control a batch as its page does: approve (a second person with the approve "
        "permission), promote (after a canary that waits for it), pause, resume, cancel, "
        "retry (the failed stations). Exit code 2 when the batch is not in a state that "
        "allows it, or the user may not."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("control", choices=CONTROLS)
        parser.add_argument("batch", type=int, metavar="BATCH", help="the batch's id")
        parser.add_argument(
            "--user",
            required=True,
            metavar="NAME",
            help="who does it (recorded in the batch's history)",
        )
        parser.add_argument("--reason", default="", help="why (pause only)")

    def handle(self, *args: Any, **options: Any) -> None:
        user = user_named(options["user"])
        batch_id = options["batch"]
        if not MigrationBatch.objects.filter(id=batch_id).exists():
            raise CommandError(f"no batch {batch_id}", returncode=2)
        # Approving checks its own permission (the service does, for every caller).
        if options["control"] != "approve" and not user.has_perm(RUN_PERMISSION):
            raise CommandError(f"{user} may not control batches (the run permission)", returncode=2)
        done, control = CONTROLS[options["control"]]
        extra = {"reason": options["reason"]} if options["control"] == "pause" else {}
        try:
            result = control(batch_id=batch_id, user=user, **extra)
        except ControlError as exc:
            raise CommandError(str(exc), returncode=2) from exc
        count = f" ({result})" if isinstance(result, int) else ""
        self.stdout.write(f"Batch {batch_id} {done}{count}.")
