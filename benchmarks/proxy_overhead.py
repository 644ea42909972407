"""Proxy overhead: what `python -m ocpp_gateway --upstream` adds to a station's round trip.

Processes, all on 127.0.0.1 and free ports:

- an upstream CSMS: a bare ``websockets`` server process (uvloop, no compression) that
  answers every OCPP-J CALL at once with a CALLRESULT (BootNotification: Accepted), the same
  for both paths, so the difference between them is the proxy;
- the gateway in proxy mode: ``python -m ocpp_gateway --csms bench --open --upstream UPSTREAM``
  with a private ``redis-server`` (its command bridge and events);
- N station clients: raw ``websockets`` OCPP-J clients (subprotocol ocpp1.6) in one separate
  process, each a BootNotification first, then Heartbeat CALLs.

The client process holds N stations connected **direct** to the upstream and N connected
**through the proxy** at the same time, and measures round trips (send the CALL → its
CALLRESULT) at a fixed offered rate (``--rates``, round trips/s over the N stations, each
station with at most one CALL outstanding) on both sets at once, interleaved round trip by
round trip in the same windows (``--windows`` of ``--seconds`` each), so both paths see the
same machine load. Added latency = proxied percentile - direct percentile. CPU per relayed
frame = the gateway process's user+system CPU (``/proc``) over the windows / the frames it
relayed (a CALL and its CALLRESULT per proxied round trip); the gateway's idle CPU over a
window of the same length is measured too and given apart; the upstream's CPU per round
trip (both paths) is the yardstick.

Memory per proxied station: the gateway's VmRSS after a warm-up of 20 proxied stations and
again with N more connected (each holds two sockets: the station's and its upstream link),
the difference over N. At the large size (``--big``) only the proxied stations are held:
the machine's hard open-file limit (20,000 here, not raisable) must cover the gateway's two
sockets per station, so the large size is capped at (limit - 200) / 2.

    python benchmarks/proxy_overhead.py [--stations 1000] [--big 10000] [--rates 200,1000]

Targets (issue 8): <= 2 ms added p99 at 1,000 stations; <= 50 KiB per proxied station.
"""

from __future__ import annotations

import argparse
import json
import queue
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._stack import (
    Stack,
    cpu_seconds,
    gateway_stations,
    print_results,
    raise_open_file_limit,
    ratio,
    rss_kib,
    run_dir,
)
from devstack.processes import free_port, port_open, python, stop, wait_until

WARMUP = 20

UPSTREAM = """\
import asyncio, json, sys
from datetime import datetime, timezone
from websockets.asyncio.server import serve

BOOT = {"status": "Accepted", "interval": 300}

async def answer(ws):
    async for message in ws:
        frame = json.loads(message)
        if frame[0] != 2:
            continue
        now = datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")
        payload = {**BOOT, "currentTime": now} if frame[2] == "BootNotification" else {
            "currentTime": now}
        await ws.send(json.dumps([3, frame[1], payload]))

async def main(port):
    async with serve(answer, "127.0.0.1", port, subprotocols=["ocpp1.6"], compression=None,
                     ping_interval=None, max_queue=8, backlog=4096):
        await asyncio.Future()

try:
    from uvloop import run
except ImportError:
    from asyncio import run
run(main(int(sys.argv[1])))
"""

# Commands on stdin, one JSON object per line; one JSON line per command on stdout.
CLIENT = """\
import asyncio, itertools, json, sys, time
from websockets.asyncio.client import connect

BOOT = {"chargePointVendor": "BenchVendor", "chargePointModel": "BenchModel",
        "firmwareVersion": "1.0"}
sets = {}
ids = itertools.count()

def out(**fields):
    sys.stdout.write(json.dumps(fields) + "\\n")
    sys.stdout.flush()

async def round_trip(ws, action, payload):
    message_id = str(next(ids))
    started = time.perf_counter_ns()
    await ws.send(json.dumps([2, message_id, action, payload]))
    async with asyncio.timeout(10):
        while True:
            frame = json.loads(await ws.recv())
            if frame[0] == 3 and frame[1] == message_id:
                return (time.perf_counter_ns() - started) // 1000
            if frame[0] == 2:  # a CALL from the CSMS: answer it, keep waiting
                await ws.send(json.dumps([4, frame[1], "NotImplemented", "", {}]))

async def open_set(name, url, count, prefix):
    gate, held, failed = asyncio.Semaphore(100), [], []

    async def one(i):
        async with gate:
            try:
                ws = await connect(f"{url}/{prefix}{i:05d}", subprotocols=["ocpp1.6"],
                                   compression=None, ping_interval=None, max_queue=8,
                                   proxy=None, open_timeout=30)
                await round_trip(ws, "BootNotification", BOOT)
                held.append(ws)
            except Exception as exc:
                failed.append(repr(exc))

    started = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(count)))
    sets[name] = held
    out(event="connected", name=name, count=len(held), failed=len(failed),
        errors=failed[:3], seconds=round(time.monotonic() - started, 2))

# rate round trips/s on each named set, interleaved in one window: the sets share whatever
# the machine does meanwhile.
async def measure(names, rate, seconds):
    idle = {name: list(sets[name]) for name in names}
    samples = {name: [] for name in names}
    busy_skips, errors = 0, []
    tasks = set()

    async def one(name, ws):
        try:
            samples[name].append(await round_trip(ws, "Heartbeat", {}))
        except Exception as exc:
            errors.append(repr(exc))
        finally:
            idle[name].append(ws)

    tick = 0.005
    per_tick = rate * tick
    credit = 0.0
    start = time.perf_counter()
    deadline = start + seconds
    next_tick = start
    order = list(names)
    while time.perf_counter() < deadline:
        credit += per_tick
        while credit >= 1:
            credit -= 1
            order.reverse()  # neither set always goes first
            for name in order:
                if not idle[name]:
                    busy_skips += 1
                    continue
                task = asyncio.create_task(one(name, idle[name].pop(0)))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        next_tick += tick
        await asyncio.sleep(max(0.0, next_tick - time.perf_counter()))
    if tasks:
        await asyncio.wait(tasks, timeout=15)
    out(event="measured", samples=samples, errors=len(errors), error_examples=errors[:3],
        busy_skips=busy_skips, seconds=round(time.perf_counter() - start, 3))

async def close_set(name):
    held = sets.pop(name, [])
    await asyncio.gather(*(ws.close() for ws in held), return_exceptions=True)
    out(event="closed", name=name, count=len(held))

async def main():
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            return
        command = json.loads(line)
        kind = command.pop("command")
        if kind == "quit":
            out(event="bye")
            return
        try:
            await {"open": open_set, "measure": measure, "close": close_set}[kind](**command)
        except Exception as exc:
            out(event="error", command=kind, error=repr(exc))

try:
    from uvloop import run
except ImportError:
    from asyncio import run
run(main())
"""


class Client:
    """The station clients' process, driven line by line; every answer awaited with a bound."""

    def __init__(self, log: Path) -> None:
        self._log = log.open("ab")
        self.proc = subprocess.Popen(
            python("-c", CLIENT),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            start_new_session=True,
        )
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)

    def ask(self, timeout: float, **command: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        try:
            return json.loads(self._lines.get(timeout=timeout))
        except queue.Empty:
            raise TimeoutError(f"the client did not answer {command} within {timeout}s") from None

    def close(self) -> None:
        stop(self.proc)
        self._log.close()


def percentile(values: list[int], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return float(ordered[index])


def latency_summary(samples: list[int]) -> dict[str, float]:
    """Round-trip percentiles in milliseconds."""
    return {
        "n": len(samples),
        "p50_ms": round(percentile(samples, 50) / 1000, 3),
        "p90_ms": round(percentile(samples, 90) / 1000, 3),
        "p99_ms": round(percentile(samples, 99) / 1000, 3),
        "max_ms": round(max(samples, default=0) / 1000, 3),
    }


def start_upstream(stack: Stack) -> str:
    port = free_port()
    stack.start("upstream", python("-c", UPSTREAM, str(port)))
    wait_until(lambda: port_open(port), 15, "the upstream CSMS to listen")
    return f"ws://127.0.0.1:{port}/ocpp"


def start_proxy(stack: Stack, upstream: str) -> tuple[str, int, subprocess.Popen]:
    port = free_port()
    args = python(
        *("-m", "ocpp_gateway", "--csms", "bench", "--open", "--port", str(port)),
        *("--upstream", upstream, "--log-level", "WARNING"),
    )
    proc = stack.start("gateway", args)
    wait_until(lambda: gateway_stations(port) >= 0, 20, "the proxy to answer /health")
    return f"ws://127.0.0.1:{port}/ocpp", port, proc


def open_set(client: Client, name: str, url: str, count: int, prefix: str) -> dict[str, Any]:
    answer = client.ask(60 + count / 50, command="open", name=name, url=url, count=count,
                        prefix=prefix)  # fmt: skip
    if answer.get("count") != count:
        raise RuntimeError(f"only {answer.get('count')} of {count} {name} stations: {answer}")
    return answer


def measure_latency(
    client: Client, gateway_session: int, upstream_session: int, rate: int, args: argparse.Namespace
) -> dict[str, Any]:
    samples: dict[str, list[int]] = {"direct": [], "proxy": []}
    gateway_cpu = upstream_cpu = seconds = 0.0
    problems = {"errors": 0, "busy_skips": 0}
    for _ in range(args.windows):
        gateway_before = cpu_seconds(gateway_session)
        upstream_before = cpu_seconds(upstream_session)
        answer = client.ask(
            args.seconds + 30, command="measure", names=list(samples), rate=rate,
            seconds=args.seconds,
        )  # fmt: skip
        gateway_cpu += cpu_seconds(gateway_session) - gateway_before
        upstream_cpu += cpu_seconds(upstream_session) - upstream_before
        seconds += answer["seconds"]
        for name in samples:
            samples[name] += answer["samples"][name]
        problems["errors"] += answer["errors"]
        problems["busy_skips"] += answer["busy_skips"]
        if answer["errors"]:
            print(f"  {answer['errors']} errors, e.g. {answer['error_examples']}")
    # The gateway's cost with nobody sending (keepalive pings, its Redis loops), as long.
    idle_before = cpu_seconds(gateway_session)
    time.sleep(seconds / args.windows)
    idle_per_second = (cpu_seconds(gateway_session) - idle_before) / (seconds / args.windows)
    direct, proxied = latency_summary(samples["direct"]), latency_summary(samples["proxy"])
    # The gateway carries only the proxied round trips: a CALL and its CALLRESULT each.
    frames = 2 * proxied["n"]
    busy_cpu = gateway_cpu - idle_per_second * seconds
    round_trips = direct["n"] + proxied["n"]
    return {
        "rate": rate,
        "direct": direct,
        "proxy": proxied,
        "added_p50_ms": round(proxied["p50_ms"] - direct["p50_ms"], 3),
        "added_p99_ms": round(proxied["p99_ms"] - direct["p99_ms"], 3),
        "gateway_cpu_us_per_frame": round(1e6 * gateway_cpu / frames, 1) if frames else None,
        "gateway_cpu_us_per_frame_over_idle": round(1e6 * busy_cpu / frames, 1) if frames else None,
        "gateway_idle_cpu_percent": round(100 * idle_per_second, 2),
        # The yardstick: what the upstream itself spends on a round trip (both paths).
        "upstream_cpu_us_per_round_trip": (
            round(1e6 * upstream_cpu / round_trips, 1) if round_trips else None
        ),
        **problems,
    }


def proxied_memory(
    client: Client, gateway: subprocess.Popen, port: int, url: str, n: int, name: str,
    prefix: str, settle: float,
) -> dict[str, Any]:  # fmt: skip
    """KiB of gateway RSS per proxied station: N more stations after the warm-up ones."""
    before_count = gateway_stations(port)
    time.sleep(settle)
    rss_before = rss_kib(gateway.pid)
    answer = open_set(client, name, url, n, prefix)
    wait_until(lambda: gateway_stations(port) >= before_count + n, 60, f"the proxy to hold {n}")
    time.sleep(settle)
    rss_after = rss_kib(gateway.pid)
    return {
        "stations": n,
        "connect_seconds": answer["seconds"],
        "rss_before_mib": round(rss_before / 1024, 1),
        "rss_after_mib": round(rss_after / 1024, 1),
        "kib_per_station": round((rss_after - rss_before) / n, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stations", type=int, default=1000, help="latency and memory size")
    parser.add_argument("--big", type=int, default=10000, help="second memory size (0: skip)")
    parser.add_argument("--rates", default="200,1000", help="offered round trips/s, comma list")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of one window")
    parser.add_argument("--windows", type=int, default=2, help="direct/proxy window pairs")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds before each RSS read")
    parser.add_argument("--keep", action="store_true", help="keep the logs")
    args = parser.parse_args()
    rates = [int(rate) for rate in args.rates.split(",") if rate]
    raise_open_file_limit()  # the children inherit it: one fd per socket
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    big_cap = (hard - 200) // 2 if hard != resource.RLIM_INFINITY else args.big
    big = min(args.big, big_cap)
    results: dict[str, Any] = {"benchmark": "proxy_overhead", "open_file_hard_limit": hard}

    with run_dir(args.keep) as workdir, Stack(workdir, "proxy") as stack:
        stack.redis()
        upstream = start_upstream(stack)
        url, port, gateway = start_proxy(stack, upstream)
        session = gateway.pid  # it leads its own session
        upstream_session = stack.procs["upstream"].pid
        client = Client(stack.log("client"))
        try:
            open_set(client, "warmup", url, WARMUP, "WARM-")
            memory = [proxied_memory(client, gateway, port, url, args.stations, "proxy",
                                     "PX-", args.settle)]  # fmt: skip
            open_set(client, "direct", upstream, args.stations, "DX-")
            client.ask(30, command="measure", names=["direct", "proxy"], rate=200, seconds=1)
            latency = [
                measure_latency(client, session, upstream_session, rate, args) for rate in rates
            ]
            client.ask(60, command="close", name="direct")
            client.ask(60, command="close", name="proxy")
            if big > args.stations:
                wait_until(lambda: gateway_stations(port) <= WARMUP, 60, "the proxy to let go")
                memory.append(
                    proxied_memory(client, gateway, port, url, big, "big", "BIG-", args.settle)
                )
            client.ask(10, command="quit")
        finally:
            client.close()

    results.update(stations=args.stations, latency=latency, memory=memory)
    rows: list[tuple[str, Any]] = []
    for run in latency:
        rate, direct, proxied = run["rate"], run["direct"], run["proxy"]
        rows += [
            (f"{rate}/s direct p50 / p99 ms", f"{direct['p50_ms']} / {direct['p99_ms']}"),
            (f"{rate}/s proxy p50 / p99 ms", f"{proxied['p50_ms']} / {proxied['p99_ms']}"),
            (f"{rate}/s added p50 / p99 ms", f"{run['added_p50_ms']} / {run['added_p99_ms']}"),
            (
                f"{rate}/s gateway CPU us/frame (over idle)",
                f"{run['gateway_cpu_us_per_frame']} ({run['gateway_cpu_us_per_frame_over_idle']})",
            ),
        ]
    for size in memory:
        rows.append((f"{size['stations']} proxied: KiB/station", size["kib_per_station"]))
    first = latency[0] if latency else {}
    results["added_p99_ms_at_first_rate"] = first.get("added_p99_ms")
    results["proxy_over_direct_p99"] = ratio(
        first.get("proxy", {}).get("p99_ms", 0), first.get("direct", {}).get("p99_ms", 0)
    )
    print_results("proxy overhead", rows, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
