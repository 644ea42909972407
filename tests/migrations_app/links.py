"""A scripted station at the network edge, for fast tests of the step handlers.

``with station_link(ScriptedStation(...))`` (migrations_app.services.exchanges) sends every
call a handler makes to it instead of through Redis and the gateways: no processes, no
sockets, and every exchange is still recorded as in production. It answers as the command
bridge would: the station's result through the gateway of the CSMS it is on, and a
gateway's "not here" when a call is addressed to another CSMS (a rollback never reaches a
station on the target, and the other way round), and StationOffline when it is on none.
``Firmware`` is a script that keeps the station's configuration keys.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from ocpp.v16 import call, call_result
from ocpp.v16.enums import ConfigurationStatus
from redis import RedisError

from fleet.redis import get_redis
from ocpp_gateway.client import ClaimLapsed, CommandRevoked, StationOffline, claim_command
from ocpp_gateway.envelopes import Outcome, Reply, claim_key, payload_of

# What a script answers to one request: a call_result dataclass (the station's CALLRESULT)
# or a Reply (any other outcome, e.g. call_error()); it may raise StationOffline instead.
Script = Callable[[Any], Any]


@dataclass
class Sent:
    request: Any
    csms: str  # "" = whichever gateway holds the station


@dataclass
class ScriptedStation:
    """A station on ``csms`` that answers each request with ``script(request)``.

    ``csms`` "": no gateway holds it (offline). A test moves the station by setting it.
    """

    script: Script
    csms: str = "csms-1"
    # What the station's BootNotification on this connection said (Reply.boot).
    boot: dict[str, Any] | None = None
    sent: list[Sent] = field(default_factory=list)

    def call(
        self, identity: str, request: Any, *, timeout: float, csms: str, claimed_id: str = ""
    ) -> Reply:
        if claimed_id:
            self._publish_claimed(claimed_id)
        self.sent.append(Sent(request, csms))
        if not self.csms:
            raise StationOffline(identity)
        now = time.time()
        reply = Reply(
            command_id=claimed_id or str(uuid.uuid4()),
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

    def _publish_claimed(self, claimed_id: str) -> None:
        """As the bridge publishes a claimed command: only while its claim stands (it holds
        what a claim taken now on this Redis holds), which then says whether a gateway
        received it (ocpp_gateway.client)."""
        client = get_redis()
        standing = client.get(claim_key(claim_command(client, ttl=1)))
        claim = client.get(claim_key(claimed_id))
        if claim == b"revoked":
            raise CommandRevoked(f"command {claimed_id} not published: its claim was taken back")
        if claim in (b"published", b"nobody"):
            raise RedisError(f"command {claimed_id} was published before: not sent again")
        if claim != standing:
            if claim is not None:
                client.set(claim_key(claimed_id), "revoked", keepttl=True)
            raise ClaimLapsed(f"command {claimed_id} not published: its claim does not stand")
        client.set(claim_key(claimed_id), "published" if self.csms else "nobody", keepttl=True)


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


def no_answer(description: str = "the station did not answer") -> Reply:
    """A script's answer: the call went out and no answer came (it may have been obeyed)."""
    return Reply(
        command_id="",
        station="",
        csms="",
        outcome=Outcome.TIMEOUT,
        error_description=description,
    )


# A ChangeConfiguration refusal: what Firmware answers a write it does not take.
REJECTED = call_result.ChangeConfiguration(status=ConfigurationStatus.rejected)
# What Firmware answers a ChangeConfiguration instead of taking it; None: it takes it.
Refusal = Callable[[call.ChangeConfiguration], Any | None]


def rejecting(key: str, *, unless: str | None = None, answer: Any = REJECTED) -> Refusal:
    """A Firmware refusal: writes of ``key`` get ``answer`` (except of the value ``unless``)."""

    def refuse(request: call.ChangeConfiguration) -> Any | None:
        if request.key == key and request.value != unless:
            return answer
        return None

    return refuse


class Firmware:
    """A station's configuration keys as a Script.

    ``answers[type(request)]`` answers that type of request; otherwise GetConfiguration
    reads the keys and ChangeConfiguration writes one and answers Accepted, unless
    ``refuse`` answers it first (then nothing is written). Any other request fails the test.
    """

    def __init__(
        self,
        config: Mapping[str, str],
        *,
        refuse: Refusal | None = None,
        answers: Mapping[type, Any] | None = None,
    ) -> None:
        self.config = dict(config)
        self.refuse = refuse
        self.answers = dict(answers or {})

    def __call__(self, request: Any) -> Any:
        if type(request) in self.answers:
            return self.answers[type(request)]
        if isinstance(request, call.GetConfiguration):
            keys = request.key if request.key is not None else list(self.config)
            unknown = [key for key in keys if key not in self.config]
            return call_result.GetConfiguration(
                configuration_key=[
                    {"key": key, "readonly": False, "value": self.config[key]}
                    for key in keys
                    if key in self.config
                ],
                unknown_key=unknown or None,
            )
        if isinstance(request, call.ChangeConfiguration):
            refusal = self.refuse(request) if self.refuse else None
            if refusal is not None:
                return refusal
            self.config[request.key] = request.value
            return call_result.ChangeConfiguration(status=ConfigurationStatus.accepted)
        raise AssertionError(f"the station was not expected to get {request}")
