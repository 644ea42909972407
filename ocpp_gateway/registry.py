"""Which stations this gateway admits: the registry the Django side publishes in Redis.

The handshake and the OCPP handlers read the copy in memory; a background loop polls the
small meta hash and reloads the registry when its version changes. A handshake the copy
would refuse looks at Redis first (admits_now): a station registered a moment ago, and reset
at once by a migration, must not be turned away because the copy is one poll behind. Redis
errors and a lost registry (Redis restarted empty) keep the last copy: a gateway never
forgets its stations because Redis did.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from ocpp_gateway.envelopes import REDIS_CALL_TIMEOUT, registry_key, registry_meta_key

logger = logging.getLogger(__name__)

# A lost registry is republished by the Django side; asking more often only adds load.
REPUBLISH_INTERVAL = 30.0


class Admission(StrEnum):
    OPEN = "open"  # any identity (a lab CSMS, or --open)
    REGISTERED = "registered"  # only the identities in the registry
    UNKNOWN = "unknown"  # never loaded: handshakes admitted, boots answered Pending


class BootStatus(StrEnum):
    ACCEPTED = "Accepted"
    PENDING = "Pending"
    REJECTED = "Rejected"


OTHER_HARDWARE = "BootNotification from other hardware"


@dataclass(frozen=True, slots=True)
class Entry:
    serial: str = ""  # "" = any serial
    password_sha256: str = ""  # "" = no password (password_digest format otherwise)


@dataclass(frozen=True, slots=True)
class BootVerdict:
    status: BootStatus
    reason: str = ""


class Registry:
    def __init__(
        self,
        redis: aioredis.Redis,
        csms: str,
        *,
        refresh: float = 2.0,
        open_admission: bool = False,
        request_publish: Callable[[], None] | None = None,
    ) -> None:
        self._redis = redis
        self._csms = csms
        self._refresh = refresh
        self._forced_open = open_admission
        self._request_publish = request_publish
        self._entries: dict[str, Entry] | None = None
        self._open = False
        self._version: str | None = None
        self._last_request = -REPUBLISH_INTERVAL
        self._refreshing: asyncio.Future[None] | None = None
        # None until the first poll: a Redis that is down at start is logged too.
        self.redis_ok: bool | None = None
        self.loaded = asyncio.Event()  # set after the first poll that reached Redis

    # --- what the handshake and the handlers ask (in memory, never Redis) ---------------

    @property
    def admission(self) -> Admission:
        if self._forced_open or self._open:
            return Admission.OPEN
        return Admission.UNKNOWN if self._entries is None else Admission.REGISTERED

    @property
    def registered(self) -> int:
        return len(self._entries or ())

    def entry(self, identity: str) -> Entry | None:
        return (self._entries or {}).get(identity)

    def admits(self, identity: str) -> bool | None:
        """Whether the identity may connect; None while the registry is unknown."""
        admission = self.admission
        if admission is Admission.OPEN:
            return True
        if admission is Admission.UNKNOWN:
            return None
        return identity in (self._entries or {})

    async def admits_now(self, identity: str) -> bool | None:
        """admits(), with a refusal checked against Redis first. Refusals while Redis is
        down come from the copy at once: waiting for a Redis that does not answer would
        only slow them."""
        admits = self.admits(identity)
        if admits is False and self.redis_ok:
            await self._refresh_shared()
            admits = self.admits(identity)
        return admits

    def boot_verdict(
        self, identity: str, serials: tuple[str, ...], *, authenticated: bool
    ) -> BootVerdict:
        """The answer to a BootNotification carrying these serial numbers, from a connection
        whose handshake did or did not prove a password."""
        admits = self.admits(identity)
        if admits is None:
            return BootVerdict(BootStatus.PENDING, f"registry of {self._csms} not loaded yet")
        if not admits:
            return BootVerdict(
                BootStatus.REJECTED, f"station {identity} is not registered on {self._csms}"
            )
        entry = self.entry(identity)
        if entry is not None and entry.password_sha256 and not authenticated:
            # Admitted while the registry was unknown: the password it did not show is due.
            return BootVerdict(
                BootStatus.REJECTED, f"station {identity} must authenticate on {self._csms}"
            )
        if entry is not None and entry.serial and entry.serial not in serials:
            return BootVerdict(BootStatus.REJECTED, OTHER_HARDWARE)
        return BootVerdict(BootStatus.ACCEPTED)

    # --- keeping the copy current ---------------------------------------------------------

    async def run(self) -> None:
        """Poll until cancelled."""
        if self._forced_open:
            logger.info("admission: open (lab)")
        while True:
            await self._refresh_shared()
            await asyncio.sleep(self._refresh)

    async def _refresh_shared(self) -> None:
        """One refresh at a time: a burst of refused handshakes shares the one in flight."""
        if self._refreshing is None:
            self._refreshing = asyncio.ensure_future(self.refresh())
            self._refreshing.add_done_callback(self._refreshed)
        # Shielded: a handshake that gives up must not cancel the others' refresh.
        await asyncio.shield(self._refreshing)

    def _refreshed(self, _: asyncio.Future[None]) -> None:
        self._refreshing = None

    async def refresh(self) -> None:
        try:
            async with asyncio.timeout(REDIS_CALL_TIMEOUT):
                meta = await self._redis.hgetall(registry_meta_key(self._csms))
                # With the publish time: after Redis lost its data the counter starts at 1
                # again, and a gateway already at 1 must still see the new set.
                version = (
                    f"{_text(meta.get(b'version'))}@{_text(meta.get(b'published_at'))}"
                    if meta
                    else None
                )
                if meta and version != self._version:
                    raw = await self._redis.hgetall(registry_key(self._csms))
                    self._load(version, meta, raw)
        except (RedisError, OSError, TimeoutError) as exc:
            if self.redis_ok is not False:
                logger.warning(
                    "registry of %s not refreshed (%s); keeping %s",
                    self._csms,
                    exc,
                    self._describe(),
                )
            self.redis_ok = False
            return
        self.redis_ok = True
        self.loaded.set()
        if not meta:
            self._ask_for_republish()
        else:  # the next loss is asked about at once, however recent the last ask
            self._last_request = -REPUBLISH_INTERVAL

    def _load(
        self,
        version: str | None,
        meta: dict[bytes | str, bytes | str],
        raw: dict[bytes | str, bytes | str],
    ) -> None:
        entries: dict[str, Entry] = {}
        for key, value in raw.items():
            identity = _text(key)
            try:
                data = json.loads(value)
                entries[identity] = Entry(
                    serial=str(data.get("serial") or ""),
                    password_sha256=str(data.get("password_sha256") or ""),
                )
            except (ValueError, AttributeError) as exc:
                # One bad entry must not lock the whole fleet out: refuse only that station.
                logger.error("registry entry of %s is invalid (%s); refusing it", identity, exc)
        self._entries = entries
        self._open = _text(meta.get(b"open")) == "1"
        self._version = version
        logger.info(
            "admission: registry of %s version %s: %s", self._csms, version, self._describe()
        )

    def _describe(self) -> str:
        if self._entries is None:
            return "no registry"
        return f"{len(self._entries)} stations" + (", open" if self._open else "")

    def _ask_for_republish(self) -> None:
        now = time.monotonic()
        if self._request_publish is None or now - self._last_request < REPUBLISH_INTERVAL:
            return
        self._last_request = now
        logger.warning(
            "registry of %s missing in Redis (%s kept); asking for a republish",
            self._csms,
            self._describe(),
        )
        task = asyncio.get_running_loop().run_in_executor(None, self._request_publish)
        task.add_done_callback(_log_failure)


def _log_failure(future: asyncio.Future[None]) -> None:
    if not future.cancelled() and future.exception() is not None:
        logger.warning("could not ask for a registry republish: %s", future.exception())


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else value
