"""Durable publish benchmark: throughput and latency of ``POST /api/publish`` on both stores.

Run from the repository root::

    python bench/publish.py --stores sqlite pg --scenarios batch single latency \\
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
import importlib.metadata
import importlib.util
import json
import math
import multiprocessing
import os
import platform
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Final, NamedTuple, cast

import asyncpg
import uvloop
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

ROOT: Final = Path(__file__).resolve().parents[1]
TOKEN: Final = "test"  # etherd's development token (loopback listener, auth.dev = true)
PG_SERVER: Final = "postgresql://postgres@127.0.0.1:5432"
PG_DATABASE: Final = "etherd_bench_publish"
CLK_TCK: Final = os.sysconf("SC_CLK_TCK")
TARGET_BATCH_EVENTS_PER_S: Final = 100_000
TARGET_SINGLE_PER_S: Final = 20_000
TARGET_LATENCY_P99_MS: Final = 10.0
LAT_EVENT: Final = "lat"
LAT_PREFIX: Final = b'{"type":"lat"'
SUBSCRIBED_PREFIX: Final = b'{"type":"subscribed"'


# -- /proc ---------------------------------------------------------------------------------


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads), from /proc/PID/stat."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return math.nan
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class Proc(NamedTuple):
    name: str
    cpu_s: float
    # Start time in clock ticks since boot: a pid seen twice with the same start is the same
    # process (kernel workers change their command name with the work they do).
    start: int


def all_procs() -> dict[int, Proc]:
    """Every process: pid -> (command name, CPU seconds, start time)."""
    out: dict[int, Proc] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            text = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        name = text[text.index("(") + 1 : text.rindex(")")]
        if name.startswith("kworker/"):
            name = "kworker"
        cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK
        out[int(entry.name)] = Proc(name, cpu, int(fields[19]))
    return out


def _used(before: dict[int, Proc], pid: int, now: Proc) -> float:
    """CPU seconds a process used since ``before`` (all of it if it started since)."""
    then = before.get(pid)
    return now.cpu_s - then.cpu_s if then is not None and then.start == now.start else now.cpu_s


def busiest(
    before: dict[int, Proc],
    after: dict[int, Proc],
    ours: set[int],
    seconds: float,
    skip: str = "",
) -> list[tuple[str, float]]:
    """The four command names (not ours) that used the most CPU, in % of one core."""
    per: dict[str, float] = {}
    for pid, proc in after.items():
        if pid in ours or proc.name == skip:
            continue
        per[proc.name] = per.get(proc.name, 0.0) + _used(before, pid, proc)
    top = sorted(per.items(), key=lambda item: -item[1])[:4]
    return [(n, round(100 * c / seconds, 1)) for n, c in top if c > 0]


def others_s(
    before: dict[int, Proc], after: dict[int, Proc], ours: set[int], skip: str = ""
) -> float:
    """CPU seconds used between two ``all_procs`` scans by processes not in ``ours`` (and
    not named ``skip``); a process that started in between counts in full."""
    return sum(
        _used(before, pid, proc)
        for pid, proc in after.items()
        if pid not in ours and proc.name != skip
    )


def cpu_busy() -> dict[str, tuple[float, float, float]]:
    """Per CPU line of /proc/stat (``cpu``, ``cpu0``, ...): seconds of (user + nice +
    system, irq + softirq, steal).

    Loopback TCP work is largely booked as softirq rather than to a process, so the second
    figure belongs to whoever sends and receives; steal is time the hypervisor gave to
    other guests.
    """
    out: dict[str, tuple[float, float, float]] = {}
    with open("/proc/stat") as f:
        for line in f:
            if not line.startswith("cpu"):
                break
            name, *values = line.split()
            v = [int(x) for x in values]
            out[name] = ((v[0] + v[1] + v[2]) / CLK_TCK, (v[5] + v[6]) / CLK_TCK, v[7] / CLK_TCK)
    return out


@dataclass
class Quiet:
    """What other processes did just before a measured window."""

    others_pct: float
    waited_s: float
    quiet: bool
    loadavg: str
    busiest: list[tuple[str, float]]


def wait_quiet(max_pct: float, timeout: float, ours: Sequence[int]) -> Quiet:
    """Wait until processes other than ``ours`` use under ``max_pct`` % of one core for two
    one-second readings running (at most ``timeout`` s); report the last reading."""
    started = time.monotonic()
    calm = 0
    mine = set(ours)
    while True:
        p0, t0 = all_procs(), time.monotonic()
        time.sleep(1.0)
        p1, t1 = all_procs(), time.monotonic()
        pct = 100 * others_s(p0, p1, mine) / (t1 - t0)
        top = busiest(p0, p1, mine, t1 - t0)
        calm = calm + 1 if pct < max_pct else 0
        waited = time.monotonic() - started
        if calm >= 2 or waited > timeout:
            return Quiet(
                round(pct, 1),
                round(waited, 1),
                calm >= 2,
                Path("/proc/loadavg").read_text().strip(),
                top,
            )


def calibrate(cpu: int) -> float:
    """Milliseconds a fixed pure-Python workload takes on core ``cpu`` (best of three).

    The cores of a shared VM do not run at one speed: the same code has taken 25 % more CPU
    per event from one run to the next with nothing else running in the guest. Figures
    per event (and throughput of a CPU-bound run) compare only at similar calibrations.
    """
    with contextlib.suppress(OSError, AttributeError):
        before = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {cpu})
        try:
            best = math.inf
            for _ in range(3):
                started = time.perf_counter()
                table: dict[int, int] = {}
                for i in range(200_000):
                    table[i & 1023] = i * 2 + len(str(i))
                best = min(best, time.perf_counter() - started)
        finally:
            os.sched_setaffinity(0, before)
        return round(best * 1000, 2)
    return math.nan


# -- the server ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    port: int
    workdir: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return (self.workdir / "etherd.log").read_text()[-3000:]
        return ""


def _toml_value(value: str) -> str:
    """A TOML value for a ``key=value`` override: numbers and booleans as they are."""
    if re.fullmatch(r"-?[0-9]+(\.[0-9]+)?|true|false", value):
        return value
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def start_server(store: str, cpu: int, workdir: Path, overrides: Sequence[str]) -> Server:
    """Start ``python -m etherd serve`` pinned to ``cpu``; return once /readyz answers.

    ``overrides`` are ``section.key=value`` settings added to the generated file.
    """
    port = free_port()
    sections: dict[str, dict[str, str]] = {
        "server": {
            "host": json.dumps("127.0.0.1"),
            "port": str(port),
            "data_dir": json.dumps(str(workdir / "data")),
        },
        "auth": {"dev": "true"},
        "store": {"url": json.dumps(store)},
        # Idle load connections wait through the quiet check, which may take minutes.
        "http": {"max_body_bytes": str(8 * 1024 * 1024), "keepalive_timeout_s": "3600.0"},
        "log": {"level": json.dumps("warning")},
    }
    for item in overrides:
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        if not (section and name and value):
            raise SystemExit(f"--set wants section.key=value, got {item!r}")
        sections.setdefault(section, {})[name] = _toml_value(value)
    lines: list[str] = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {v}" for k, v in values.items()]
    path = workdir / "etherd.toml"
    path.write_text("\n".join(lines) + "\n")
    log = (workdir / "etherd.log").open("ab")
    command = [sys.executable, "-m", "etherd", "serve", "--config", str(path)]
    if shutil.which("taskset"):
        command = ["taskset", "-c", str(cpu), *command]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETHERD_")}
    proc = subprocess.Popen(command, stdout=log, stderr=log, cwd=workdir, env=env)
    server = Server(proc, port, workdir)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"etherd exited: {server.log_tail()}")
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r,
        ):
            if r.status == 200:
                return server
        time.sleep(0.1)
    server.stop()
    raise RuntimeError("etherd did not become ready in 60 s")


@dataclass
class Scrape:
    """The samples of one ``/metrics`` answer that this benchmark reads."""

    values: dict[str, float] = field(default_factory=dict)
    # le -> cumulative count of etherd_store_batch_rows
    batch_buckets: dict[str, float] = field(default_factory=dict)


def scrape(port: int) -> Scrape:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    with urllib.request.urlopen(request, timeout=30) as resp:
        text = resp.read().decode()
    out = Scrape()
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value_text = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        try:
            value = float(value_text)
        except ValueError:
            continue
        if name == "etherd_store_batch_rows_bucket":
            m = re.search(r'le="([^"]+)"', name_labels)
            if m:
                out.batch_buckets[m.group(1)] = value
            continue
        if name.endswith("_bucket"):
            continue
        m = re.search(r'route="([^"]+)"', name_labels)
        if m:
            name = f"{name}|{m.group(1)}"
        out.values[name] = out.values.get(name, 0.0) + value
    return out


def batch_sizes(before: Scrape, after: Scrape) -> dict[str, Any]:
    """Group-commit batch sizes over a window, from the histogram and the counters."""
    commits = after.values.get("etherd_store_batch_rows_count", 0.0) - before.values.get(
        "etherd_store_batch_rows_count", 0.0
    )
    rows = after.values.get("etherd_store_batch_rows_sum", 0.0) - before.values.get(
        "etherd_store_batch_rows_sum", 0.0
    )
    # Per-bucket counts (le -> commits in (previous le, le]).
    buckets: dict[str, int] = {}
    previous = 0.0
    for le, total in after.batch_buckets.items():
        n = total - before.batch_buckets.get(le, 0.0)
        if n - previous > 0:
            buckets[le] = int(n - previous)
        previous = n

    def quantile(q: float) -> str | None:
        if commits <= 0:
            return None
        want = q * commits
        seen = 0.0
        for le, total in after.batch_buckets.items():
            seen = total - before.batch_buckets.get(le, 0.0)
            if seen >= want:
                return f"<= {le}"
        return None

    return {
        "commits": int(commits),
        "rows": int(rows),
        "mean_rows": round(rows / commits, 1) if commits else None,
        "p50_bucket": quantile(0.5),
        "p90_bucket": quantile(0.9),
        "histogram": buckets,
    }


async def fresh_pg_database(server: str) -> str:
    """Drop and create the benchmark's database; its URL."""
    con = await asyncpg.connect(f"{server}/postgres")
    try:
        await con.execute(f"DROP DATABASE IF EXISTS {PG_DATABASE} WITH (FORCE)")
        await con.execute(f"CREATE DATABASE {PG_DATABASE}")
    finally:
        await con.close()
    return f"{server}/{PG_DATABASE}"


async def drop_pg_database(server: str) -> None:
    con = await asyncpg.connect(f"{server}/postgres")
    try:
        await con.execute(f"DROP DATABASE IF EXISTS {PG_DATABASE} WITH (FORCE)")
    finally:
        await con.close()


async def pg_version(server: str) -> str:
    con = await asyncpg.connect(f"{server}/postgres")
    try:
        version: str = await con.fetchval("SHOW server_version")
        settings = await con.fetch(
            "SELECT name, setting, unit FROM pg_settings WHERE name IN ('fsync',"
            " 'synchronous_commit', 'shared_buffers', 'wal_sync_method', 'commit_delay',"
            " 'max_wal_size') ORDER BY name"
        )
    finally:
        await con.close()
    return version + " (" + ", ".join(f"{r[0]}={r[1]}{r[2] or ''}" for r in settings) + ")"


# -- load: HTTP ----------------------------------------------------------------------------


@dataclass
class Window:
    """Monotonic-ns instants shared by every process: load runs from ``go`` to ``stop``;
    only what completes in [``start``, ``end``) is measured."""

    go: int
    start: int
    end: int
    stop: int


class HttpClient(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection with at most one request in flight."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.need = -1  # bytes of the whole response being read, once its head is in
        self.sent_ns = 0
        self.busy = False
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)
        if self.busy:
            self.busy = False
            self.answered(0, time.monotonic_ns())

    def send(self, request: bytes) -> None:
        assert self.transport is not None and not self.busy
        self.busy = True
        self.sent_ns = time.monotonic_ns()
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if self.need < 0:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end]).lower()
            at = head.find(b"\r\ncontent-length:")
            length = 0
            if at >= 0:
                stop = head.find(b"\r\n", at + 2)
                length = int(head[at + 17 : stop if stop >= 0 else len(head)])
            self.need = end + 4 + length
        if len(buf) < self.need:
            return
        status = int(buf[9:12])
        del buf[: self.need]
        self.need = -1
        self.busy = False
        self.answered(status, time.monotonic_ns())

    def answered(self, status: int, now: int) -> None:
        """One response arrived (status 0: the connection was lost)."""

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def post(path: bytes, body: bytes) -> bytes:
    return (
        b"POST %s HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer %s\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
        % (path, TOKEN.encode(), len(body), body)
    )


@dataclass
class LoadTally:
    """What one load process measured inside the window."""

    ok: int = 0
    events: int = 0
    errors: Counter[int] = field(default_factory=Counter)
    latency_ns: array.array[int] = field(default_factory=lambda: array.array("q"))


class ClosedLoop(HttpClient):
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

    def answered(self, status: int, now: int) -> None:
        w = self.window
        if w.start <= now < w.end:
            t = self.tally
            if status == 200:
                t.ok += 1
                t.events += self.events
                t.latency_ns.append(now - self.sent_ns)
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


class PoolConn(HttpClient):
    def __init__(self, publisher: Publisher) -> None:
        super().__init__()
        self.publisher = publisher
        self.due = 0

    def answered(self, status: int, now: int) -> None:
        self.publisher.answered(self, status, now)


class Publisher:
    """Open loop: event ``i`` is due at ``go + i / rate``, whatever answers are pending."""

    def __init__(self, params: dict[str, Any], window: Window) -> None:
        self.window = window
        self.topics = [f"bench/lat/{k}" for k in range(params["topics"])]
        self.interval_ns = round(1e9 / params["rate"])
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
        w = self.window
        seq = 0
        while True:
            now = time.monotonic_ns()
            due = w.go + seq * self.interval_ns
            while due <= now and due < w.stop:
                self.submit(seq, due)
                seq += 1
                due = w.go + seq * self.interval_ns
            if due >= w.stop:
                return
            await asyncio.sleep((due - time.monotonic_ns()) / 1e9)


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


class Subscriber(WSListener):
    def __init__(self, tally: SubTally, window: Window) -> None:
        super().__init__()
        self.tally = tally
        self.window = window
        self.transport: WSTransport | None = None
        self.acked: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.last: dict[bytes, int] = {}

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type is not WSMsgType.TEXT:
            return
        now = time.monotonic_ns()
        raw = frame.get_payload_as_bytes()
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
        assert sub.transport is not None
        command = {"action": "subscribe", "topics": topics, "id": i}
        sub.transport.send(WSMsgType.TEXT, json.dumps(command).encode())
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


def pct(values: Sequence[int], q: float) -> float:
    """The q-quantile (nearest rank) of nanosecond values, in milliseconds."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))] / 1e6


def summary_ms(values: Sequence[int]) -> dict[str, float]:
    return {
        "p50": round(pct(values, 0.5), 3),
        "p90": round(pct(values, 0.9), 3),
        "p99": round(pct(values, 0.99), 3),
        "p999": round(pct(values, 0.999), 3),
        "max": round(pct(values, 1.0), 3),
        "count": len(values),
    }


@dataclass
class Snapshot:
    at_ns: int
    server_cpu: float
    loads_cpu: list[float]
    own_cpu: float
    procs: dict[int, Proc]
    busy: dict[str, tuple[float, float, float]]
    metrics: Scrape


def snapshot(server: Server, loads: Sequence[Load]) -> Snapshot:
    return Snapshot(
        time.monotonic_ns(),
        proc_cpu_s(server.pid),
        [proc_cpu_s(load.proc.pid or 0) for load in loads],
        time.process_time(),
        all_procs(),
        cpu_busy(),
        scrape(server.port),
    )


def start_py_spy(pid: int, output: Path, rate: int, native: bool) -> subprocess.Popen[bytes]:
    command = ["py-spy", "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw"]
    command += ["--output", str(output)]
    command += ["--native"] if native else ["--nonblocking"]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def summarize_profile(path: Path, top: int = 30) -> str:
    """Top functions by own and by total samples from a ``py-spy --format raw`` file."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if f]
        if not frames:
            continue
        samples += count
        own[_short(frames[-1])] += count
        for name in {_short(f) for f in frames}:
            total[name] += count
    if not samples:
        return "py-spy: no samples"
    lines = [f"py-spy: {samples} samples", "", "own time:"]
    lines += [f"  {100 * c / samples:5.1f}%  {name}" for name, c in own.most_common(top)]
    lines += ["", "total time (function and what it calls):"]
    lines += [f"  {100 * c / samples:5.1f}%  {name}" for name, c in total.most_common(top)]
    return "\n".join(lines)


def _short(frame: str) -> str:
    """``func (path/to/file.py:12)`` -> ``func (file.py)``: lines merged per function."""
    m = re.match(r"^(.*) \((.*?):\d+\)$", frame)
    if not m:
        return frame
    return f"{m.group(1)} ({m.group(2).rsplit('/', 1)[-1]})"


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
        store = asyncio.run(fresh_pg_database(args.pg_server))
    else:
        store = f"sqlite:///{workdir / 'etherd.db'}"
    server: Server | None = None
    loads: list[Load] = []
    try:
        server = start_server(store, args.server_cpu, workdir, args.set)
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
            spy = start_py_spy(server.pid, args.py_spy, args.py_spy_rate, args.py_spy_native)
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
            asyncio.run(drop_pg_database(args.pg_server))
        shutil.rmtree(workdir, ignore_errors=True)
    figures["store"] = "postgresql" if store_kind == "pg" else "sqlite"
    figures["calibration_ms_server_core"] = {"before": speed, "after": calibrate(args.server_cpu)}
    figures["quiet_before"] = {
        "others_pct_of_a_core": quiet.others_pct,
        "quiet": quiet.quiet,
        "waited_s": quiet.waited_s,
        "loadavg": quiet.loadavg,
        "busiest_others": quiet.busiest,
    }
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
        _used(s0.procs, pid, proc) for pid, proc in s1.procs.items() if proc.name == "postgres"
    )
    busy = {
        k: tuple(b - a for a, b in zip(s0.busy[k], s1.busy[k], strict=True))
        for k in s1.busy
        if k in s0.busy
    }
    others = others_s(s0.procs, s1.procs, ours, skip="postgres")
    m0, m1 = s0.metrics.values, s1.metrics.values

    def delta(name: str) -> float:
        return m1.get(name, 0.0) - m0.get(name, 0.0)

    commit_s = delta("etherd_store_commit_duration_seconds_sum")
    commits = delta("etherd_store_commit_duration_seconds_count")
    stored = delta("etherd_store_rows_total")
    route = "/api/publish"
    handler_s = delta(f"etherd_http_request_duration_seconds_sum|{route}")
    handler_n = delta(f"etherd_http_request_duration_seconds_count|{route}")
    out: dict[str, Any] = {
        "scenario": scenario,
        "label": args.label,
        "settings": list(args.set),
        "window_s": round(elapsed, 3),
        "server": {
            "events_stored": int(stored),
            "events_stored_per_s": round(stored / elapsed, 1),
            "publish_handler_ms_mean": round(1000 * handler_s / handler_n, 3)
            if handler_n
            else None,
            "commit": {
                "commits": int(commits),
                "mean_ms": round(1000 * commit_s / commits, 3) if commits else None,
                "busy_pct_of_window": round(100 * commit_s / elapsed, 1),
            },
            "batch_rows": batch_sizes(s0.metrics, s1.metrics),
            "store_errors": int(delta("etherd_store_errors_total")),
            "loop_lag_max_s_last": m1.get("etherd_event_loop_lag_last_seconds"),
        },
        "cpu_pct_of_one_core": {
            "etherd": round(100 * server_cpu / elapsed, 1),
            "load_processes": [round(100 * c / elapsed, 1) for c in loads_cpu],
            "load_total": round(100 * sum(loads_cpu) / elapsed, 1),
            "bench_main": round(100 * own_cpu / elapsed, 1),
            "postgres": round(100 * pg_cpu / elapsed, 1),
            "others": round(100 * others / elapsed, 1),
            "busiest_others": busiest(s0.procs, s1.procs, ours, elapsed, skip="postgres"),
        },
        "disturbed": 100 * others / elapsed > args.quiet_pct,
        # Per core: process time (user + system), irq + softirq, steal; % of the window.
        "core_pct": {
            k: {
                "task": round(100 * v[0] / elapsed, 1),
                "irq": round(100 * v[1] / elapsed, 1),
                "steal": round(100 * v[2] / elapsed, 1),
                "idle": round(100 - 100 * sum(v) / elapsed, 1),
            }
            for k, v in sorted(busy.items())
            if k != "cpu"
        },
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


# -- versions and report -------------------------------------------------------------------


def versions(pg_server: str | None) -> dict[str, str]:
    out = {
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "kernel": platform.release(),
        "cpu": _cpu_model(),
        "cpus": str(os.cpu_count()),
    }
    for package in ("etherd", "uvloop", "picows", "msgspec", "asyncpg", "httptools"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[package] = importlib.metadata.version(package)
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "etherd"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.split()
        changed = sorted({p for p in dirty if p.startswith("etherd/")})
        out["etherd_commit"] = commit + (f" (uncommitted: {', '.join(changed)})" if dirty else "")
    # The server is started with this interpreter and environment, so it runs the etherd
    # this process would import: the repository's, or a scratch copy named by PYTHONPATH.
    spec = importlib.util.find_spec("etherd")
    origin = Path(spec.origin).resolve() if spec is not None and spec.origin else None
    out["etherd_source"] = (
        "repository" if origin is not None and origin.is_relative_to(ROOT) else "other copy"
    )
    if pg_server is not None:
        out["postgresql"] = asyncio.run(pg_version(pg_server))
    return out


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


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
    lines += [
        f"group commit       {srv['commit']['commits']} commits, {srv['commit']['mean_ms']} ms "
        f"each, pipeline busy {srv['commit']['busy_pct_of_window']} %; rows per commit mean "
        f"{batches['mean_rows']}, p50 {batches['p50_bucket']}, p90 {batches['p90_bucket']}",
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
    parser.add_argument("--server-cpu", type=int, default=0)
    parser.add_argument("--client-cpu", type=int, default=1)
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
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="an etherd setting for the run, e.g. store.batch_max_rows=10000",
    )
    parser.add_argument("--pg-server", default=PG_SERVER, help="PostgreSQL server, no database")
    parser.add_argument("--keep-db", action="store_true", help="keep the PostgreSQL database")
    parser.add_argument("--py-spy", type=Path, help="record the server into this raw profile")
    parser.add_argument("--py-spy-rate", type=int, default=200, help="samples per second")
    parser.add_argument("--py-spy-native", action="store_true", help="include C frames")
    parser.add_argument("--label", default="", help="a name for this run in the JSON line")
    parser.add_argument("--json", type=Path, help="append one JSON line per run")
    parser.add_argument("--quiet-pct", type=float, default=25.0)
    parser.add_argument("--quiet-timeout", type=float, default=180.0)
    args = parser.parse_args(argv)

    with contextlib.suppress(OSError, AttributeError):
        os.sched_setaffinity(0, {args.client_cpu})
    info = versions(args.pg_server if "pg" in args.stores else None)
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
