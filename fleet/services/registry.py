"""Publish who may connect to each CSMS for its gateways (admission, ocpp_gateway.envelopes).

The database is the truth; Redis holds a copy per CSMS that a gateway reloads when the meta
hash's version changes. A publish copies one CSMS's whole admitted set (never a diff), so
republishing is always safe and a lost or stale copy is repaired by the next one.

Every change of an admitted set calls ``registry_publish_on_commit``: the publish runs after
the change committed, in the process that made it, so an operator's import reaches the
gateways without waiting for a worker. Changes in one transaction publish once, and bursts
across processes coalesce: each change counts itself, publishers take turns under a lock,
and a publisher whose change was already read by the one before it has nothing to do.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import redis
from django.db import transaction
from redis.exceptions import LockError

from fleet.models import CsmsBackend, Registration
from fleet.redis import get_redis
from ocpp_gateway.envelopes import registry_entry, registry_key, registry_meta_key

logger = logging.getLogger(__name__)

# A publish of even 100,000 stations takes well under this; a publisher that died holding
# the lock blocks the others no longer than this.
_LOCK_SECONDS = 10
# HSET arguments per command inside the transaction: a bounded request size per command.
_HSET_CHUNK = 1000


def _changes_key(csms: str) -> str:
    return f"{registry_meta_key(csms)}:changes"


def _published_key(csms: str) -> str:
    """The change count read before the last publish's database read."""
    return f"{registry_meta_key(csms)}:published"


def _lock_key(csms: str) -> str:
    return f"{registry_meta_key(csms)}:lock"


class _PublishOnCommit:
    """One on-commit callback per transaction, however many changes it holds."""

    def __init__(self) -> None:
        self.names: set[str] = set()
        self.started = False

    def __call__(self) -> None:
        self.started = True
        for name in sorted(self.names):
            # The change itself is committed: a Redis failure must not turn it into an
            # error for the operator or the task. The gateways keep their copy; the next
            # publish (any change, a gateway asking after a data loss, the ingestion's
            # check) repairs it.
            try:
                registry_publish(name=name)
            except redis.RedisError as exc:
                logger.error("registry of CSMS %r not published (Redis: %s)", name, exc)


def registry_publish_on_commit(names: Iterable[str]) -> None:
    """Publish these CSMS once the current transaction commits (at once outside one)."""
    names = set(names)
    if not names:
        return
    connection = transaction.get_connection()
    if connection.in_atomic_block:
        # Join this transaction's pending publish: a loop of changes publishes once. A
        # callback dropped with a rolled-back savepoint is no longer found, so a new one
        # is registered.
        for _savepoints, callback, _robust in connection.run_on_commit:
            if isinstance(callback, _PublishOnCommit) and not callback.started:
                callback.names |= names
                return
    callback = _PublishOnCommit()
    callback.names |= names
    transaction.on_commit(callback)


def registry_publish(*, name: str) -> bool:
    """Publish the admitted set of CSMS ``name``, unless a publish that read the database
    after this call began has been written meanwhile.

    Returns False when there is no such CSMS (logged). Raises redis.RedisError.
    """
    if not CsmsBackend.objects.filter(name=name).exists():
        logger.warning("no CSMS named %r in the inventory: no registry published", name)
        return False
    client = get_redis()
    mine = client.incr(_changes_key(name))
    # Waits at most as long as a dead holder's lock lives.
    lock = client.lock(
        _lock_key(name), timeout=_LOCK_SECONDS, sleep=0.01, blocking_timeout=_LOCK_SECONDS + 1
    )
    if not lock.acquire():
        logger.error("registry of CSMS %r not published: its lock stayed taken", name)
        return True
    try:
        if int(client.get(_published_key(name)) or 0) >= mine:
            return True  # a publisher that came after this change covered it
        seen = int(client.get(_changes_key(name)) or 0)
        _publish_now(client, name)
        client.set(_published_key(name), seen)
    finally:
        try:
            lock.release()
        except LockError:
            logger.warning("registry lock of CSMS %r expired during a publish", name)
    return True


def _publish_now(client: redis.Redis, name: str) -> None:
    """Read the set (inside the lock, after every change that asked for it) and write it."""
    backend = CsmsBackend.objects.filter(name=name).only("id", "open_admission").first()
    if backend is None:
        return  # deleted since registry_publish looked
    entries = {
        identity: registry_entry(serial, password)
        for identity, serial, password in Registration.objects.filter(
            csms=backend, state__in=Registration.ADMITTED_STATES
        ).values_list("station__identity", "serial_number", "password_sha256")
    }
    key, meta = registry_key(name), registry_meta_key(name)
    pending = f"{key}:next"
    pipe = client.pipeline(transaction=True)
    pipe.delete(pending)
    items = list(entries.items())
    for start in range(0, len(items), _HSET_CHUNK):
        pipe.hset(pending, mapping=dict(items[start : start + _HSET_CHUNK]))
    if items:
        pipe.rename(pending, key)
    else:
        pipe.delete(key)
    pipe.hincrby(meta, "version", 1)
    pipe.hset(
        meta,
        mapping={"open": "1" if backend.open_admission else "0", "published_at": f"{time.time()}"},
    )
    pipe.execute()
    logger.info("published the registry of CSMS %r: %d station(s)", name, len(items))


def registry_republish_missing(names: Iterable[str]) -> list[str]:
    """Publish each CSMS whose meta hash is gone (Redis lost its data); return those."""
    ordered = sorted(set(names))
    if not ordered:
        return []
    client = get_redis()
    pipe = client.pipeline(transaction=False)
    for name in ordered:
        pipe.exists(registry_meta_key(name))
    missing = [name for name, exists in zip(ordered, pipe.execute(), strict=True) if not exists]
    if not missing:
        return []
    # Events from a CSMS not in the inventory are dropped (and logged) by the ingestion.
    missing = sorted(CsmsBackend.objects.filter(name__in=missing).values_list("name", flat=True))
    for name in missing:
        logger.info("registry of CSMS %r missing in Redis: republishing", name)
        registry_publish(name=name)
    return missing
