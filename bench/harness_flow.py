"""Harness-flow benchmark: many simulated harnesses against one etherd, with a WebSocket
subscriber on every task.

Run from the repository root::

    python -m bench.harness_flow                     # SQLite in a temporary directory
    python -m bench.harness_flow --store pg          # (re)creates etherd_bench on 127.0.0.1
    python -m bench.harness_flow --store postgresql://postgres@127.0.0.1:5432/etherd_bench
    python -m bench.harness_flow --store pg --py-spy profile.txt   # profile the server

What it does
------------
1. Starts ``python -m etherd serve`` pinned with ``taskset -c {--server-cpu}`` (default core
   0), on a fresh SQLite file or the PostgreSQL database given. ``--store pg`` drops and
   recreates ``etherd_bench`` on the PostgreSQL server at 127.0.0.1:5432 (trust auth).
2. Pins itself to ``--client-cpu`` (default core 1) and runs ``--harnesses`` simulated
   harnesses on uvloop. Each has its own user (the task owner), its own harness token, two
   keep-alive HTTP connections (one for the product API, one for the harness API) and one
   WebSocket (picows) that subscribes to each of its tasks. Per task: ``POST /api/tasks``,
   subscribe to ``tasks/{id}``, claim, ``--steps`` steps through the bundle's
   ``report_step_url`` (each waits for its answer, as a harness does), result
   ``submitted``, then wait for ``task.delivered`` on the subscription.
3. Every step's ``user_message`` is ``time.monotonic_ns()`` taken just before the POST is
   written; the subscriber takes ``monotonic_ns()`` when the frame is handed to it, so
   step-to-subscriber latency covers the request, the group commit and the fan-out.
4. One warm-up task per harness runs first and is not measured. Then ``--tasks`` tasks per
   harness run measured, and the benchmark reports: steps/s (all steps over the measured
   window, and over its middle 80 % where every harness is busy), step-to-subscriber and
   step-answer latency percentiles, database time from ``/metrics``
   (``etherd_store_commit_duration_seconds``: sum, count, rows per commit, share of the
   window), server CPU (``/proc/PID/stat``, % of one core, us per step), this process's
   CPU (a saturated client would distort latency), and CPU used by other processes on the
   machine during the window (a shared machine makes percentiles noisy).
5. ``--py-spy FILE`` records the server with ``py-spy record --format raw`` over the
   measured window and prints the top functions by own time and by total time.

Target (issue 4): on PostgreSQL at least 5,000 steps/s with step-to-subscriber p99 at most
15 ms. The summary says whether this run met it. ``--json FILE`` appends the figures as
one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import jwt
import msgspec
import uvloop
from picows import ws_connect

from bench.common import pg
from bench.common.cli import add_output, add_placement, add_py_spy
from bench.common.cpu import all_procs, cpu_times, named_cpu_s, pin, proc_cpu_s, wait_quiet
from bench.common.histogram import pct
from bench.common.http import AwaitableConn, post
from bench.common.machine import machine_info
from bench.common.metrics import commit_figures, handler_mean_ms, scrape
from bench.common.profile import start_py_spy, summarize_profile
from bench.common.server import ServerProcess, start_etherd
from bench.common.ws import TextListener

SECRET: Final = "harness-flow-bench-secret-long-enough-for-hs256"
APP: Final = "bench"
PG_DATABASE: Final = "etherd_bench"
TARGET_STEPS_PER_S: Final = 5_000
TARGET_P99_MS: Final = 15.0
STEP_PREFIX: Final = b'{"type":"os.harness.step"'
DELIVERED_PREFIX: Final = b'{"type":"task.delivered"'
SUBSCRIBED_PREFIX: Final = b'{"type":"subscribed"'
MESSAGE_MARK: Final = b'"user_message":"'


# -- tokens --------------------------------------------------------------------------------


def token(sub: str, role: str) -> str:
    return jwt.encode(
        {"sub": sub, "role": role, "exp": int(time.time()) + 24 * 3600}, SECRET, algorithm="HS256"
    )


# -- the server ----------------------------------------------------------------------------


def start_server(store: str, cpu: int, workdir: Path, harnesses: int) -> ServerProcess:
    """etherd with HS256 tokens (no dev auth) and a long lease, on ``store``."""
    return start_etherd(
        cpu=cpu,
        store=store,
        workdir=workdir,
        settings={
            "auth": {"secret": SECRET, "dev": False},
            "tasks": {"lease_s": 600.0},
            "ws": {"max_connections_per_subject": max(10_000, harnesses * 2)},
        },
    )


def machine_busy_s() -> float:
    """Busy CPU seconds of the whole machine: processes plus irq and softirq.

    Interrupt time is included because a process's own system time may contain the
    softirq work done in its context (loopback TCP), which /proc/stat books as softirq.
    """
    total = cpu_times()["cpu"]
    return total.task + total.irq


# -- clients -------------------------------------------------------------------------------


class Http(AwaitableConn):
    """One keep-alive connection of a harness, one request at a time."""

    async def post(self, path: bytes, body: bytes, headers: bytes) -> tuple[int, bytes]:
        return await self.request(post(path, body, token=None, headers=headers))


class Created(msgspec.Struct):
    id: str


class Callbacks(msgspec.Struct):
    report_step_url: str
    result_url: str


class Bundle(msgspec.Struct):
    callbacks: Callbacks


class Claimed(msgspec.Struct):
    run_id: str
    bundle: Bundle


class Reply(msgspec.Struct):
    type: str
    id: str | None = None
    task_id: str | None = None


REPLY: Final = msgspec.json.Decoder(Reply)
CREATED: Final = msgspec.json.Decoder(Created)
CLAIMED: Final = msgspec.json.Decoder(Claimed)


@dataclass
class Tally:
    """What the whole client measured."""

    measuring: bool = False
    # Harnesses that finished their warm-up task.
    warmed: int = 0
    step_to_sub_ns: list[int] = field(default_factory=list)
    step_answer_ns: list[int] = field(default_factory=list)
    step_done_at: list[int] = field(default_factory=list)
    frames: int = 0
    errors: Counter[str] = field(default_factory=Counter)


class Subscriber(TextListener):
    """A frontend's WebSocket: subscribes to tasks and times every step it receives."""

    def __init__(self, tally: Tally) -> None:
        super().__init__()
        self.tally = tally
        self.waiting: dict[str, asyncio.Future[None]] = {}

    def on_text(self, raw: bytes, now: int) -> None:
        self.tally.frames += 1
        if raw.startswith(STEP_PREFIX):
            if self.tally.measuring:
                at = raw.find(MESSAGE_MARK) + len(MESSAGE_MARK)
                sent = int(raw[at : raw.index(b'"', at)])
                self.tally.step_to_sub_ns.append(now - sent)
        elif raw.startswith(DELIVERED_PREFIX):
            self._resolve("delivered:" + (REPLY.decode(raw).task_id or ""))
        elif raw.startswith(SUBSCRIBED_PREFIX):
            self._resolve("subscribed:" + (REPLY.decode(raw).id or ""))

    def _resolve(self, key: str) -> None:
        waiter = self.waiting.pop(key, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def expect(self, key: str) -> asyncio.Future[None]:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiting[key] = waiter
        return waiter

    async def follow(self, topic: str, rid: str) -> None:
        """Subscribe to ``topic`` and wait for the reply."""
        done = self.expect("subscribed:" + rid)
        self.subscribe([topic], rid)
        await asyncio.wait_for(done, 30)


async def harness(
    i: int, port: int, tasks: int, steps: int, tally: Tally, start: asyncio.Event
) -> None:
    """One simulated harness (and the frontend of the user it works for)."""
    user_auth = b"Authorization: Bearer %s\r\n" % token(f"user{i}", "user").encode()
    harness_auth = b"Authorization: Bearer %s\r\nX-Ether-Harness-App: %s\r\n" % (
        token(f"harness{i}", "harness").encode(),
        APP.encode(),
    )
    product, runner = await Http.open(port), await Http.open(port)
    url = f"ws://127.0.0.1:{port}/api/realtime?token={token(f'user{i}', 'user')}"
    _, sub = await ws_connect(lambda: Subscriber(tally), url)
    assert isinstance(sub, Subscriber)
    try:
        await run_task(i, product, runner, sub, user_auth, harness_auth, steps, tally, False)
        tally.warmed += 1
        await start.wait()
        for _ in range(tasks):
            await run_task(i, product, runner, sub, user_auth, harness_auth, steps, tally, True)
    finally:
        product.close()
        runner.close()
        if sub.transport is not None:
            sub.transport.disconnect()


async def run_task(
    i: int,
    product: Http,
    runner: Http,
    sub: Subscriber,
    user_auth: bytes,
    harness_auth: bytes,
    steps: int,
    tally: Tally,
    measured: bool,
) -> None:
    status, body = await product.post(
        b"/api/tasks", b'{"prompt":"Fix the checkout bug for harness %d"}' % i, user_auth
    )
    if status != 201:
        tally.errors[f"create {status}"] += 1
        return
    task_id = CREATED.decode(body).id
    topic = f"tasks/{task_id}"
    await sub.follow(topic, task_id)
    status, body = await runner.post(
        b"/api/harness/tasks/%s/claim" % task_id.encode(), b'{"app_id":"bench"}', harness_auth
    )
    if status != 200:
        tally.errors[f"claim {status}"] += 1
        return
    claimed = CLAIMED.decode(body)
    run = claimed.run_id.encode()
    # The bundle's callback URLs, as a harness must use them (path part: same server).
    step_path = urlsplit(claimed.bundle.callbacks.report_step_url).path.encode()
    result_path = urlsplit(claimed.bundle.callbacks.result_url).path.encode()
    for _ in range(steps):
        sent = time.monotonic_ns()
        body = (
            b'{"run_id":"%s","phase":"coding_agent","user_message":"%d",'
            b'"internal_label":"bench"}' % (run, sent)
        )
        status, _ = await runner.post(step_path, body, harness_auth)
        done = time.monotonic_ns()
        if status != 200:
            tally.errors[f"step {status}"] += 1
            continue
        if measured:
            tally.step_answer_ns.append(done - sent)
            tally.step_done_at.append(done)
    delivered = sub.expect("delivered:" + task_id)
    status, body = await runner.post(
        result_path,
        b'{"run_id":"%s","status":"submitted","agent_status":"Opened PR #%d",'
        b'"artifact":{"pr":{"number":%d,"branch":"ether/bench","url":"https://example.invalid/pr/%d"}},'
        b'"working_summary":"bench"}' % (run, i, i, i),
        harness_auth,
    )
    if status != 200:
        tally.errors[f"result {status}"] += 1
        sub.waiting.pop("delivered:" + task_id, None)
        return
    try:
        await asyncio.wait_for(delivered, 30)
    except TimeoutError:
        tally.errors["delivered timeout"] += 1
    sub.unsubscribe([topic])


# -- the run -------------------------------------------------------------------------------


async def drive(args: argparse.Namespace, server: ServerProcess, tally: Tally) -> dict[str, Any]:
    start = asyncio.Event()
    admin = token("bench-admin", "admin")
    workers = [
        asyncio.create_task(harness(i, server.port, args.tasks, args.steps, tally, start))
        for i in range(args.harnesses)
    ]
    # Warm-up: one task per harness, not measured. Wait until every harness finished it.
    while tally.warmed < args.harnesses:
        failed = [w for w in workers if w.done() and w.exception() is not None]
        if failed:
            raise RuntimeError("a harness failed during warm-up") from failed[0].exception()
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)
    m0 = scrape(server.port, admin)
    cpu0, own0, busy0 = proc_cpu_s(server.pid), time.process_time(), machine_busy_s()
    pg0 = named_cpu_s(all_procs(), "postgres")
    spy = None
    if args.py_spy:
        spy = start_py_spy(
            server.pid, args.py_spy, rate=args.py_spy_rate, native=args.py_spy_native
        )
    t0 = time.monotonic_ns()
    tally.measuring = True
    start.set()
    await asyncio.gather(*workers)
    t1 = time.monotonic_ns()
    tally.measuring = False
    cpu1, own1, busy1 = proc_cpu_s(server.pid), time.process_time(), machine_busy_s()
    pg_cpu = named_cpu_s(all_procs(), "postgres") - pg0
    if spy is not None:
        spy.send_signal(2)  # SIGINT: py-spy writes the profile and exits
        spy.wait(30)
    m1 = scrape(server.port, admin)
    elapsed = (t1 - t0) / 1e9
    n = len(tally.step_done_at)
    done = sorted(tally.step_done_at)
    lo, hi = done[int(0.1 * n)] if n else t0, done[int(0.9 * n) - 1] if n else t1
    middle = (0.8 * n) / ((hi - lo) / 1e9) if n and hi > lo else math.nan

    server_cpu = cpu1 - cpu0
    own_cpu = own1 - own0
    others = (busy1 - busy0) - server_cpu - own_cpu - pg_cpu
    return {
        "harnesses": args.harnesses,
        "tasks_per_harness": args.tasks,
        "steps_per_task": args.steps,
        "steps": n,
        "elapsed_s": round(elapsed, 3),
        "steps_per_s": round(n / elapsed, 1),
        "steps_per_s_middle80": round(middle, 1),
        "step_to_subscriber_ms": {
            "p50": round(pct(tally.step_to_sub_ns, 0.5), 2),
            "p90": round(pct(tally.step_to_sub_ns, 0.9), 2),
            "p99": round(pct(tally.step_to_sub_ns, 0.99), 2),
            "max": round(pct(tally.step_to_sub_ns, 1.0), 2),
            "count": len(tally.step_to_sub_ns),
        },
        "step_answer_ms": {
            "p50": round(pct(tally.step_answer_ns, 0.5), 2),
            "p99": round(pct(tally.step_answer_ns, 0.99), 2),
        },
        "server_step_handler_ms_mean": handler_mean_ms(m0, m1, "/api/harness/tasks/{id}/steps"),
        "db": commit_figures(m0, m1, elapsed),
        "server_cpu_pct": round(100 * server_cpu / elapsed, 1),
        "server_cpu_us_per_step": round(1e6 * server_cpu / n, 1) if n else None,
        "client_cpu_pct": round(100 * own_cpu / elapsed, 1),
        "postgres_cpu_pct": round(100 * pg_cpu / elapsed, 1),
        "other_processes_cpu_pct": round(100 * others / elapsed, 1),
        # Every measured step must reach its subscriber exactly once.
        "step_events_missing": n - len(tally.step_to_sub_ns),
        "errors": dict(tally.errors),
    }


def report(result: dict[str, Any]) -> str:
    lat = result["step_to_subscriber_ms"]
    db = result["db"]
    lines = [
        f"store              {result['store_kind']}",
        f"harnesses          {result['harnesses']} x {result['tasks_per_harness']} tasks "
        f"x {result['steps_per_task']} steps = {result['steps']} steps "
        f"in {result['elapsed_s']} s",
        f"steps/s            {result['steps_per_s']} (middle 80 %: "
        f"{result['steps_per_s_middle80']})",
        f"step->subscriber   p50 {lat['p50']} ms  p90 {lat['p90']} ms  p99 {lat['p99']} ms  "
        f"max {lat['max']} ms  ({lat['count']} samples)",
        f"step answer        p50 {result['step_answer_ms']['p50']} ms  "
        f"p99 {result['step_answer_ms']['p99']} ms; server handler mean "
        f"{result['server_step_handler_ms_mean']} ms",
        f"database           {db['commit_s']} s in {db['commits']} commits "
        f"({db['mean_commit_ms']} ms each, {db['rows_per_commit']} events each), "
        f"{db['busy_pct_of_window']} % of the window",
        f"server CPU         {result['server_cpu_pct']} % of one core, "
        f"{result['server_cpu_us_per_step']} us per step (all requests and fan-out included)",
        f"client CPU         {result['client_cpu_pct']} % of one core",
        f"PostgreSQL CPU     {result['postgres_cpu_pct']} % of one core (all its processes)",
        f"other processes    {result['other_processes_cpu_pct']} % of one core",
        f"errors             {result['errors'] or 'none'}; step events missing or extra: "
        f"{result['step_events_missing']}",
    ]
    target = result.get("target")
    if target is not None:
        lines.append(
            f"target             >= {TARGET_STEPS_PER_S} steps/s and p99 <= {TARGET_P99_MS} ms: "
            + ("MET" if target else "NOT MET")
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", default="sqlite", help="sqlite, pg, or a postgresql:// URL")
    parser.add_argument("--harnesses", type=int, default=200)
    parser.add_argument("--tasks", type=int, default=3, help="measured tasks per harness")
    parser.add_argument("--steps", type=int, default=40, help="steps per task")
    add_placement(parser)
    add_py_spy(parser)
    add_output(parser, "the figures as one JSON line")
    parser.add_argument(
        "--quiet-pct",
        type=float,
        default=30.0,
        help="wait (up to --quiet-timeout s) until other processes use less than this",
    )
    parser.add_argument("--quiet-timeout", type=float, default=60.0)
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="etherd-harness-flow-"))
    if args.store == "sqlite":
        store, kind = f"sqlite:///{workdir / 'etherd.db'}", "sqlite"
    elif args.store == "pg":
        store, kind = pg.fresh_database(pg.LOCAL_SERVER, PG_DATABASE), "postgresql"
    else:
        store = args.store
        kind = "postgresql" if store.startswith("postgres") else "sqlite"

    pin(args.client_cpu)
    try:
        server = start_server(store, args.server_cpu, workdir, args.harnesses)
        try:
            quiet = wait_quiet(args.quiet_pct, args.quiet_timeout, [server.pid, os.getpid()])
            result = uvloop.run(drive(args, server, Tally()))
        finally:
            server.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result["store_kind"] = kind
    result["label"] = args.label
    result["other_processes_cpu_pct_before"] = quiet.others_pct
    result["versions"] = machine_info()
    if kind == "postgresql":
        result["versions"]["postgresql"] = pg.version(store)
    result["when"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if kind == "postgresql":
        lat = result["step_to_subscriber_ms"]
        result["target"] = (
            result["steps_per_s"] >= TARGET_STEPS_PER_S and lat["p99"] <= TARGET_P99_MS
        )
    print(report(result))
    print("versions           " + json.dumps(result["versions"]))
    if args.py_spy and args.py_spy.exists():
        print()
        print(summarize_profile(args.py_spy))
    if args.json:
        with args.json.open("a") as f:
            f.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
