"""Soak benchmark: mixed load against one etherd for a long run, sampled once a minute.

Run from the repository root::

    python -m bench.soak                        # 30 minutes, throwaway PostgreSQL cluster
    python -m bench.soak --minutes 2 --out-prefix soak-debug
    python -m bench.soak --store sqlite

What it does
------------
1. Starts a throwaway PostgreSQL cluster (``--store pg``, the default; fsync off) or uses
   SQLite, and ``etherd serve`` pinned to ``--server-cpu`` with HS256 tokens.
2. Connects ``--subscribers`` picows WebSocket subscribers, each on ``--topics-per-sub``
   of ``--topics`` topics, subscribed with ``since: 0`` before anything is published, so
   each must see every event of its topics from offset 1.
3. Runs, for ``--minutes``: an HTTP publisher (``POST /api/publish``) and a WebSocket
   publisher (the ``publish`` action), each at ``--rate`` events/s on random topics, every
   event carrying its ``time.monotonic_ns()`` at sending; churn: each second
   ``--churn-pct`` % of the subscribers drop their connection (half with a close frame,
   half abruptly) and come back after up to 0.5 s, resuming every topic with ``since``
   and the epoch of the first ack; ``--harnesses`` harnesses running the task loop over
   HTTP (the user creates a task, the harness claims it, heartbeats, reports
   ``--steps`` steps and submits).
4. Every ``--sample-s`` (60) it records the server's RSS and open descriptors
   (``/proc/PID/status``, ``/proc/PID/fd``), the event-loop lag over the window
   (``etherd_event_loop_lag_seconds`` from ``/metrics``: mean and the p99 bucket), the
   end-to-end p99 of live events received in the window (replayed events are counted
   apart), server CPU and the CPU other processes used (a shared machine).
5. At the end it stops the load, waits for every subscriber to reach the head of each
   of its topics, and checks the invariants: no gap, no duplicate, no unrecovered resume,
   every subscriber at the head of every topic, every harness task submitted.
6. Writes ``<out-prefix>.md`` (machine header, samples, verdicts), ``.jsonl`` (one line
   per sample and one summary line) and ``.png`` (RSS, fds, lag, p99 over time).

*Flat* means the least-squares slope over the last ``--flat-window-min`` minutes (10; the
whole run when shorter) is at most ``--rss-slope-mb`` MB/min (0.25) for RSS and
``--fd-slope`` descriptors/min (1.0) for fds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import jwt
import msgspec
import uvloop
from picows import WSCloseCode, WSMsgType, WSTransport, ws_connect

from bench.common import pg
from bench.common.cpu import all_procs, descendants, others_s, pin, proc_cpu_s, proc_status_kb
from bench.common.histogram import pct
from bench.common.machine import header_lines, machine_info
from bench.common.metrics import Scrape, scrape
from bench.common.server import ServerProcess, start_etherd
from bench.common.ws import TextListener
from etherd.client.api import Client
from etherd.client.errors import ApiError, TransportError
from etherd.client.harness import Harness

SECRET: Final = "soak-bench-secret-that-is-long-enough-for-hs256"
APP: Final = "soak"
RESULTS: Final = Path(__file__).resolve().parent / "results"
LAG_METRIC: Final = "etherd_event_loop_lag_seconds"

_decode = msgspec.json.Decoder().decode
_TEXT: Final = WSMsgType.TEXT


def token(sub: str, role: str) -> str:
    """A day-long HS256 token for the soak's secret."""
    claims = {"sub": sub, "role": role, "exp": int(time.time()) + 24 * 3600}
    return jwt.encode(claims, SECRET, algorithm="HS256")


# -- subscribers ---------------------------------------------------------------------------


@dataclass
class Tally:
    """What every subscriber saw, summed, plus the live latencies of the current window."""

    events: int = 0
    replayed: int = 0
    gaps: int = 0
    duplicates: int = 0
    reconnects: int = 0
    resumes_unrecovered: int = 0
    errors: int = 0
    connect_failures: int = 0
    window_ns: list[int] = field(default_factory=list)
    all_p99_ms: list[float] = field(default_factory=list)


class Subscriber:
    """One logical subscriber: its topics and the last offset seen of each, across any
    number of connections."""

    def __init__(self, index: int, topics: Sequence[str], url: str, tally: Tally) -> None:
        self.index = index
        self.topics = list(topics)
        self.url = url
        self.tally = tally
        self.last: dict[str, int] = dict.fromkeys(self.topics, 0)
        self.replay_upto: dict[str, int] = dict.fromkeys(self.topics, 0)
        self.epoch: str | None = None
        self.generation = 0
        self.transport: WSTransport | None = None
        self.acked: asyncio.Future[None] | None = None

    async def connect(self) -> None:
        """Open a connection and (re)subscribe with ``since`` = the last offsets seen."""
        self.generation += 1
        gen = self.generation
        loop = asyncio.get_running_loop()
        self.acked = loop.create_future()
        transport, _ = await ws_connect(lambda: _SubConn(self, gen), self.url)
        self.transport = transport
        command: dict[str, Any] = {
            "action": "subscribe",
            "topics": self.topics,
            "since": dict(self.last),
            "id": gen,
        }
        if self.epoch is not None:
            command["epoch"] = self.epoch
        transport.send(_TEXT, msgspec.json.encode(command))
        await asyncio.wait_for(self.acked, 30)

    def drop(self, graceful: bool) -> None:
        """Leave the current connection; its later frames are ignored."""
        self.generation += 1
        transport, self.transport = self.transport, None
        if transport is None:
            return
        if graceful:
            with contextlib.suppress(Exception):
                transport.send_close(WSCloseCode.OK)
        transport.disconnect()

    def on_frame(self, raw: bytes, now_ns: int) -> None:
        msg = _decode(raw)
        kind = msg.get("type")
        topic = msg.get("topic")
        offset = msg.get("offset")
        if kind == "subscribed":
            self._on_ack(msg)
            return
        if kind in ("error", "pong", "published", "unsubscribed") or offset is None:
            if kind == "error":
                self.tally.errors += 1
            return
        last = self.last.get(topic, -1) if isinstance(topic, str) else -1
        if last < 0:
            return
        if offset <= last:
            self.tally.duplicates += 1
            return
        if offset != last + 1:
            self.tally.gaps += 1
        self.last[topic] = offset
        if offset <= self.replay_upto[topic]:
            self.tally.replayed += 1
        else:
            self.tally.events += 1
            sent = msg.get("t")
            if isinstance(sent, int):
                self.tally.window_ns.append(now_ns - sent)

    def _on_ack(self, msg: dict[str, Any]) -> None:
        for entry in msg.get("topics", []):
            name = entry["topic"]
            self.replay_upto[name] = max(self.replay_upto.get(name, 0), int(entry["offset"]))
            if self.epoch is None:
                self.epoch = entry.get("epoch")
            if entry.get("recovered") is False:
                self.tally.resumes_unrecovered += 1
        if msg.get("errors"):
            self.tally.errors += len(msg["errors"])
        if self.acked is not None and not self.acked.done():
            self.acked.set_result(None)


class _SubConn(TextListener):
    """One connection of a ``Subscriber``; frames of a superseded connection are dropped."""

    def __init__(self, sub: Subscriber, generation: int) -> None:
        super().__init__()
        self.sub = sub
        self.generation = generation

    def on_text(self, raw: bytes, now_ns: int) -> None:
        if self.generation == self.sub.generation:
            self.sub.on_frame(raw, now_ns)


# -- load ----------------------------------------------------------------------------------


@dataclass
class Load:
    """Counters of the publishers and harnesses, and the head offset of every topic."""

    heads: dict[str, int] = field(default_factory=dict)
    http_published: int = 0
    ws_published: int = 0
    publish_errors: int = 0
    tasks_submitted: int = 0
    task_errors: int = 0
    steps: int = 0
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    def record(self, topic: str, offset: int | None) -> None:
        if offset is not None and offset > self.heads.get(topic, 0):
            self.heads[topic] = offset


async def paced(load: Load, rate: float, action: Any) -> None:
    """Call ``action()`` ``rate`` times a second on a fixed schedule until ``load.stop``."""
    interval = 1.0 / rate
    next_at = time.monotonic()
    while not load.stop.is_set():
        await action()
        next_at += interval
        delay = next_at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        elif delay < -1.0:
            next_at = time.monotonic()  # fell behind by a second: do not burst to catch up


async def http_publisher(url: str, topics: Sequence[str], rate: float, load: Load) -> None:
    """``POST /api/publish`` one event at a time at ``rate``/s."""
    rng = random.Random(1)
    async with Client(url, token("soak-http-pub", "service")) as client:

        async def one() -> None:
            topic = rng.choice(topics)
            try:
                done = await client.publish(topic, "soak", {"t": time.monotonic_ns(), "via": "h"})
            except (ApiError, TransportError):
                load.publish_errors += 1
                return
            load.http_published += 1
            load.record(topic, done.offset)

        await paced(load, rate, one)


class _WsPublisher(TextListener):
    def __init__(self, load: Load) -> None:
        super().__init__()
        self.load = load
        self.inflight = 0

    def on_text(self, raw: bytes, now_ns: int) -> None:
        msg = _decode(raw)
        if msg.get("type") == "published":
            self.inflight -= 1
            self.load.ws_published += 1
            self.load.record(msg["topic"], msg.get("offset"))
        elif msg.get("type") == "error":
            self.inflight -= 1
            self.load.publish_errors += 1


async def ws_publisher(ws_base: str, topics: Sequence[str], rate: float, load: Load) -> None:
    """The WebSocket ``publish`` action at ``rate``/s, replies awaited at the end."""
    rng = random.Random(2)
    url = f"{ws_base}?token={token('soak-ws-pub', 'service')}"
    transport, listener = await ws_connect(lambda: _WsPublisher(load), url)
    assert isinstance(listener, _WsPublisher)
    n = 0

    async def one() -> None:
        nonlocal n
        n += 1
        topic = rng.choice(topics)
        command = {
            "action": "publish",
            "topic": topic,
            "event": "soak",
            "data": {"t": time.monotonic_ns(), "via": "w"},
            "id": n,
        }
        listener.inflight += 1
        transport.send(_TEXT, msgspec.json.encode(command))

    await paced(load, rate, one)
    deadline = time.monotonic() + 30
    while listener.inflight > 0 and time.monotonic() < deadline:  # noqa: ASYNC110 (a count)
        await asyncio.sleep(0.05)
    transport.disconnect()


async def harness_loop(url: str, index: int, steps: int, load: Load) -> None:
    """A user creates a task, a harness claims it, reports ``steps`` steps and submits."""
    user = Client(url, token(f"soak-user-{index}", "user"))
    harness = Harness(url, token(f"soak-harness-{index}", "harness"), APP)
    try:
        while not load.stop.is_set():
            try:
                task = await user.create_task(f"soak task of harness {index}", title="soak")
                run = await harness.claim(task["task_id"])
                async with run:
                    for s in range(steps):
                        await run.step(f"step {s}", label=f"soak {index}")
                        load.steps += 1
                        await asyncio.sleep(0.05)
                    await run.heartbeat()
                    await run.result("submitted", agent_status="done", working_summary="soak")
                load.tasks_submitted += 1
            except (ApiError, TransportError):
                load.task_errors += 1
                await asyncio.sleep(1.0)
            await asyncio.sleep(0.2)
    finally:
        await user.close()
        await harness.close()


async def churn(subs: Sequence[Subscriber], pct_per_s: float, tally: Tally, load: Load) -> None:
    """Each second, drop ``pct_per_s`` % of the subscribers and bring them back resuming."""
    rng = random.Random(3)
    count = max(1, round(len(subs) * pct_per_s / 100))
    busy: set[int] = set()

    async def cycle(sub: Subscriber) -> None:
        sub.drop(graceful=rng.random() < 0.5)
        await asyncio.sleep(rng.uniform(0.0, 0.5))
        for attempt in range(10):
            try:
                await sub.connect()
                tally.reconnects += 1
                break
            except (OSError, TimeoutError):
                tally.connect_failures += 1
                sub.drop(graceful=False)
                await asyncio.sleep(0.2 * (attempt + 1))
        busy.discard(sub.index)

    pending: set[asyncio.Task[None]] = set()
    while not load.stop.is_set():
        for sub in rng.sample(list(subs), count):
            if sub.index in busy:
                continue
            busy.add(sub.index)
            task = asyncio.create_task(cycle(sub))
            pending.add(task)
            task.add_done_callback(pending.discard)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(load.stop.wait(), 1.0)
    if pending:
        await asyncio.gather(*pending)


# -- sampling ------------------------------------------------------------------------------


def fd_count(pid: int) -> int:
    """Open descriptors of a process (entries of /proc/PID/fd), or -1."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def lag_figures(before: Scrape, after: Scrape) -> dict[str, float | None]:
    """Event-loop lag over a window: mean, and the upper bound of the p99 and max buckets."""
    count = after.delta(before, f"{LAG_METRIC}_count")
    total = after.delta(before, f"{LAG_METRIC}_sum")
    cum_a = after.buckets.get(LAG_METRIC, {})
    cum_b = before.buckets.get(LAG_METRIC, {})
    p99: float | None = None
    top: float | None = None
    previous = 0.0
    for le, cum in cum_a.items():
        n = cum - cum_b.get(le, 0.0)
        if p99 is None and count > 0 and n >= 0.99 * count:
            p99 = float(le)
        if n > previous:
            top = float(le)
        previous = n
    return {
        "lag_mean_ms": round(1000 * total / count, 3) if count else None,
        "lag_p99_bucket_ms": None if p99 is None else 1000 * p99,
        "lag_max_bucket_ms": None if top is None else 1000 * top,
        "lag_last_ms": round(1000 * after.values.get("etherd_event_loop_lag_last_seconds", 0), 3),
    }


def slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ys over xs (0 for fewer than two points)."""
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    den = sum((x - mx) ** 2 for x in xs)
    return 0.0 if den == 0 else sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den


@dataclass
class Sampler:
    """Once-a-window readings of the server and the machine."""

    server: ServerProcess
    admin: str
    tally: Tally
    load: Load
    ours: set[int]
    postmaster: int | None
    samples: list[dict[str, Any]]
    started: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self._scrape = scrape(self.server.port, self.admin)
        self._procs = all_procs()
        self._t = time.monotonic()
        self._cpu = proc_cpu_s(self.server.pid)
        self._events = 0

    def sample(self) -> dict[str, Any]:
        now = time.monotonic()
        after = scrape(self.server.port, self.admin)
        procs = all_procs()
        cpu = proc_cpu_s(self.server.pid)
        window = now - self._t
        timed = window >= 1.0  # the first reading has no window
        # PostgreSQL forks a backend per connection: the store's processes are found anew.
        ours = self.ours | (set(descendants(self.postmaster)) if self.postmaster else set())
        lat = sorted(self.tally.window_ns)
        self.tally.window_ns = []
        p99 = round(pct(lat, 0.99), 2) if lat else None
        if p99 is not None:
            self.tally.all_p99_ms.append(p99)
        record: dict[str, Any] = {
            "kind": "sample",
            "minute": round((now - self.started) / 60, 2),
            "rss_mb": round(proc_status_kb(self.server.pid, "VmRSS") / 1024, 1),
            "fds": fd_count(self.server.pid),
            **lag_figures(self._scrape, after),
            "live_events": len(lat),
            "p50_ms": round(pct(lat, 0.5), 2) if lat else None,
            "p99_ms": p99,
            "max_ms": round(lat[-1] / 1e6, 2) if lat else None,
            "server_cpu_pct": round(100 * (cpu - self._cpu) / window, 1) if timed else None,
            "others_cpu_pct": round(100 * others_s(self._procs, procs, ours) / window, 1)
            if timed
            else None,
            "reconnects": self.tally.reconnects,
            "published": self.load.http_published + self.load.ws_published,
            "tasks": self.load.tasks_submitted,
        }
        self._scrape, self._procs, self._t, self._cpu = after, procs, now, cpu
        self.samples.append(record)
        return record


# -- the run -------------------------------------------------------------------------------


async def wait_caught_up(subs: Sequence[Subscriber], heads: dict[str, int], limit_s: float) -> int:
    """Wait until every subscriber is at the head of each of its topics; those that are not."""
    deadline = time.monotonic() + limit_s
    while True:
        behind = sum(
            1 for s in subs if any(s.last[t] < heads.get(t, 0) for t in s.topics)
        )  # fmt: skip
        if behind == 0 or time.monotonic() > deadline:
            return behind
        await asyncio.sleep(0.1)


async def drive(
    args: argparse.Namespace,
    server: ServerProcess,
    ours: set[int],
    samples: list[dict[str, Any]],
) -> dict[str, Any]:
    """Connect, load, sample into ``samples``, stop, check; the summary record."""
    topics = [f"soak/t{i}" for i in range(args.topics)]
    rng = random.Random(0)
    tally = Tally()
    load = Load()
    ws_base = f"ws://{server.host}:{server.port}/api/realtime"
    sub_url = f"{ws_base}?token={token('soak-sub', 'service')}"
    subs = [
        Subscriber(i, rng.sample(topics, args.topics_per_sub), sub_url, tally)
        for i in range(args.subscribers)
    ]
    for start in range(0, len(subs), 50):
        await asyncio.gather(*(s.connect() for s in subs[start : start + 50]))
    print(f"{len(subs)} subscribers connected", flush=True)

    admin = token("soak-admin", "admin")
    sampler = Sampler(server, admin, tally, load, ours, args.postmaster, samples)
    first = sampler.sample()
    print(json.dumps(first), flush=True)
    workers = [
        asyncio.create_task(http_publisher(server.http_url, topics, args.rate, load)),
        asyncio.create_task(ws_publisher(ws_base, topics, args.rate, load)),
        asyncio.create_task(churn(subs, args.churn_pct, tally, load)),
        *(
            asyncio.create_task(harness_loop(server.http_url, i, args.steps, load))
            for i in range(args.harnesses)
        ),
    ]
    end_at = time.monotonic() + 60 * args.minutes
    while time.monotonic() < end_at:
        await asyncio.sleep(min(args.sample_s, max(0.0, end_at - time.monotonic())))
        for w in workers:
            if w.done() and w.exception() is not None:
                raise RuntimeError("a load task failed") from w.exception()
        print(json.dumps(sampler.sample()), flush=True)
    load.stop.set()
    await asyncio.gather(*workers)
    behind = await wait_caught_up(subs, load.heads, 60)
    # The log's own view of each head, to check the publishers' answers against it.
    final_scrape = scrape(server.port, admin)
    for s in subs:
        s.drop(graceful=True)
    received = sum(s.last[t] for s in subs for t in s.topics)
    expected = sum(load.heads.get(t, 0) for s in subs for t in s.topics)
    published = load.http_published + load.ws_published
    return {
        "kind": "summary",
        "minutes": args.minutes,
        "store": args.store_kind,
        "subscribers": args.subscribers,
        "topics": args.topics,
        "topics_per_sub": args.topics_per_sub,
        "rate_per_publisher": args.rate,
        "churn_pct_per_s": args.churn_pct,
        "harnesses": args.harnesses,
        "published_http": load.http_published,
        "published_ws": load.ws_published,
        "publish_errors": load.publish_errors,
        "heads_total": sum(load.heads.values()),
        "published_total": published,
        "live_events": tally.events,
        "replayed_events": tally.replayed,
        "reconnects": tally.reconnects,
        "connect_failures": tally.connect_failures,
        "gaps": tally.gaps,
        "duplicates": tally.duplicates,
        "unrecovered_resumes": tally.resumes_unrecovered,
        "errors": tally.errors,
        "subscribers_behind": behind,
        "offsets_received": received,
        "offsets_expected": expected,
        "tasks_submitted": load.tasks_submitted,
        "task_errors": load.task_errors,
        "steps": load.steps,
        "store_rows": int(final_scrape.values.get("etherd_store_rows_total", 0)),
    }


def verdicts(args: argparse.Namespace, samples: list[dict[str, Any]]) -> dict[str, Any]:
    """RSS and fd slopes over the last window, and whether each is flat."""
    last = samples[-1]["minute"]
    window = [s for s in samples if s["minute"] >= last - args.flat_window_min]
    xs = [s["minute"] for s in window]
    rss_slope = slope(xs, [s["rss_mb"] for s in window])
    fd_slope = slope(xs, [s["fds"] for s in window])
    return {
        "flat_window_min": round(xs[-1] - xs[0], 2),
        "rss_slope_mb_per_min": round(rss_slope, 4),
        "fd_slope_per_min": round(fd_slope, 4),
        "rss_flat": rss_slope <= args.rss_slope_mb,
        "fds_flat": fd_slope <= args.fd_slope,
    }


def invariant_failures(summary: dict[str, Any]) -> list[str]:
    """Every broken invariant, in words (empty when all hold)."""
    keys = ("gaps", "duplicates", "unrecovered_resumes", "subscribers_behind", "errors")
    out = [f"{key}: {summary[key]}" for key in keys if summary[key]]
    if summary["offsets_received"] != summary["offsets_expected"]:
        out.append(
            f"offsets received {summary['offsets_received']} != {summary['offsets_expected']}"
        )
    if summary["published_total"] != summary["heads_total"]:
        out.append(
            f"published {summary['published_total']} != sum of topic heads "
            f"{summary['heads_total']} (offsets not contiguous)"
        )
    if summary["publish_errors"] or summary["task_errors"]:
        out.append(
            f"publish errors {summary['publish_errors']}, task errors {summary['task_errors']}"
        )
    return out


def fmt(value: Any) -> str:
    """A table cell."""
    return "-" if value is None else str(value)


def write_markdown(
    path: Path,
    machine: dict[str, Any],
    args: argparse.Namespace,
    pg_version: str | None,
    samples: list[dict[str, Any]],
    summary: dict[str, Any],
    verdict: dict[str, Any],
    failures: list[str],
    png: Path,
) -> None:
    """The result page."""
    first, last = samples[0], samples[-1]
    others = [s["others_cpu_pct"] for s in samples[1:] if s["others_cpu_pct"] is not None]
    noisy = [s for s in samples[1:] if (s["others_cpu_pct"] or 0) >= 5.0]
    p99s = [s["p99_ms"] for s in samples[1:] if s["p99_ms"] is not None]
    lags = [s["lag_p99_bucket_ms"] for s in samples[1:] if s["lag_p99_bucket_ms"] is not None]
    lines = [
        f"# Soak, {time.strftime('%Y-%m-%d')}: {args.minutes:g} minutes on {args.store_kind}",
        "",
        *header_lines(machine),
        f"- Store: {args.store_kind}" + (f", PostgreSQL {pg_version}" if pg_version else ""),
        f"- Server on core {args.server_cpu}, load on core {args.client_cpu}",
        "",
        "## Load",
        "",
        f"- {args.subscribers} WebSocket subscribers, {args.topics_per_sub} of {args.topics} "
        f"topics each; {args.churn_pct:g} % of them drop and resume with `since` each second "
        "(half with a close frame, half abruptly; back after up to 0.5 s)",
        f"- publishers: HTTP `POST /api/publish` and WebSocket `publish`, {args.rate:g} "
        "events/s each, one event per request, random topic (achieved: HTTP "
        f"{summary['published_http'] / (60 * args.minutes):.1f}/s, one request in flight; "
        f"WebSocket {summary['published_ws'] / (60 * args.minutes):.1f}/s)",
        f"- {args.harnesses} harnesses: create task (user), claim, {args.steps} steps, "
        "heartbeat, submit (harness), in a loop",
        "",
        "## Verdict",
        "",
        f"- RSS {first['rss_mb']} MB at the start, {last['rss_mb']} MB at the end; slope over "
        f"the last {verdict['flat_window_min']:g} minutes {verdict['rss_slope_mb_per_min']:+.3f}"
        f" MB/min (flat: <= {args.rss_slope_mb:g}): "
        f"**{'flat' if verdict['rss_flat'] else 'NOT flat'}**",
        f"- fds {first['fds']} at the start, {last['fds']} at the end; slope "
        f"{verdict['fd_slope_per_min']:+.3f}/min (flat: <= {args.fd_slope:g}): "
        f"**{'flat' if verdict['fds_flat'] else 'NOT flat'}**",
        f"- event-loop lag, p99 bucket per minute: {fmt(min(lags) if lags else None)}-"
        f"{fmt(max(lags) if lags else None)} ms",
        f"- end-to-end p99 per minute (live events): {fmt(min(p99s) if p99s else None)}-"
        f"{fmt(max(p99s) if p99s else None)} ms",
        f"- invariants: {'all held' if not failures else 'BROKEN: ' + '; '.join(failures)}",
        f"  ({summary['gaps']} gaps, {summary['duplicates']} duplicates, "
        f"{summary['unrecovered_resumes']} unrecovered resumes, {summary['reconnects']} "
        f"reconnects, {summary['subscribers_behind']} subscribers behind at the end)",
        "",
        "## Totals",
        "",
        f"- published {summary['published_total']} events (HTTP {summary['published_http']}, "
        f"WebSocket {summary['published_ws']}); topic heads sum to {summary['heads_total']}",
        f"- delivered live {summary['live_events']}, replayed on resume "
        f"{summary['replayed_events']}; offsets reached {summary['offsets_received']} of "
        f"{summary['offsets_expected']}",
        f"- {summary['tasks_submitted']} tasks submitted, {summary['steps']} steps, "
        f"{summary['task_errors']} task errors; {summary['publish_errors']} publish errors",
        "",
        "## Machine noise",
        "",
    ]
    if noisy:
        lines.append(
            f"Other processes used CPU during the run (other test suites on the shared "
            f"machine): {len(noisy)} of {len(samples) - 1} samples had >= 5 % of a core, "
            f"peak {max(others):g} %, mean {sum(others) / len(others):.1f} %. Latency and lag "
            "in those samples include that noise."
        )
    else:
        lines.append(
            "Other processes stayed under 5 % of a core in every sample"
            + (f" (peak {max(others):g} %)." if others else ".")
        )
    lines += [
        "",
        "## Samples",
        "",
        "| minute | RSS MB | fds | lag mean ms | lag p99 ms | live events | p50 ms | p99 ms "
        "| server CPU % | others CPU % | reconnects |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in samples:
        lines.append(
            f"| {s['minute']} | {s['rss_mb']} | {s['fds']} | {fmt(s['lag_mean_ms'])} | "
            f"{fmt(s['lag_p99_bucket_ms'])} | {s['live_events']} | {fmt(s['p50_ms'])} | "
            f"{fmt(s['p99_ms'])} | {fmt(s['server_cpu_pct'])} | {fmt(s['others_cpu_pct'])} | "
            f"{s['reconnects']} |"
        )
    lines += ["", f"![soak]({png.name})", ""]
    path.write_text("\n".join(lines))


def plot(path: Path, samples: list[dict[str, Any]], title: str) -> None:
    """RSS, fds, loop lag and end-to-end p99 over time, one panel each."""
    import matplotlib  # type: ignore[import-not-found, unused-ignore]

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # type: ignore[import-not-found, unused-ignore]

    minutes = [s["minute"] for s in samples]
    fig, axes = plt.subplots(4, 1, figsize=(8, 10), sharex=True)
    panels = [
        ("rss_mb", "server RSS (MB)"),
        ("fds", "server open fds"),
        ("lag_p99_bucket_ms", "loop lag p99 bucket (ms)"),
        ("p99_ms", "end-to-end p99 (ms)"),
    ]
    for ax, (key, label) in zip(axes, panels, strict=True):
        values = [math.nan if s[key] is None else s[key] for s in samples]
        ax.plot(minutes, values, marker="o", markersize=3)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if key in ("rss_mb", "fds"):
            ax.set_ylim(bottom=0)
    axes[-1].set_xlabel("minute")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--store", default="pg", help="pg (throwaway cluster), sqlite, or a URL")
    p.add_argument("--subscribers", type=int, default=500)
    p.add_argument("--topics", type=int, default=50)
    p.add_argument("--topics-per-sub", type=int, default=3)
    p.add_argument("--rate", type=float, default=50.0, help="events/s of each publisher")
    p.add_argument("--churn-pct", type=float, default=2.0, help="%% of subscribers per second")
    p.add_argument("--harnesses", type=int, default=3)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--sample-s", type=float, default=60.0)
    p.add_argument("--flat-window-min", type=float, default=10.0)
    p.add_argument("--rss-slope-mb", type=float, default=0.25, help="flat RSS: MB/min at most")
    p.add_argument("--fd-slope", type=float, default=1.0, help="flat fds: per minute at most")
    p.add_argument("--server-cpu", type=int, default=0)
    p.add_argument("--client-cpu", type=int, default=1)
    p.add_argument(
        "--out-prefix", type=Path, help="results path without suffix (bench/results/soak-DATE)"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the soak and write its results; 1 if an invariant broke or RSS/fds grew."""
    args = parse_args(argv)
    prefix: Path = args.out_prefix or RESULTS / f"soak-{time.strftime('%Y-%m-%d')}"
    prefix.parent.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    pin(args.client_cpu)
    with contextlib.ExitStack() as stack:
        pg_version: str | None = None
        args.postmaster = None
        if args.store == "pg":
            server_url = stack.enter_context(pg.throwaway_cluster(fsync=False))
            store = pg.fresh_database(server_url, "etherd_soak")
            pg_version = pg.version(server_url)
            args.postmaster = pg.postmaster_pid(server_url)
            args.store_kind = "PostgreSQL (throwaway cluster, fsync off)"
        elif args.store == "sqlite":
            store = None
            args.store_kind = "SQLite"
        else:
            store = args.store
            args.store_kind = "PostgreSQL" if store.startswith("postgres") else store
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="soak-")))
        server = start_etherd(
            cpu=args.server_cpu,
            store=store,
            workdir=work,
            settings={
                "auth": {"secret": SECRET, "dev": False},
                "tasks": {"lease_s": 120.0},
                "log": {"level": "warning"},
            },
        )
        stack.callback(server.stop)
        ours = {os.getpid(), server.pid}
        samples: list[dict[str, Any]] = []
        try:
            summary = uvloop.run(drive(args, server, ours, samples))
        except BaseException:
            print(server.log_tail(), file=sys.stderr)
            raise
    verdict = verdicts(args, samples)
    failures = invariant_failures(summary)
    summary.update(verdict)
    summary["invariants_held"] = not failures
    summary["machine"] = machine
    with prefix.with_suffix(".jsonl").open("w") as f:
        for s in samples:
            f.write(json.dumps(s) + "\n")
        f.write(json.dumps(summary) + "\n")
    png = prefix.with_suffix(".png")
    plot(png, samples, f"etherd soak, {args.minutes:g} min, {args.store_kind}")
    md = prefix.with_suffix(".md")
    write_markdown(md, machine, args, pg_version, samples, summary, verdict, failures, png)
    print(
        f"RSS {samples[0]['rss_mb']} -> {samples[-1]['rss_mb']} MB, slope "
        f"{verdict['rss_slope_mb_per_min']:+.3f} MB/min: "
        f"{'flat' if verdict['rss_flat'] else 'NOT flat'}; fds {samples[0]['fds']} -> "
        f"{samples[-1]['fds']}, slope {verdict['fd_slope_per_min']:+.3f}/min: "
        f"{'flat' if verdict['fds_flat'] else 'NOT flat'}"
    )
    print("invariants: " + ("all held" if not failures else "BROKEN: " + "; ".join(failures)))
    print(f"wrote {md}")
    ok = not failures and verdict["rss_flat"] and verdict["fds_flat"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
