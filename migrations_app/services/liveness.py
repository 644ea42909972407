"""Who is alive in the stack: workers, the beat, gateways, the broker (all read from Redis).

Workers: a thread in each worker's main process refreshes a short-TTL key and records the
migration tasks the worker holds (reserved, running, or waiting for their countdown), so a
worker killed outright (SIGKILL, a lost machine) is known gone within WORKER_TTL_SECONDS and
its tasks are sent again by any live worker, instead of waiting for the step lease. Nothing
is added per step: the record is rewritten on the heartbeat, from the worker's memory.

The beat: every tick refreshes a key; its absence is reported (the workers drive batches
themselves, the beat is a safety net).

Gateways: each gateway's relay subscribes ``ocpp:gateway:<csms>:<uuid>``, so one
PUBSUB CHANNELS call tells whether any gateway of a CSMS is up.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

from redis import RedisError

from fleet.redis import get_redis

logger = logging.getLogger(__name__)

WORKER_HEARTBEAT_SECONDS = 2.0
# Three missed heartbeats: a loaded worker is not declared dead for one slow beat.
WORKER_TTL_SECONDS = 6
BEAT_TTL_SECONDS = 10
# The held-tasks record outlives the worker's liveness key long enough to be reaped.
HELD_TTL_SECONDS = 600

WORKERS_KEY = "engine:workers"
BEAT_KEY = "engine:beat"
EPOCH_KEY = "engine:epoch"
TASK_PREFIX = "migrations."
RECOVER_TASK = "migrations.recover"


def alive_key(hostname: str) -> str:
    return f"engine:worker:{hostname}"


def held_key(hostname: str) -> str:
    return f"engine:held:{hostname}"


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
        hosts = sorted(h.decode() for h in client.smembers(WORKERS_KEY))
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


def gateway_up(csms: str) -> bool:
    """Whether at least one gateway of this CSMS is connected to Redis (one cheap call)."""
    return bool(get_redis().pubsub_channels(gateway_channels(csms)))


def beat_alive() -> None:
    """Called by the beat's tick: the beat is running."""
    get_redis().set(BEAT_KEY, "1", ex=BEAT_TTL_SECONDS)


# --- the worker's side -----------------------------------------------------------------


def held_tasks() -> list[dict[str, Any]]:
    """The migration tasks this worker process holds in memory (main process only)."""
    from celery.worker import state

    for _ in range(3):
        try:
            requests = {
                *state.reserved_requests,
                *state.active_requests,
                *getattr(state, "scheduled_requests", ()),
            }
            break
        except RuntimeError:  # the event loop changed a set while it was copied
            continue
    else:
        return []
    return [
        {"name": r.name, "args": list(r.args)}
        for r in requests
        if r.name and r.name.startswith(TASK_PREFIX)
    ]


def heartbeat(hostname: str, held: list[dict[str, Any]]) -> None:
    client = get_redis()
    pipe = client.pipeline(transaction=False)
    pipe.set(alive_key(hostname), "1", ex=WORKER_TTL_SECONDS)
    pipe.sadd(WORKERS_KEY, hostname)
    pipe.set(held_key(hostname), json.dumps(held), ex=HELD_TTL_SECONDS)
    pipe.execute()


def reap_dead_workers(send_task) -> int:
    """Send again the tasks of every worker whose liveness key expired; returns how many.

    SREM claims a dead worker: when several live workers notice it at once, exactly one
    re-sends its tasks. A re-sent step that finds its station moved on does nothing.
    """
    client = get_redis()
    hosts = [h.decode() for h in client.smembers(WORKERS_KEY)]
    if not hosts:
        return 0
    pipe = client.pipeline(transaction=False)
    for host in hosts:
        pipe.exists(alive_key(host))
    dead = [host for host, up in zip(hosts, pipe.execute(), strict=True) if not up]
    sent = 0
    for host in dead:
        if not client.srem(WORKERS_KEY, host):
            continue  # another worker claimed it
        raw = client.get(held_key(host))
        client.delete(held_key(host))
        tasks = json.loads(raw) if raw else []
        for task in tasks:
            send_task(task["name"], args=task["args"])
        sent += len(tasks)
        logger.warning("worker %s is gone: %d of its migration tasks sent again", host, sent)
    return sent


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
    pipe.delete(alive_key(hostname), held_key(hostname))
    pipe.execute()


class WorkerHeartbeat(threading.Thread):
    """Runs in a worker's main process: liveness, held tasks, and reaping dead peers."""

    def __init__(self, hostname: str, send_task) -> None:
        super().__init__(name="engine-heartbeat", daemon=True)
        self.hostname = hostname
        self.send_task = send_task
        self.stopped = threading.Event()

    def run(self) -> None:
        while True:
            try:
                heartbeat(self.hostname, held_tasks())
                if broker_data_lost():
                    self.send_task(RECOVER_TASK)
                reap_dead_workers(self.send_task)
            except Exception:  # a Redis outage: try again on the next beat, never die
                logger.warning("worker heartbeat failed", exc_info=True)
            if self.stopped.wait(WORKER_HEARTBEAT_SECONDS):
                return

    def stop(self) -> None:
        self.stopped.set()
        try:
            forget_worker(self.hostname)
        except RedisError:
            logger.warning("could not deregister worker %s", self.hostname, exc_info=True)
