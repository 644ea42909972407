"""Who is alive in the stack: workers, the beat, gateways, the broker (all read from Redis).

Workers: a thread in each worker's main process refreshes a short-TTL key, so a worker
killed outright (SIGKILL, a lost machine) is known gone within WORKER_TTL_SECONDS; a live
worker then asks for a recovery, which re-drives the steps the dead worker was running
(each step task keeps its migration in its worker's running set: two Redis writes, no DB
write) and the stations that went quiet, instead of waiting for the step lease. Steps
running on live workers are never re-driven, however long their commands take.

The beat: every tick refreshes a key; its absence is reported (the workers drive batches
themselves, the beat is a safety net).

Gateways: each gateway's relay subscribes ``ocpp:gateway:<csms>:<uuid>``, so one
PUBSUB CHANNELS call tells whether any gateway of a CSMS is up.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from django.conf import settings
from redis import RedisError

from fleet.redis import as_text, get_redis

logger = logging.getLogger(__name__)

WORKER_HEARTBEAT_SECONDS = 2.0
# Three missed heartbeats: a loaded worker is not declared dead for one slow beat.
WORKER_TTL_SECONDS = 6
BEAT_TTL_SECONDS = 10

WORKERS_KEY = "engine:workers"
BEAT_KEY = "engine:beat"
EPOCH_KEY = "engine:epoch"
RECOVER_TASK = "migrations.recover"


def alive_key(hostname: str) -> str:
    return f"engine:worker:{hostname}"


def running_key(hostname: str) -> str:
    """The migrations whose step a worker is running now (a sorted set: id -> start)."""
    return f"engine:running:{hostname}"


def gateway_channels(csms: str) -> str:
    return f"ocpp:gateway:{csms}:*"


# --- reading ---------------------------------------------------------------------------


@dataclass(frozen=True)
class StackHealth:
    broker: bool
    workers: list[str] = field(default_factory=list)
    beat: bool = False
    error: str = ""

    def missing(self) -> list[str]:
        """What is not running, in words an operator can act on."""
        if not self.broker:
            return [f"no broker (Redis unreachable: {self.error})"]
        missing = []
        if not self.workers:
            missing.append("no worker (start: celery -A fleet worker)")
        if not self.beat:
            missing.append("no beat (safety net only: celery -A fleet beat)")
        return missing


def stack_health() -> StackHealth:
    client = get_redis()
    try:
        hosts = sorted(as_text(h) for h in client.smembers(WORKERS_KEY))
        pipe = client.pipeline(transaction=False)
        for host in hosts:
            pipe.exists(alive_key(host))
        pipe.exists(BEAT_KEY)
        *alive, beat = pipe.execute()
    except RedisError as exc:
        return StackHealth(broker=False, error=str(exc))
    return StackHealth(
        broker=True, workers=[h for h, up in zip(hosts, alive, strict=True) if up], beat=bool(beat)
    )


def held_by_live_workers() -> set[int]:
    """The migrations whose step a live worker is running: not to be re-driven."""
    client = get_redis()
    hosts = [as_text(h) for h in client.smembers(WORKERS_KEY)]
    pipe = client.pipeline(transaction=False)
    # No step runs past its hard time limit: an older entry (its removal lost to a Redis
    # error) must not shield a station from the lease for ever.
    since = time.time() - settings.MIGRATION_STEP_HARD_TIME_LIMIT
    for host in hosts:
        pipe.exists(alive_key(host))
        pipe.zrangebyscore(running_key(host), since, "+inf")
    replies = pipe.execute()
    held: set[int] = set()
    for up, members in zip(replies[::2], replies[1::2], strict=True):
        if up:
            held.update(int(member) for member in members)
    return held


# PUBSUB CHANNELS with a pattern walks every channel, one per station held: asked before
# each Reset, a fleet of 10,000 would make Redis walk 10,000 channels a Reset. A gateway
# that stops within this window is no different from one that stops just after the Reset.
GATEWAY_UP_CACHE_SECONDS = 1.0
_gateway_seen_up: dict[str, float] = {}


def gateway_up(csms: str) -> bool:
    """Whether at least one gateway of this CSMS is connected to Redis."""
    now = time.monotonic()
    if now - _gateway_seen_up.get(csms, -GATEWAY_UP_CACHE_SECONDS) < GATEWAY_UP_CACHE_SECONDS:
        return True
    up = bool(get_redis().pubsub_channels(gateway_channels(csms)))
    if up:
        _gateway_seen_up[csms] = now
    else:
        _gateway_seen_up.pop(csms, None)
    return up


def beat_alive() -> None:
    """Called by the beat's tick: the beat is running."""
    get_redis().set(BEAT_KEY, "1", ex=BEAT_TTL_SECONDS)


# --- the worker's side -----------------------------------------------------------------


def steps_started(hostname: str, migration_ids: list[int]) -> None:
    now = time.time()
    get_redis().zadd(running_key(hostname), {str(i): now for i in migration_ids})


def steps_finished(hostname: str, migration_ids: list[int]) -> None:
    try:
        get_redis().zrem(running_key(hostname), *migration_ids)
    except RedisError as exc:  # the entries age out (held_by_live_workers); the steps ran
        logger.warning("could not clear running steps of migrations %s: %s", migration_ids, exc)


def take_running(hostnames: list[str]) -> list[int]:
    """What dead workers were running when they died; their running sets are deleted."""
    client = get_redis()
    pipe = client.pipeline(transaction=True)
    for host in hostnames:
        pipe.zrange(running_key(host), 0, -1)
        pipe.delete(running_key(host))
    replies = pipe.execute()
    return sorted({int(member) for members in replies[::2] for member in members})


def heartbeat(hostname: str) -> None:
    client = get_redis()
    pipe = client.pipeline(transaction=False)
    pipe.set(alive_key(hostname), "1", ex=WORKER_TTL_SECONDS)
    pipe.sadd(WORKERS_KEY, hostname)
    pipe.execute()


def reap_dead_workers() -> list[str]:
    """The workers whose liveness key expired, each claimed by exactly one caller.

    SREM claims a dead worker: when several live workers notice it at once, one of them
    gets it (and asks for a recovery).
    """
    client = get_redis()
    hosts = [as_text(h) for h in client.smembers(WORKERS_KEY)]
    if not hosts:
        return []
    pipe = client.pipeline(transaction=False)
    for host in hosts:
        pipe.exists(alive_key(host))
    dead = [host for host, up in zip(hosts, pipe.execute(), strict=True) if not up]
    return [host for host in dead if client.srem(WORKERS_KEY, host)]


def broker_data_lost() -> bool:
    """True once after Redis came back empty (or on the very first start of a stack).

    Queued and scheduled tasks went with the data: the caller asks for a recovery, which
    re-drives every batch from the database. Only the worker that recreates the marker does.
    """
    return bool(get_redis().set(EPOCH_KEY, "1", nx=True))


def forget_worker(hostname: str) -> None:
    """A clean shutdown: Celery gives its unacknowledged tasks back to the queue itself."""
    client = get_redis()
    pipe = client.pipeline(transaction=False)
    pipe.srem(WORKERS_KEY, hostname)
    pipe.delete(alive_key(hostname), running_key(hostname))
    pipe.execute()


class WorkerHeartbeat(threading.Thread):
    """Runs in a worker's main process: its liveness, and noticing dead peers.

    A dead worker's tasks (running, prefetched, or waiting for their countdown) stay
    unacknowledged in Redis until the visibility timeout: a recovery re-drives its
    stations from the database at once instead.
    """

    def __init__(self, hostname: str, send_task: Callable[..., object]) -> None:
        super().__init__(name="engine-heartbeat", daemon=True)
        self.hostname = hostname
        self.send_task = send_task
        self.stopped = threading.Event()

    def run(self) -> None:
        predecessor = True  # a worker of this name that died leaves its name registered
        while True:
            try:
                if predecessor and get_redis().sismember(WORKERS_KEY, self.hostname):
                    logger.warning("%s died and restarted: re-driving", self.hostname)
                    self._recover([self.hostname])
                predecessor = False
                heartbeat(self.hostname)
                if broker_data_lost():
                    logger.warning("Redis lost its data: re-driving every batch")
                    self._recover([])
                dead = reap_dead_workers()
                if dead:
                    logger.warning("worker(s) %s gone: re-driving their stations", dead)
                    self._recover(dead)
            except Exception as exc:  # a Redis outage: try again on the next beat, never die
                logger.warning("worker heartbeat failed: %s", exc)
            if self.stopped.wait(WORKER_HEARTBEAT_SECONDS):
                return

    def _recover(self, dead: list[str]) -> None:
        self.send_task(RECOVER_TASK, kwargs={"running": take_running(dead) if dead else []})

    def stop(self) -> None:
        self.stopped.set()
        try:
            forget_worker(self.hostname)
        except RedisError:
            logger.warning("could not deregister worker %s", self.hostname, exc_info=True)
