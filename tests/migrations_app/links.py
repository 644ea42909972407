"""A scripted station at the network edge, for fast tests of the step handlers.

``with station_link(ScriptedStation(...))`` (migrations_app.services.exchanges) sends every
call a handler makes to it instead of through Redis and the gateways: no processes, no
sockets, and every exchange is still recorded as in production. It answers as the command
bridge would: the station's result through the gateway of the CSMS it is on, and a
gateway's "not here" when a call is addressed to another CSMS (a rollback never reaches a
station on the target, and the other way round).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from ocpp_gateway.envelopes import Outcome, Reply, payload_of

# What a script answers to one request: a call_result dataclass (the station's CALLRESULT)
# or a Reply (any other outcome, e.g. call_error()); it may raise StationOffline instead.
Script = Callable[[Any], Any]


@dataclass
class Sent:
    request: Any
    csms: str  # "" = whichever gateway holds the station


@dataclass
class ScriptedStation:
    """A station on ``csms`` that answers each request with ``script(request)``."""

    script: Script
    csms: str = "csms-1"
    # What the station's BootNotification on this connection said (Reply.boot).
    boot: dict[str, Any] | None = None
    sent: list[Sent] = field(default_factory=list)

    def call(self, identity: str, request: Any, *, timeout: float, csms: str) -> Reply:
        self.sent.append(Sent(request, csms))
        now = time.time()
        reply = Reply(
            command_id=str(uuid.uuid4()),
            station=identity,
            csms=self.csms,
            outcome=Outcome.RESULT,
            sent_at=now,
            finished_at=now,
            boot=self.boot,
        )
        if csms and csms != self.csms:
            return replace(
                reply,
                outcome=Outcome.DISCONNECTED,
                error_description=f"addressed to {csms}, not {self.csms}",
                sent=False,
            )
        answer = self.script(request)
        if isinstance(answer, Reply):  # what the station did, on this station's connection
            return replace(
                reply,
                outcome=answer.outcome,
                payload=answer.payload,
                error_code=answer.error_code,
                error_description=answer.error_description,
                sent=answer.sent,
            )
        return replace(reply, payload=payload_of(answer))


def call_error(code: str, description: str = "") -> Reply:
    """A script's answer: the station answered with a CALLERROR."""
    return Reply(
        command_id="",
        station="",
        csms="",
        outcome=Outcome.CALL_ERROR,
        error_code=code,
        error_description=description,
    )
