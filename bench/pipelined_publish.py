"""Durable publishing from one client over one pipelined connection, into PostgreSQL.

Run from the repository root (``make bench-client`` first)::

    python -m bench.pipelined_publish                          # HTTP, both scenarios
    python -m bench.pipelined_publish --via http ws --depth 32 --json out.jsonl
    python -m bench.pipelined_publish --pg-server postgresql://postgres@127.0.0.1:5432

One client, one TCP connection, up to ``--depth`` requests in flight (default 256, as
``http.max_pipelined``), one durable event per request. ``--via http`` pipelines
``POST /api/publish`` on a keep-alive HTTP/1.1 connection (answers come in order);
``--via ws`` sends contract section 4's ``{"action":"publish",...,"id":N}`` over one
WebSocket and matches each ``{"type":"published","id":N,"offset":...}`` reply by id. A
2xx (or ``published``) means the event is committed (contract section 9).

Scenarios (each on a fresh etherd and a fresh database):

``throughput``
    Closed loop at the full depth for ``--duration`` s after ``--warmup`` s: events/s
    committed (the client's count and the server's ``etherd_store_rows_total`` agree),
    answer latency, the group-commit batch sizes, etherd's and PostgreSQL's CPU.
``latency``
    Open loop at ``--rate`` events/s (default 1,000) on the same one connection, with
    ``--subscribers`` WebSocket subscribers (the C client, default 100) on the topic. Each
    event carries its scheduled send time; a request that cannot go out because
    ``--depth`` are in flight waits, and that wait counts as latency. Reports the delivered
    fraction (every committed event must reach every subscriber) and the latency p50/p99.

PostgreSQL is a throwaway cluster with fsync on (``tests/pgcluster.py``), unless
``--pg-server`` names a server; it is not pinned. etherd is pinned to ``--server-cpu``
(core 0), this process and the subscribers to ``--client-cpu`` (core 1).

The WebSocket ``publish`` action is in the contract but may not be in the server yet: an
error reply ends the run with the server's code and message.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec
import uvloop
from picows import WSTransport, ws_connect

from bench.common import pg
from bench.common.cli import add_output, add_placement, add_settings
from bench.common.cpu import (
    all_procs,
    busiest,
    named_cpu_s,
    others_s,
    pin,
    proc_cpu_s,
    wait_quiet,
)
from bench.common.histogram import bucket_of, new_hist, percentiles, to_sparse, us_to_ms
from bench.common.http import HttpConn, post
from bench.common.machine import machine_info
from bench.common.metrics import histogram_delta, scrape
from bench.common.openloop import schedule
from bench.common.server import ServerProcess, start_etherd
from bench.common.subclient import SubClient, cpu_s
from bench.common.ws import TextListener

TOPIC: Final = "bench/pipe"
EVENT: Final = "bench"
PG_DATABASE: Final = "etherd_bench_pipelined"


class PublishRefused(RuntimeError):
    """The server answered a publish with an error: the run cannot mean anything."""


# -- what a publishing connection does -----------------------------------------------------


@dataclass
class Tally:
    """Answers counted by a publishing connection."""

    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    answer_hist: list[int] = field(default_factory=new_hist)  # due (or sent) -> answer
    measuring: bool = False
    first_error: str | None = None

    def answered(self, ok: bool, started_ns: int, now_ns: int, error: str = "") -> None:
        if not ok:
            self.errors[error] = self.errors.get(error, 0) + 1
            self.first_error = self.first_error or error
            return
        if self.measuring:
            self.ok += 1
            self.answer_hist[bucket_of((now_ns - started_ns) // 1000)] += 1


def event_data(seq: int, due_ns: int, pad: int) -> bytes:
    """The event's fields: ``t`` (scheduled send, monotonic ns) for the subscribers."""
    return b'{"t":"%020d","s":"%010d","p":"%s"}' % (due_ns, seq, b"x" * pad)


class Publisher:
    """Keeps up to ``depth`` publishes in flight on one connection, fed by ``next_due``."""

    def __init__(self, depth: int, tally: Tally, pad: int) -> None:
        self.depth = depth
        self.tally = tally
        self.pad = pad
        self.seq = 0
        self.outstanding = 0
        self.backlog: deque[int] = deque()  # due times waiting for a free slot
        self.closed_loop = False
        self.stopped = False
        self.idle = asyncio.Event()

    def submit(self, due_ns: int) -> None:
        """An event is due: send it now, or queue it until a slot frees up."""
        if self.outstanding < self.depth:
            self._send(due_ns)
        else:
            self.backlog.append(due_ns)

    def _send(self, due_ns: int) -> None:
        self.outstanding += 1
        self.idle.clear()
        self.seq += 1
        self.emit(self.seq, due_ns, event_data(self.seq, due_ns, self.pad))

    def emit(self, seq: int, due_ns: int, data: bytes) -> None:
        """Write one publish of ``data`` on the connection."""
        raise NotImplementedError

    def shut(self) -> None:
        """Close the connection."""
        raise NotImplementedError

    def done_one(self, ok: bool, due_ns: int, error: str = "") -> None:
        """One answer came back: account for it and keep the pipeline full."""
        self.outstanding -= 1
        self.tally.answered(ok, due_ns, time.monotonic_ns(), error)
        if not ok and error.startswith("refused"):
            self.stopped = True
        if self.stopped:
            self.backlog.clear()
        elif self.backlog:
            self._send(self.backlog.popleft())
        elif self.closed_loop:
            self._send(time.monotonic_ns())
        if self.outstanding == 0:
            self.idle.set()


class HttpPublisher(Publisher, HttpConn):
    """``POST /api/publish`` pipelined on one keep-alive connection."""

    def __init__(self, depth: int, tally: Tally, pad: int) -> None:
        Publisher.__init__(self, depth, tally, pad)
        HttpConn.__init__(self)
        self.due: deque[int] = deque()

    def emit(self, seq: int, due_ns: int, data: bytes) -> None:
        body = b'{"topic":"%s","event":"%s","data":%s}' % (TOPIC.encode(), EVENT.encode(), data)
        self.due.append(due_ns)
        self.send(post(b"/api/publish", body))

    def shut(self) -> None:
        self.close()

    def answered(self, status: int, body: bytes, sent_ns: int, now_ns: int) -> None:
        due = self.due.popleft() if self.due else sent_ns
        if 200 <= status < 300:
            self.done_one(True, due)
        elif status == 0:
            self.done_one(False, due, "connection lost")
        else:
            self.done_one(
                False, due, f"refused: HTTP {status} {body[:200].decode(errors='replace')}"
            )


class Reply(msgspec.Struct):
    type: str
    id: str | None = None
    offset: int | None = None
    code: str | None = None
    message: str | None = None


REPLY: Final = msgspec.json.Decoder(Reply)


class WsPublisher(Publisher, TextListener):
    """Contract section 4's ``publish`` action on one WebSocket, replies matched by id."""

    def __init__(self, depth: int, tally: Tally, pad: int) -> None:
        Publisher.__init__(self, depth, tally, pad)
        TextListener.__init__(self)
        self.pending: dict[str, int] = {}  # id -> due time

    def emit(self, seq: int, due_ns: int, data: bytes) -> None:
        rid = str(seq)
        self.pending[rid] = due_ns
        self.send_text(
            b'{"action":"publish","topic":"%s","event":"%s","data":%s,"id":"%s"}'
            % (TOPIC.encode(), EVENT.encode(), data, rid.encode())
        )

    def on_text(self, raw: bytes, now_ns: int) -> None:
        try:
            reply = REPLY.decode(raw)
        except msgspec.DecodeError:
            return
        due = self.pending.pop(reply.id or "", None)
        if reply.type == "published" and due is not None:
            self.done_one(reply.offset is not None, due, "published without an offset")
        elif reply.type == "error":
            text = f"refused: {reply.code}: {reply.message}"
            self.done_one(False, due if due is not None else time.monotonic_ns(), text)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        for due in self.pending.values():
            self.outstanding -= 1
            self.tally.answered(False, due, time.monotonic_ns(), "connection lost")
        self.pending.clear()
        self.idle.set()

    def shut(self) -> None:
        if self.transport is not None:
            self.transport.disconnect()


async def connect(via: str, server: ServerProcess, depth: int, tally: Tally, pad: int) -> Publisher:
    """An open publishing connection of the chosen kind."""
    if via == "http":
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(
            lambda: HttpPublisher(depth, tally, pad), server.host, server.port
        )
        return conn
    _, listener = await ws_connect(lambda: WsPublisher(depth, tally, pad), server.ws_url())
    assert isinstance(listener, WsPublisher)
    return listener


# -- the scenarios -------------------------------------------------------------------------


async def throughput(args: argparse.Namespace, server: ServerProcess) -> dict[str, Any]:
    """Closed loop at the full depth; what committed during the window."""
    tally = Tally()
    pub = await connect(args.via_now, server, args.depth, tally, args.pad)
    pub.closed_loop = True
    for _ in range(args.depth):
        pub.submit(time.monotonic_ns())
    await asyncio.sleep(args.warmup)
    check(tally)
    window = Window.start(server.pid)
    tally.measuring = True
    m0 = scrape(server.port)
    await asyncio.sleep(args.duration)
    tally.measuring = False
    m1 = scrape(server.port)
    figures = window.finish()
    pub.stopped = True
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(pub.idle.wait(), 30)
    pub.shut()
    check(tally)
    elapsed = figures["window_s"]
    p50, p99, pmax = percentiles(to_sparse(tally.answer_hist), (0.5, 0.99, 1.0))
    stored = m1.delta(m0, "etherd_store_rows_total")
    return {
        "events_per_s": round(tally.ok / elapsed, 1),
        "server_stored_per_s": round(stored / elapsed, 1),
        "answer_ms": {"p50": us_to_ms(p50), "p99": us_to_ms(p99), "max": us_to_ms(pmax)},
        "errors": tally.errors,
        "batch_rows": histogram_delta(m0, m1, "etherd_store_batch_rows"),
        "server_cpu_us_per_event": round(1e6 * figures["server_cpu_s"] / tally.ok, 2)
        if tally.ok
        else None,
        **figures,
    }


async def latency(args: argparse.Namespace, server: ServerProcess) -> dict[str, Any]:
    """Open loop at ``--rate`` to ``--subscribers`` C subscribers on the topic."""
    tally = Tally(measuring=True)
    with SubClient(
        server.ws_url(), args.subscribers, prefix=TOPIC, pattern=TOPIC, cpus=str(args.client_cpu)
    ) as subs:
        _, failed = subs.wait_ready(60)
        if failed:
            raise RuntimeError(f"{failed} of {args.subscribers} subscribers did not connect")
        pub = await connect(args.via_now, server, args.depth, tally, args.pad)
        window = Window.start(server.pid, subs.pid)
        t0 = time.monotonic_ns() + 50_000_000
        async for i, due in schedule(t0, args.rate, total=round(args.rate * args.duration)):
            pub.submit(due)
            if i % 100 == 0:
                check(tally)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(pub.idle.wait(), 30)
        expected = tally.ok * args.subscribers
        wait_delivered(subs, expected, 10.0)
        figures = window.finish()
        report = subs.report()
        pub.shut()
    check(tally)
    p50, p99, pmax = percentiles(to_sparse(tally.answer_hist), (0.5, 0.99, 1.0))
    lat = report["latency_ms"]
    return {
        "rate_per_s": args.rate,
        "subscribers": args.subscribers,
        "published_ok": tally.ok,
        "publish_errors": tally.errors,
        "deliveries_expected": expected,
        "deliveries": report["text_frames"],
        "delivered_fraction": round(report["text_frames"] / expected, 6) if expected else None,
        "delivery_ms": {k: lat[k] for k in ("p50", "p90", "p99", "p99.9", "max")},
        "publish_answer_ms": {"p50": us_to_ms(p50), "p99": us_to_ms(p99), "max": us_to_ms(pmax)},
        "subscriber_client_cpu_s": round(cpu_s(report), 3),
        **figures,
    }


def wait_delivered(subs: SubClient, expected: int, timeout: float) -> None:
    """Block (publishing is over) until the subscribers have ``expected`` frames."""
    deadline = time.monotonic() + timeout
    while subs.count() < expected and time.monotonic() < deadline:
        time.sleep(0.1)


def check(tally: Tally) -> None:
    """Stop the run when the server refused a publish: its figures would mean nothing."""
    if tally.first_error and tally.first_error.startswith("refused"):
        raise PublishRefused(tally.first_error)


@dataclass
class Window:
    """CPU of etherd, PostgreSQL, this process and everyone else over a measured window."""

    t0: float
    pids: tuple[int, ...]
    cpu0: list[float]
    procs0: dict[int, Any]

    @classmethod
    def start(cls, server: int, *load: int) -> Window:
        pids = (server, os.getpid(), *load)
        return cls(time.monotonic(), pids, [proc_cpu_s(p) for p in pids], all_procs())

    def finish(self) -> dict[str, Any]:
        procs1 = all_procs()
        elapsed = time.monotonic() - self.t0
        cpu = [proc_cpu_s(p) - c for p, c in zip(self.pids, self.cpu0, strict=True)]
        ours = set(self.pids)
        pg_s = named_cpu_s(procs1, "postgres") - named_cpu_s(self.procs0, "postgres")
        others = others_s(self.procs0, procs1, ours, skip=("postgres",), kernel=False)
        return {
            "window_s": round(elapsed, 3),
            "server_cpu_s": round(cpu[0], 3),
            "cpu_pct_of_one_core": {
                "etherd": round(100 * cpu[0] / elapsed, 1),
                "client": round(100 * sum(cpu[1:]) / elapsed, 1),
                "postgres": round(100 * pg_s / elapsed, 1),
                "others": round(100 * others / elapsed, 1),
            },
            "busiest_others": busiest(
                self.procs0, procs1, ours, elapsed, skip=("postgres",), kernel=False
            ),
        }


# -- runs ----------------------------------------------------------------------------------


@contextlib.contextmanager
def postgres(args: argparse.Namespace) -> Iterator[str]:
    """The PostgreSQL server to use: ``--pg-server``, or a throwaway cluster."""
    if args.pg_server:
        yield args.pg_server
        return
    with pg.throwaway_cluster(fsync=True) as url:
        yield url


def run_one(args: argparse.Namespace, pg_server: str, via: str, scenario: str) -> dict[str, Any]:
    """A fresh database and etherd, one scenario over one connection kind."""
    store = pg.fresh_database(pg_server, PG_DATABASE)
    server = start_etherd(cpu=args.server_cpu, store=store, overrides=args.set)
    try:
        quiet = wait_quiet(args.quiet_pct, args.quiet_timeout, [server.pid, os.getpid()])
        args.via_now = via
        measure = throughput if scenario == "throughput" else latency
        result = uvloop.run(measure(args, server))
    finally:
        server.stop()
        pg.drop_database(pg_server, PG_DATABASE)
    return {
        "scenario": scenario,
        "via": via,
        "depth": args.depth,
        "label": args.label,
        **result,
        "quiet_before": quiet.record(),
        "disturbed": result["cpu_pct_of_one_core"]["others"] > args.quiet_pct,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def summary(r: dict[str, Any]) -> str:
    """One line of a run's figures."""
    cpu = r["cpu_pct_of_one_core"]
    head = f"{r['scenario']:<10} via {r['via']:<4} depth {r['depth']}: "
    if r["scenario"] == "throughput":
        a = r["answer_ms"]
        text = (
            f"{r['events_per_s']:,.0f} events/s committed (server stored "
            f"{r['server_stored_per_s']:,.0f}/s), answer p50 {a['p50']} / p99 {a['p99']} ms, "
            f"rows per commit {r['batch_rows']['mean']}, {r['server_cpu_us_per_event']} µs "
            "etherd CPU per event"
        )
    else:
        d = r["delivery_ms"]
        text = (
            f"{r['rate_per_s']:g} events/s to {r['subscribers']} subscribers: delivered "
            f"{100 * (r['delivered_fraction'] or 0):.2f} %, p50 {d['p50']} / p99 {d['p99']} / "
            f"max {d['max']} ms"
        )
    return (
        head + text + f"; CPU % etherd {cpu['etherd']}, PostgreSQL {cpu['postgres']}, client "
        f"{cpu['client']}, others {cpu['others']}" + (" (DISTURBED)" if r["disturbed"] else "")
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--via", nargs="+", choices=["http", "ws"], default=["http"])
    parser.add_argument(
        "--scenarios",
        nargs="+",
        choices=["throughput", "latency"],
        default=["throughput", "latency"],
    )
    parser.add_argument("--depth", type=int, default=256, help="requests in flight at most")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=2.0, help="throughput: seconds before")
    parser.add_argument("--rate", type=float, default=1000.0, help="latency: events/s")
    parser.add_argument("--subscribers", type=int, default=100, help="latency: subscribers")
    parser.add_argument("--pad", type=int, default=200, help="filler bytes per event")
    parser.add_argument("--repeat", type=int, default=1)
    add_placement(parser)
    parser.add_argument("--pg-server", help="a PostgreSQL server URL (default: throwaway)")
    add_settings(parser)
    parser.add_argument("--quiet-pct", type=float, default=25.0)
    parser.add_argument("--quiet-timeout", type=float, default=120.0)
    add_output(parser)
    args = parser.parse_args(argv)
    pin(args.client_cpu)
    status = 0
    with postgres(args) as pg_server:
        info = {**machine_info(), "postgresql": pg.version(pg_server)}
        print("versions " + json.dumps(info), flush=True)
        for via in args.via:
            for scenario in args.scenarios:
                for _ in range(args.repeat):
                    try:
                        result = run_one(args, pg_server, via, scenario)
                    except PublishRefused as exc:
                        print(
                            f"{scenario} via {via}: the server refused the publish ({exc}). "
                            + (
                                "The WebSocket publish action (contract section 4) may not "
                                "be implemented by this etherd yet."
                                if via == "ws"
                                else ""
                            ),
                            file=sys.stderr,
                        )
                        status = 1
                        break
                    result["versions"] = info
                    print(summary(result), flush=True)
                    if args.json:
                        with open(args.json, "a", encoding="utf-8") as f:
                            f.write(json.dumps(result) + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
