"""Send a migration's OCPP commands through the station link and record every exchange.

The link is the network edge: in production the Redis command bridge to the gateways
(``RedisBridge``); a test puts a scripted station in its place with ``station_link``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Protocol

from django.conf import settings
from redis import RedisError

from fleet.redis import get_redis
from fleet.rows import insert_row
from migrations_app.models import OcppExchange, StationMigration
from ocpp_gateway.client import CommandNotSent, StationOffline, send_command
from ocpp_gateway.envelopes import Outcome, Reply, payload_of

if TYPE_CHECKING:
    from _typeshed import DataclassInstance


class StationLink(Protocol):
    """How one OCPP call reaches a station and its outcome comes back.

    ``request`` is an ocpp.v16.call dataclass; ``csms`` names the only CSMS whose gateway
    may send it ("" = whichever holds the station). Raises StationOffline when no gateway
    holds the station, CommandNotSent when nothing was published, and other RedisErrors
    when Redis failed after the publish (the station may have received it).
    """

    def call(
        self,
        identity: str,
        request: DataclassInstance,
        *,
        timeout: float,
        csms: str,
        claimed_id: str = "",
    ) -> Reply: ...


class RedisBridge:
    """The production link: publish to the gateways, wait for their reply (send_command)."""

    def call(
        self,
        identity: str,
        request: DataclassInstance,
        *,
        timeout: float,
        csms: str,
        claimed_id: str = "",
    ) -> Reply:
        return send_command(
            get_redis(), identity, request, timeout=timeout, csms=csms, claimed_id=claimed_id
        )


_link: StationLink = RedisBridge()


@contextmanager
def station_link(link: StationLink) -> Iterator[StationLink]:
    """Send every station_call through ``link`` inside the block (tests: a scripted station)."""
    global _link
    previous, _link = _link, link
    try:
        yield link
    finally:
        _link = previous


def _timestamp(epoch: float | None) -> datetime | None:
    return datetime.fromtimestamp(epoch, UTC) if epoch else None


def station_call(
    migration: StationMigration,
    *,
    step: str,
    request: DataclassInstance,
    via: str = "",
    claimed_id: str = "",
) -> Reply:
    """One OCPP call (an ocpp.v16.call dataclass) for this migration, recorded whatever
    happens; its result is ``reply.result(call_result.<the same action>)``.

    ``via`` names the only CSMS whose gateway may send it; ``claimed_id``, a claimed
    command (ocpp_gateway.client.claim_command) that is published at most once. Raises
    StationOffline when no gateway holds the station, CommandNotSent when the command could
    not be published (nothing reached the station), and other RedisErrors when Redis failed
    after the publish (the station may have received it); each is recorded first.
    """
    action, payload = type(request).__name__, payload_of(request)
    started = time.time()
    try:
        reply = _link.call(
            migration.station.identity,
            request,
            timeout=settings.OCPP_COMMAND_TIMEOUT,
            csms=via,
            claimed_id=claimed_id,
        )
    except (StationOffline, RedisError) as exc:
        if isinstance(exc, StationOffline):
            outcome, why = "offline", "no gateway holds the station"
        elif isinstance(exc, CommandNotSent):
            outcome, why = "not_sent", f"Redis: {exc}"
        else:
            outcome, why = "unknown", f"Redis failed before the publish was confirmed: {exc}"
        record_unanswered(
            migration, step, request, outcome, why, started=started, command_id=claimed_id
        )
        raise
    sent_at = reply.sent_at or started
    finished_at = reply.finished_at or time.time()
    insert_row(
        OcppExchange,
        migration_id=migration.id,
        step=step,
        action=action,
        command_id=reply.command_id,
        csms=reply.csms,
        request=payload,
        outcome=reply.outcome.value,
        sent=reply.sent,
        response=reply.payload,
        error_code=reply.error_code,
        error_description=reply.error_description,
        sent_at=_timestamp(sent_at),
        duration_ms=(finished_at - sent_at) * 1000,
    )
    return reply


def record_taken_back(
    migration: StationMigration, step: str, request: DataclassInstance, command_id: str
) -> None:
    """A claimed command found never to have reached a gateway (its claim taken back): the
    row of its try, if one was kept ("unknown" when Redis failed around the publish), says
    so; otherwise a row of its own does."""
    why = "never reached a gateway: its claim, from an earlier run of this step, was taken back"
    if not OcppExchange.objects.filter(
        migration_id=migration.id, command_id=command_id, outcome="unknown"
    ).update(outcome="not_sent", sent=False, error_description=why):
        record_unanswered(
            migration, step, request, "not_sent", why, started=time.time(), command_id=command_id
        )


def record_unanswered(
    migration: StationMigration,
    step: str,
    request: DataclassInstance,
    outcome: str,
    why: str,
    *,
    started: float,
    command_id: str = "",
) -> None:
    """Record a call that got no reply: "offline" and "not_sent" never reached the station,
    "unknown" may have."""
    insert_row(
        OcppExchange,
        migration_id=migration.id,
        step=step,
        action=type(request).__name__,
        command_id=command_id,
        request=payload_of(request),
        outcome=outcome,
        sent=outcome == "unknown",
        error_description=why,
        sent_at=_timestamp(started),
        duration_ms=(time.time() - started) * 1000,
    )


def describe(reply: Reply) -> str:
    """A short, operator-readable account of a reply that was not what the step needed."""
    if reply.outcome is Outcome.RESULT:
        status = (reply.payload or {}).get("status")
        return f"station answered {status}" if status else "station answered"
    if reply.outcome is Outcome.CALL_ERROR:
        detail = f": {reply.error_description}" if reply.error_description else ""
        return f"station answered CALLERROR {reply.error_code}{detail}"
    if reply.outcome is Outcome.TIMEOUT:
        return f"no answer ({reply.error_description})"
    return f"{reply.outcome.value}: {reply.error_description}"
