"""Durable publish benchmark: throughput and latency of ``POST /api/publish`` on both stores.

Run from the repository root::

    python -m bench.publish --stores sqlite pg --scenarios batch single latency \\
        --json bench/results/publish-runs.jsonl

Scenarios (each on a freshly started server and a fresh database):

``batch``
    Sustained durable throughput through batch publishes: ``--batch-conns`` keep-alive
    connections, each sending ``{"events": [...]}`` with ``--batch-size`` events and waiting
    for the answer before sending the next one (closed loop). Reports events/s (client
    count and the server's ``etherd_store_rows`` agree), request latency, and the batch
    sizes the group commit chose (``etherd_store_batch_rows`` histogram from ``/metrics``).
    Target: at least 100,000 durable events/s into PostgreSQL.
``single``
    Single-event durable publishes from ``--single-conns`` keep-alive connections spread
    over ``--single-procs`` client processes, one request in flight per connection (no
    pipelining), closed loop. Reports publishes/s and request latency p50/p99, and the
    group-commit batch sizes. Target: at least 20,000 publishes/s.
``latency``
    Publish-to-delivery latency: ``--subscribers`` WebSocket subscribers (picows, in
    ``--sub-procs`` processes) all subscribed to the published topic(s); one publisher
    process sends single-event durable publishes open loop at ``--rate`` events/s over a pool
    of keep-alive connections. Each event carries its scheduled send time (``due``,
    ``time.monotonic_ns()``, one clock for every process of the machine) and the time it was
    actually written (``sent``); a subscriber takes ``monotonic_ns()`` when the frame is
    handed to it. Latency from ``due`` includes any lateness of the sender (no coordinated
    omission). Every event that got a 200 must reach every subscriber once, gap-free in
    offset order; the run reports missing frames and offset gaps. Target: p99 <= 10 ms.

Placement: etherd runs ``taskset -c {--server-cpu}`` (default core 0, its SQLite threads
too); this process and every load process pin themselves to ``--client-cpu`` (default 1).
PostgreSQL is not pinned (it shares both cores with everything else).

Every run reports the CPU of etherd, of the load processes (a load generator near 100 % of
its core would distort the figures), of PostgreSQL and of everything else on the machine,
and the busy share of each core. Before each measured window it waits until other
processes use less than ``--quiet-pct`` % of one core (up to ``--quiet-timeout`` s) and
records what it saw, including the busiest other processes.

``--py-spy FILE`` records the server with ``py-spy record --format raw`` over the measured
window and prints the functions with the most samples (``--py-spy-native`` includes C
frames; it pauses the server per sample, so figures of a profiled run are not results).
``--json FILE`` appends one JSON line per run.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Final, cast

import uvloop
from picows import WSTransport, ws_connect

from bench.common import pg
from bench.common.cli import add_output, add_placement, add_py_spy, add_settings
from bench.common.cpu import (
    CpuTimes,
    Proc,
    all_procs,
    busiest,
    calibrate,
    cpu_pct,
    cpu_times,
    others_s,
    proc_cpu_s,
    used_s,
    wait_quiet,
)
from bench.common.histogram import pct, summary_ms
from bench.common.http import HttpConn, post
from bench.common.machine import machine_info
from bench.common.metrics import (
    Scrape,
    commit_figures,
    handler_mean_ms,
    histogram_delta,
    scrape,
)
from bench.common.openloop import schedule
from bench.common.profile import start_py_spy, summarize_profile
from bench.common.server import TOKEN, ServerProcess, start_etherd
from bench.common.ws import TextListener

PG_DATABASE: Final = "etherd_bench_publish"
TARGET_BATCH_EVENTS_PER_S: Final = 100_000
TARGET_SINGLE_PER_S: Final = 20_000
TARGET_LATENCY_P99_MS: Final = 10.0
LAT_EVENT: Final = "lat"
LAT_PREFIX: Final = b'{"type":"lat"'
SUBSCRIBED_PREFIX: Final = b'{"type":"subscribed"'


# -- load: HTTP ----------------------------------------------------------------------------


@dataclass
class Window:
    """Monotonic-ns instants shared by every process: load runs from ``go`` to ``stop``;
    only what completes in [``start``, ``end``) is measured."""

    go: int
    start: int
    end: int
    stop: int


@dataclass
class LoadTally:
    """What one load process measured inside the window."""

    ok: int = 0
    events: int = 0
    errors: Counter[int] = field(default_factory=Counter)
    latency_ns: array.array[int] = field(default_factory=lambda: array.array("q"))


class ClosedLoop(HttpConn):
    """Sends the same request again as soon as the previous one is answered."""

    def __init__(self, request: bytes, events: int, window: Window, tally: LoadTally) -> None:
        super().__init__()
        self.request = request
        self.events = events
        self.window = window
        self.tally = tally
        self.idle: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def start(self) -> None:
        self.send(self.request)

    def answered(self, status: int, body: bytes, sent_ns: int, now: int) -> None:
        w = self.window
        if w.start <= now < w.end:
            t = self.tally
            if status == 200:
                t.ok += 1
                t.events += self.events
                t.latency_ns.append(now - sent_ns)
            else:
                t.errors[status] += 1
        if now < w.stop and status != 0:
            self.send(self.request)
        elif not self.idle.done():
            self.idle.set_result(None)


def event_data(i: int, pad: str) -> str:
    return f'{{"n":{i},"note":"{pad}"}}'


def batch_body(conn: int, size: int, topics: int, pad: str) -> bytes:
    events = ",".join(
        f'{{"topic":"bench/batch/{(conn + k) % topics}","event":"tick",'
        f'"data":{event_data(k, pad)}}}'
        for k in range(size)
    )
    return ('{"events":[' + events + "]}").encode()


def single_body(conn: int, topics: int, pad: str) -> bytes:
    return (
        f'{{"topic":"bench/single/{conn % topics}","event":"tick","data":{event_data(conn, pad)}}}'
    ).encode()


async def closed_loop_load(params: dict[str, Any], pipe: Connection) -> dict[str, Any]:
    """A load process of the ``batch`` and ``single`` scenarios."""
    loop = asyncio.get_running_loop()
    tally = LoadTally()
    window = Window(0, 0, 0, 0)
    pad = "x" * params["pad"]
    conns: list[ClosedLoop] = []
    for i in range(params["first_conn"], params["first_conn"] + params["conns"]):
        if params["batch"]:
            body, events = batch_body(i, params["batch"], params["topics"], pad), params["batch"]
        else:
            body, events = single_body(i, params["topics"], pad), 1
        request = post(b"/api/publish", body)

        def factory(r: bytes = request, n: int = events) -> ClosedLoop:
            return ClosedLoop(r, n, window, tally)

        _, conn = await loop.create_connection(factory, "127.0.0.1", params["port"])
        conns.append(conn)
    pipe.send("ready")
    go: Window = await loop.run_in_executor(None, pipe.recv)
    window.go, window.start, window.end, window.stop = go.go, go.start, go.end, go.stop
    await asyncio.sleep(max(0.0, (window.go - time.monotonic_ns()) / 1e9))
    for c in conns:
        c.start()
    await asyncio.wait([c.idle for c in conns], timeout=(window.stop - window.go) / 1e9 + 60)
    for c in conns:
        c.close()
    return {
        "ok": tally.ok,
        "events": tally.events,
        "errors": dict(tally.errors),
        "latency_ns": tally.latency_ns,
    }


# -- load: open-loop publisher -------------------------------------------------------------


class PoolConn(HttpConn):
    def __init__(self, publisher: Publisher) -> None:
        super().__init__()
        self.publisher = publisher
        self.due = 0

    def answered(self, status: int, body: bytes, sent_ns: int, now_ns: int) -> None:
        self.publisher.answered(self, status, now_ns)


class Publisher:
    """Open loop: event ``i`` is due at ``go + i / rate``, whatever answers are pending."""

    def __init__(self, params: dict[str, Any], window: Window) -> None:
        self.window = window
        self.topics = [f"bench/lat/{k}" for k in range(params["topics"])]
        self.rate: float = params["rate"]
        self.pad = "x" * params["pad"]
        self.free: list[PoolConn] = []
        self.backlog: deque[tuple[int, int]] = deque()  # (seq, due) with no free connection
        self.max_backlog = 0
        self.published_in_window = 0  # due in the window and answered 200
        self.due_in_window = 0
        self.errors: Counter[int] = Counter()
        self.answer_ns = array.array("q")  # due -> answer, for events due in the window
        self.connections = 0
        self.finished = False
        self.all_free = asyncio.Event()
        self.late_ns = array.array("q")  # due -> written

    def request(self, seq: int, due: int) -> tuple[bytes, int]:
        sent = time.monotonic_ns()
        topic = self.topics[seq % len(self.topics)]
        body = (
            f'{{"topic":"{topic}","event":"{LAT_EVENT}","data":'
            f'{{"due":{due},"sent":{sent},"seq":{seq},"note":"{self.pad}"}}}}'
        ).encode()
        return post(b"/api/publish", body), sent

    def submit(self, seq: int, due: int) -> None:
        w = self.window
        if w.start <= due < w.end:
            self.due_in_window += 1
        if not self.free:
            self.backlog.append((seq, due))
            self.max_backlog = max(self.max_backlog, len(self.backlog))
            return
        self._send(self.free.pop(), seq, due)

    def _send(self, conn: PoolConn, seq: int, due: int) -> None:
        request, sent = self.request(seq, due)
        conn.due = due
        conn.send(request)
        if self.window.start <= due < self.window.end:
            self.late_ns.append(sent - due)

    def answered(self, conn: PoolConn, status: int, now: int) -> None:
        w = self.window
        if w.start <= conn.due < w.end:
            if status == 200:
                self.published_in_window += 1
                self.answer_ns.append(now - conn.due)
            else:
                self.errors[status] += 1
        if status == 0:
            return
        if self.backlog:
            self._send(conn, *self.backlog.popleft())
        else:
            self.free.append(conn)
            if self.finished and len(self.free) == self.connections:
                self.all_free.set()

    async def run(self) -> None:
        async for seq, due in schedule(self.window.go, self.rate, until_ns=self.window.stop):
            self.submit(seq, due)


async def publisher_load(params: dict[str, Any], pipe: Connection) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    window = Window(0, 0, 0, 0)
    publisher = Publisher(params, window)
    conns: list[PoolConn] = []
    for _ in range(params["conns"]):
        _, conn = await loop.create_connection(
            lambda: PoolConn(publisher), "127.0.0.1", params["port"]
        )
        conns.append(conn)
    publisher.free = list(conns)
    publisher.connections = len(conns)
    pipe.send("ready")
    go: Window = await loop.run_in_executor(None, pipe.recv)
    window.go, window.start, window.end, window.stop = go.go, go.start, go.end, go.stop
    await asyncio.sleep(max(0.0, (window.go - time.monotonic_ns()) / 1e9))
    await publisher.run()
    # Let the last answers arrive.
    publisher.finished = True
    if len(publisher.free) == len(conns):
        publisher.all_free.set()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(publisher.all_free.wait(), 30)
    for c in conns:
        c.close()
    return {
        "published_in_window": publisher.published_in_window,
        "due_in_window": publisher.due_in_window,
        "errors": dict(publisher.errors),
        "max_backlog": publisher.max_backlog,
        "answer_ns": publisher.answer_ns,
        "late_ns": publisher.late_ns,
    }


# -- load: WebSocket subscribers -----------------------------------------------------------


@dataclass
class SubTally:
    from_due_ns: array.array[int] = field(default_factory=lambda: array.array("q"))
    from_sent_ns: array.array[int] = field(default_factory=lambda: array.array("q"))
    received_in_window: int = 0
    frames: int = 0
    gaps: int = 0  # an offset that is not the previous one + 1 (per topic)
    other: Counter[str] = field(default_factory=Counter)


class Subscriber(TextListener):
    """Times every ``lat`` event from its due and sent times; checks offsets per topic."""

    def __init__(self, tally: SubTally, window: Window) -> None:
        super().__init__()
        self.tally = tally
        self.window = window
        self.acked: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.last: dict[bytes, int] = {}

    def on_text(self, raw: bytes, now: int) -> None:
        t = self.tally
        if raw.startswith(LAT_PREFIX):
            t.frames += 1
            at = raw.find(b'"topic":"') + 9
            topic = raw[at : raw.index(b'"', at)]
            at = raw.find(b'"offset":', at) + 9
            offset = int(raw[at : raw.index(b",", at)])
            last = self.last.get(topic)
            if last is not None and offset != last + 1:
                t.gaps += 1
            self.last[topic] = offset
            at = raw.find(b'"due":', at) + 6
            due = int(raw[at : raw.index(b",", at)])
            w = self.window
            if w.start <= due < w.end:
                at = raw.find(b'"sent":', at) + 7
                sent = int(raw[at : raw.index(b",", at)])
                t.received_in_window += 1
                t.from_due_ns.append(now - due)
                t.from_sent_ns.append(now - sent)
        elif raw.startswith(SUBSCRIBED_PREFIX):
            if not self.acked.done():
                self.acked.set_result(raw)
        else:
            t.other[raw[:40].decode(errors="replace")] += 1

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.tally.other["disconnected"] += 1


async def subscriber_load(params: dict[str, Any], pipe: Connection) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    window = Window(0, 0, 0, 0)
    tally = SubTally()
    topics = [f"bench/lat/{k}" for k in range(params["topics"])]
    url = f"ws://127.0.0.1:{params['port']}/api/realtime?token={TOKEN}"
    subs: list[Subscriber] = []
    for i in range(params["subscribers"]):
        _, listener = await ws_connect(lambda: Subscriber(tally, window), url)
        sub = cast(Subscriber, listener)
        sub.subscribe(topics, i)
        subs.append(sub)
    for sub in subs:
        ack = await asyncio.wait_for(sub.acked, 30)
        if b'"errors":[]' not in ack:
            raise RuntimeError(f"subscribe refused: {ack[:300]!r}")
    pipe.send("ready")
    go: Window = await loop.run_in_executor(None, pipe.recv)
    window.go, window.start, window.end, window.stop = go.go, go.start, go.end, go.stop
    # Subscribers stay until every event of the window had time to arrive.
    await asyncio.sleep(max(0.0, (window.stop - time.monotonic_ns()) / 1e9) + 2.0)
    for sub in subs:
        if sub.transport is not None:
            sub.transport.disconnect()
    return {
        "subscribers": len(subs),
        "from_due_ns": tally.from_due_ns,
        "from_sent_ns": tally.from_sent_ns,
        "received_in_window": tally.received_in_window,
        "frames": tally.frames,
        "gaps": tally.gaps,
        "other": dict(tally.other),
    }


# -- load processes ------------------------------------------------------------------------


LOADS: Final[dict[str, Callable[[dict[str, Any], Connection], Any]]] = {
    "closed": closed_loop_load,
    "publisher": publisher_load,
    "subscribers": subscriber_load,
}


def load_process(kind: str, params: dict[str, Any], pipe: Connection) -> None:
    """Entry point of a load process: pin, run the load on uvloop, send back the figures."""
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setaffinity(0, {params["cpu"]})
    try:
        result = uvloop.run(LOADS[kind](params, pipe))
    except BaseException as exc:
        pipe.send({"failed": repr(exc)})
        raise
    pipe.send(result)


@dataclass
class Load:
    kind: str
    proc: multiprocessing.process.BaseProcess
    pipe: Connection


def start_loads(specs: Sequence[tuple[str, dict[str, Any]]]) -> list[Load]:
    ctx = multiprocessing.get_context("spawn")
    loads: list[Load] = []
    for kind, params in specs:
        ours, theirs = ctx.Pipe()
        proc = ctx.Process(target=load_process, args=(kind, params, theirs), daemon=True)
        proc.start()
        loads.append(Load(kind, proc, ours))
    for load in loads:
        if not load.pipe.poll(120):
            raise RuntimeError(f"a {load.kind} load process did not get ready")
        message = load.pipe.recv()
        if message != "ready":
            raise RuntimeError(f"a {load.kind} load process failed: {message}")
    return loads


# -- measuring -----------------------------------------------------------------------------


@dataclass
class Snapshot:
    at_ns: int
    server_cpu: float
    loads_cpu: list[float]
    own_cpu: float
    procs: dict[int, Proc]
    busy: dict[str, CpuTimes]
    metrics: Scrape


def snapshot(server: ServerProcess, loads: Sequence[Load]) -> Snapshot:
    return Snapshot(
        time.monotonic_ns(),
        proc_cpu_s(server.pid),
        [proc_cpu_s(load.proc.pid or 0) for load in loads],
        time.process_time(),
        all_procs(),
        cpu_times(),
        scrape(server.port),
    )


def load_specs(
    args: argparse.Namespace, scenario: str, port: int
) -> list[tuple[str, dict[str, Any]]]:
    base = {"port": port, "cpu": args.client_cpu, "pad": args.pad}
    specs: list[tuple[str, dict[str, Any]]] = []
    if scenario in ("batch", "single"):
        conns = args.batch_conns if scenario == "batch" else args.single_conns
        procs = args.batch_procs if scenario == "batch" else args.single_procs
        first = 0
        for p in range(procs):
            n = conns // procs + (1 if p < conns % procs else 0)
            specs.append(
                (
                    "closed",
                    {
                        **base,
                        "conns": n,
                        "first_conn": first,
                        "topics": args.topics,
                        "batch": args.batch_size if scenario == "batch" else 0,
                    },
                )
            )
            first += n
        return specs
    for p in range(args.sub_procs):
        n = args.subscribers // args.sub_procs + (1 if p < args.subscribers % args.sub_procs else 0)
        specs.append(("subscribers", {**base, "subscribers": n, "topics": args.lat_topics}))
    specs.append(
        (
            "publisher",
            {**base, "conns": args.lat_conns, "rate": args.rate, "topics": args.lat_topics},
        )
    )
    return specs


def run_one(args: argparse.Namespace, store_kind: str, scenario: str) -> dict[str, Any]:
    """Start a server on a fresh database, drive one scenario, return the figures."""
    workdir = Path(tempfile.mkdtemp(prefix="etherd-bench-publish-"))
    if store_kind == "pg":
        store = pg.fresh_database(args.pg_server, PG_DATABASE)
    else:
        store = f"sqlite:///{workdir / 'etherd.db'}"
    server: ServerProcess | None = None
    loads: list[Load] = []
    try:
        server = start_etherd(
            cpu=args.server_cpu,
            store=store,
            settings={"http": {"max_body_bytes": 8 * 1024 * 1024}},
            overrides=args.set,
            workdir=workdir,
        )
        loads = start_loads(load_specs(args, scenario, server.port))
        ours = [server.pid, os.getpid(), *(load.proc.pid or 0 for load in loads)]
        quiet = wait_quiet(args.quiet_pct, args.quiet_timeout, ours)
        speed = calibrate(args.server_cpu)
        now = time.monotonic_ns()
        go = now + 300_000_000
        window = Window(
            go,
            go + round(args.warmup * 1e9),
            go + round((args.warmup + args.duration) * 1e9),
            go + round((args.warmup + args.duration + 0.5) * 1e9),
        )
        for load in loads:
            load.pipe.send(window)
        time.sleep(max(0.0, (window.start - time.monotonic_ns()) / 1e9))
        s0 = snapshot(server, loads)
        spy = None
        if args.py_spy:
            spy = start_py_spy(
                server.pid, args.py_spy, rate=args.py_spy_rate, native=args.py_spy_native
            )
        time.sleep(max(0.0, (window.end - time.monotonic_ns()) / 1e9))
        s1 = snapshot(server, loads)
        if spy is not None:
            spy.send_signal(2)  # SIGINT: py-spy writes the profile and exits
            spy.wait(60)
        results: list[dict[str, Any]] = []
        for load in loads:
            if not load.pipe.poll(args.warmup + args.duration + 120):
                raise RuntimeError(f"a {load.kind} load process did not report")
            result = load.pipe.recv()
            if "failed" in result:
                raise RuntimeError(f"a {load.kind} load process failed: {result['failed']}")
            results.append(result)
        for load in loads:
            load.proc.join(10)
        if server.proc.poll() is not None:
            raise RuntimeError(f"etherd exited during the run: {server.log_tail()}")
        figures = assemble(args, scenario, loads, results, s0, s1, set(ours))
    finally:
        for load in loads:
            if load.proc.is_alive():
                load.proc.kill()
        if server is not None:
            server.stop()
        if store_kind == "pg" and not args.keep_db:
            pg.drop_database(args.pg_server, PG_DATABASE)
        shutil.rmtree(workdir, ignore_errors=True)
    figures["store"] = "postgresql" if store_kind == "pg" else "sqlite"
    figures["calibration_ms_server_core"] = {"before": speed, "after": calibrate(args.server_cpu)}
    figures["quiet_before"] = quiet.record()
    return figures


def assemble(
    args: argparse.Namespace,
    scenario: str,
    loads: Sequence[Load],
    results: Sequence[dict[str, Any]],
    s0: Snapshot,
    s1: Snapshot,
    ours: set[int],
) -> dict[str, Any]:
    elapsed = (s1.at_ns - s0.at_ns) / 1e9
    server_cpu = s1.server_cpu - s0.server_cpu
    loads_cpu = [b - a for a, b in zip(s0.loads_cpu, s1.loads_cpu, strict=True)]
    own_cpu = s1.own_cpu - s0.own_cpu
    pg_cpu = sum(
        used_s(s0.procs, pid, proc) for pid, proc in s1.procs.items() if proc.name == "postgres"
    )
    others = others_s(s0.procs, s1.procs, ours, skip=("postgres",))
    commit = commit_figures(s0.metrics, s1.metrics, elapsed)
    out: dict[str, Any] = {
        "scenario": scenario,
        "label": args.label,
        "settings": list(args.set),
        "window_s": round(elapsed, 3),
        "server": {
            "events_stored": commit["rows"],
            "events_stored_per_s": commit["rows_per_s"],
            "publish_handler_ms_mean": handler_mean_ms(s0.metrics, s1.metrics, "/api/publish"),
            "commit": commit,
            "batch_rows": histogram_delta(s0.metrics, s1.metrics, "etherd_store_batch_rows"),
            "store_errors": int(s1.metrics.delta(s0.metrics, "etherd_store_errors_total")),
            "loop_lag_max_s_last": s1.metrics.values.get("etherd_event_loop_lag_last_seconds"),
        },
        "cpu_pct_of_one_core": {
            "etherd": round(100 * server_cpu / elapsed, 1),
            "load_processes": [round(100 * c / elapsed, 1) for c in loads_cpu],
            "load_total": round(100 * sum(loads_cpu) / elapsed, 1),
            "bench_main": round(100 * own_cpu / elapsed, 1),
            "postgres": round(100 * pg_cpu / elapsed, 1),
            "others": round(100 * others / elapsed, 1),
            "busiest_others": busiest(s0.procs, s1.procs, ours, elapsed, skip=("postgres",)),
        },
        "disturbed": 100 * others / elapsed > args.quiet_pct,
        # Per core: process time (user + system), irq + softirq, steal; % of the window.
        "core_pct": cpu_pct(s0.busy, s1.busy, elapsed),
    }
    if scenario in ("batch", "single"):
        ok = sum(r["ok"] for r in results)
        events = sum(r["events"] for r in results)
        errors: Counter[int] = Counter()
        latency: list[int] = []
        for r in results:
            errors.update(r["errors"])
            latency.extend(r["latency_ns"])
        conns = args.batch_conns if scenario == "batch" else args.single_conns
        out.update(
            {
                "connections": conns,
                "load_processes": len(loads),
                "events_per_request": args.batch_size if scenario == "batch" else 1,
                "topics": args.topics,
                "requests": ok,
                "requests_per_s": round(ok / elapsed, 1),
                "events": events,
                "events_per_s": round(events / elapsed, 1),
                "request_latency_ms": summary_ms(latency),
                "errors": {str(k): v for k, v in errors.items()},
                "server_cpu_us_per_event": round(1e6 * server_cpu / events, 2) if events else None,
            }
        )
        target = TARGET_BATCH_EVENTS_PER_S if scenario == "batch" else TARGET_SINGLE_PER_S
        out["target"] = f">= {target} events/s"
        out["target_met"] = events / elapsed >= target
        return out
    pub = next(r for r, load in zip(results, loads, strict=True) if load.kind == "publisher")
    subs = [r for r, load in zip(results, loads, strict=True) if load.kind == "subscribers"]
    from_due: list[int] = []
    from_sent: list[int] = []
    for r in subs:
        from_due.extend(r["from_due_ns"])
        from_sent.extend(r["from_sent_ns"])
    n_subs = sum(r["subscribers"] for r in subs)
    received = sum(r["received_in_window"] for r in subs)
    other: Counter[str] = Counter()
    for r in subs:
        other.update(r["other"])
    expected = pub["published_in_window"] * n_subs
    p99 = pct(from_due, 0.99)
    out.update(
        {
            "rate_per_s": args.rate,
            "subscribers": n_subs,
            "subscriber_processes": len(subs),
            "topics": args.lat_topics,
            "publisher_connections": args.lat_conns,
            "published_in_window": pub["published_in_window"],
            "due_in_window": pub["due_in_window"],
            "publish_errors": {str(k): v for k, v in pub["errors"].items()},
            "publisher_max_backlog": pub["max_backlog"],
            "delivery_ms_from_due": summary_ms(from_due),
            "delivery_ms_from_sent": summary_ms(from_sent),
            "publish_answer_ms_from_due": summary_ms(pub["answer_ns"]),
            "sender_late_ms": summary_ms(pub["late_ns"]),
            "deliveries_expected": expected,
            "deliveries_received": received,
            "deliveries_missing": expected - received,
            "offset_gaps": sum(r["gaps"] for r in subs),
            "unexpected_frames": dict(other),
            "target": f"p99 <= {TARGET_LATENCY_P99_MS} ms",
            "target_met": p99 <= TARGET_LATENCY_P99_MS and expected == received,
        }
    )
    return out


# -- report ------------------------------------------------------------------------------


def report(r: dict[str, Any]) -> str:
    cpu = r["cpu_pct_of_one_core"]
    srv = r["server"]
    batches = srv["batch_rows"]
    lines = [f"== {r['scenario']} on {r['store']} {r['label']}".rstrip()]
    if r["scenario"] in ("batch", "single"):
        lat = r["request_latency_ms"]
        lines += [
            f"load               {r['connections']} connections in {r['load_processes']} "
            f"process(es), {r['events_per_request']} event(s) per request, "
            f"{r['topics']} topics",
            f"throughput         {r['events_per_s']} events/s, {r['requests_per_s']} requests/s "
            f"(server stored {srv['events_stored_per_s']} events/s)",
            f"request latency    p50 {lat['p50']} ms  p90 {lat['p90']} ms  p99 {lat['p99']} ms  "
            f"max {lat['max']} ms",
            f"errors             {r['errors'] or 'none'}",
            f"etherd CPU/event   {r['server_cpu_us_per_event']} us",
        ]
    else:
        d, s = r["delivery_ms_from_due"], r["delivery_ms_from_sent"]
        a = r["publish_answer_ms_from_due"]
        lines += [
            f"load               {r['rate_per_s']} events/s open loop over "
            f"{r['publisher_connections']} connections, {r['subscribers']} subscribers in "
            f"{r['subscriber_processes']} process(es), {r['topics']} topic(s)",
            f"delivery (due)     p50 {d['p50']} ms  p90 {d['p90']} ms  p99 {d['p99']} ms  "
            f"p99.9 {d['p999']} ms  max {d['max']} ms  ({d['count']} deliveries)",
            f"delivery (sent)    p50 {s['p50']} ms  p99 {s['p99']} ms  max {s['max']} ms",
            f"publish answer     p50 {a['p50']} ms  p99 {a['p99']} ms  max {a['max']} ms; "
            f"sender late p99 {r['sender_late_ms']['p99']} ms, max backlog "
            f"{r['publisher_max_backlog']}",
            f"completeness       {r['deliveries_received']} of {r['deliveries_expected']} "
            f"deliveries, {r['offset_gaps']} offset gaps, publish errors "
            f"{r['publish_errors'] or 'none'}, other frames {r['unexpected_frames'] or 'none'}",
        ]
    commit = srv["commit"]
    lines += [
        f"group commit       {commit['commits']} commits, {commit['mean_commit_ms']} ms "
        f"each, pipeline busy {commit['busy_pct_of_window']} %; rows per commit mean "
        f"{batches['mean']}, p50 {batches['p50_bucket']}, p90 {batches['p90_bucket']}",
        f"batch histogram    {batches['histogram']}",
        f"CPU (% of a core)  etherd {cpu['etherd']}, load {cpu['load_processes']}, "
        f"PostgreSQL {cpu['postgres']}, others {cpu['others']} {cpu['busiest_others']}"
        + (" (DISTURBED)" if r["disturbed"] else ""),
        "cores              "
        + "; ".join(
            f"{k}: task {v['task']} irq {v['irq']} steal {v['steal']} idle {v['idle']}"
            for k, v in r["core_pct"].items()
        ),
        f"before the window  calibration {r['calibration_ms_server_core']} ms on the server core"
        "; "
        f"others {r['quiet_before']['others_pct_of_a_core']} % of a core "
        f"(quiet: {r['quiet_before']['quiet']}), loadavg {r['quiet_before']['loadavg']}, "
        f"busiest {r['quiet_before']['busiest_others']}",
        f"target             {r['target']}: {'MET' if r['target_met'] else 'NOT MET'}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--stores", nargs="+", choices=["sqlite", "pg"], default=["sqlite", "pg"])
    parser.add_argument(
        "--scenarios",
        nargs="+",
        choices=["batch", "single", "latency"],
        default=["batch", "single", "latency"],
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs per store and scenario")
    parser.add_argument(
        "--retries",
        type=int,
        default=2,
        help="runs again (after the quiet check) when others used more than --quiet-pct "
        "during the window; every attempt is recorded",
    )
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds before the window")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    add_placement(parser)
    parser.add_argument("--pad", type=int, default=40, help="filler characters per event")
    parser.add_argument("--topics", type=int, default=16, help="topics (batch and single)")
    parser.add_argument("--batch-size", type=int, default=1000, help="events per request")
    parser.add_argument("--batch-conns", type=int, default=8)
    parser.add_argument("--batch-procs", type=int, default=1)
    parser.add_argument("--single-conns", type=int, default=128)
    parser.add_argument("--single-procs", type=int, default=2)
    parser.add_argument("--rate", type=float, default=1000.0, help="latency: events/s")
    parser.add_argument("--subscribers", type=int, default=100)
    parser.add_argument("--sub-procs", type=int, default=1)
    parser.add_argument("--lat-topics", type=int, default=1, help="every subscriber takes all")
    parser.add_argument("--lat-conns", type=int, default=32, help="publisher connections")
    add_settings(parser)
    parser.add_argument(
        "--pg-server", default=pg.LOCAL_SERVER, help="PostgreSQL server, no database"
    )
    parser.add_argument("--keep-db", action="store_true", help="keep the PostgreSQL database")
    add_py_spy(parser)
    add_output(parser)
    parser.add_argument("--quiet-pct", type=float, default=25.0)
    parser.add_argument("--quiet-timeout", type=float, default=180.0)
    args = parser.parse_args(argv)

    with contextlib.suppress(OSError, AttributeError):
        os.sched_setaffinity(0, {args.client_cpu})
    info = machine_info()
    if "pg" in args.stores:
        info["postgresql"] = pg.version(args.pg_server)
    print("versions " + json.dumps(info))
    for store_kind in args.stores:
        for scenario in args.scenarios:
            for _ in range(args.repeat):
                for _attempt in range(1 + args.retries):
                    result = run_one(args, store_kind, scenario)
                    result["versions"] = info
                    result["when"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                    result["placement"] = {
                        "etherd_cpu": args.server_cpu,
                        "load_cpu": args.client_cpu,
                        "postgres": "unpinned",
                    }
                    print(report(result), flush=True)
                    if args.py_spy and args.py_spy.exists():
                        print(summarize_profile(args.py_spy), flush=True)
                    if args.json:
                        with args.json.open("a") as f:
                            f.write(json.dumps(result) + "\n")
                    if not result["disturbed"]:
                        break
    return 0


if __name__ == "__main__":
    sys.exit(main())
