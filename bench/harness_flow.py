"""Harness-flow benchmark: many simulated harnesses against one etherd, with a WebSocket
subscriber on every task.

Run from the repository root::

    python bench/harness_flow.py                     # SQLite in a temporary directory
    python bench/harness_flow.py --store pg          # (re)creates etherd_bench on 127.0.0.1
    python bench/harness_flow.py --store postgresql://postgres@127.0.0.1:5432/etherd_bench
    python bench/harness_flow.py --store pg --py-spy profile.txt   # profile the server

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
import contextlib
import importlib.metadata
import json
import math
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
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, cast
from urllib.parse import urlsplit

import asyncpg
import jwt
import msgspec
import uvloop
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

ROOT: Final = Path(__file__).resolve().parents[1]
SECRET: Final = "harness-flow-bench-secret-long-enough-for-hs256"
APP: Final = "bench"
PG_SERVER: Final = "postgresql://postgres@127.0.0.1:5432"
PG_DATABASE: Final = "etherd_bench"
TARGET_STEPS_PER_S: Final = 5_000
TARGET_P99_MS: Final = 15.0
CLK_TCK: Final = os.sysconf("SC_CLK_TCK")
STEP_PREFIX: Final = b'{"type":"os.harness.step"'
DELIVERED_PREFIX: Final = b'{"type":"task.delivered"'
SUBSCRIBED_PREFIX: Final = b'{"type":"subscribed"'
MESSAGE_MARK: Final = b'"user_message":"'


# -- tokens --------------------------------------------------------------------------------


def token(sub: str, role: str) -> str:
    return jwt.encode(
        {"sub": sub, "role": role, "exp": int(time.time()) + 24 * 3600}, SECRET, algorithm="HS256"
    )


# -- /proc ---------------------------------------------------------------------------------


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, from /proc/PID/stat."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return math.nan
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu_of_named(name: str) -> float:
    """CPU seconds of every process whose command name is ``name`` (e.g. ``postgres``)."""
    total = 0.0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            text = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        if text[text.index("(") + 1 : text.rindex(")")] != name:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        total += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return total


def machine_busy_s() -> float:
    """Busy CPU seconds of the whole machine: user + nice + system + irq + softirq.

    Interrupt time is included because a process's own system time may contain the
    softirq work done in its context (loopback TCP), which /proc/stat books as softirq.
    """
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (v[0] + v[1] + v[2] + v[5] + v[6]) / CLK_TCK


def wait_quiet(max_pct: float, timeout: float, ours: Sequence[int]) -> float:
    """Wait until other processes use under ``max_pct`` % of one core for 2 s running.

    Returns the last one-second reading (% of one core used by others).
    """
    deadline = time.monotonic() + timeout
    calm = 0
    pct = math.nan
    while True:
        b0, o0, t0 = machine_busy_s(), sum(proc_cpu_s(p) for p in ours), time.monotonic()
        time.sleep(1.0)
        b1, o1, t1 = machine_busy_s(), sum(proc_cpu_s(p) for p in ours), time.monotonic()
        pct = 100 * ((b1 - b0) - (o1 - o0)) / (t1 - t0)
        calm = calm + 1 if pct < max_pct else 0
        if calm >= 2 or time.monotonic() > deadline:
            return pct


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
    store: str

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _toml(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def start_server(store: str, cpu: int, workdir: Path, harnesses: int) -> Server:
    port = free_port()
    config = "\n".join(
        [
            "[server]",
            'host = "127.0.0.1"',
            f"port = {port}",
            f"data_dir = {_toml(str(workdir / 'data'))}",
            "[auth]",
            f"secret = {_toml(SECRET)}",
            "dev = false",
            "[store]",
            f"url = {_toml(store)}",
            "[tasks]",
            "lease_s = 600.0",
            "[log]",
            'level = "warning"',
            "[ws]",
            f"max_connections_per_subject = {max(10_000, harnesses * 2)}",
            "",
        ]
    )
    path = workdir / "etherd.toml"
    path.write_text(config)
    log = (workdir / "etherd.log").open("ab")
    command = [sys.executable, "-m", "etherd", "serve", "--config", str(path)]
    if shutil.which("taskset"):
        command = ["taskset", "-c", str(cpu), *command]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETHERD_")}
    proc = subprocess.Popen(command, stdout=log, stderr=log, cwd=workdir, env=env)
    server = Server(proc, port, workdir, store)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"etherd exited: {(workdir / 'etherd.log').read_text()[-2000:]}")
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r,
        ):
            if r.status == 200:
                return server
        time.sleep(0.1)
    server.stop()
    raise RuntimeError("etherd did not become ready in 30 s")


def metrics(port: int, admin: str) -> dict[str, float]:
    """The unlabelled and summed-over-labels samples of ``/metrics``."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/metrics", headers={"Authorization": f"Bearer {admin}"}
    )
    with urllib.request.urlopen(request, timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        if "_bucket" in name:
            continue
        with contextlib.suppress(ValueError):
            out[name] = out.get(name, 0.0) + float(value)
        # Per-route request time, for the harness routes.
        m = re.search(r'route="([^"]+)"', name_labels)
        if m and name.startswith("etherd_http_request_duration_seconds"):
            with contextlib.suppress(ValueError):
                out[f"{name}|{m.group(1)}"] = float(value)
    return out


async def fresh_pg_database() -> str:
    """Drop and create ``etherd_bench``; its URL."""
    con = await asyncpg.connect(f"{PG_SERVER}/postgres")
    try:
        await con.execute(f"DROP DATABASE IF EXISTS {PG_DATABASE} WITH (FORCE)")
        await con.execute(f"CREATE DATABASE {PG_DATABASE}")
    finally:
        await con.close()
    return f"{PG_SERVER}/{PG_DATABASE}"


async def pg_version(url: str) -> str:
    con = await asyncpg.connect(url)
    try:
        version: str = await con.fetchval("SHOW server_version")
        settings = await con.fetch(
            "SELECT name, setting FROM pg_settings"
            " WHERE name IN ('fsync', 'synchronous_commit', 'shared_buffers')"
        )
    finally:
        await con.close()
    return version + " (" + ", ".join(f"{r[0]}={r[1]}" for r in settings) + ")"


# -- clients -------------------------------------------------------------------------------


class Http(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection, one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None

    @classmethod
    async def open(cls, port: int) -> Http:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(cls, "127.0.0.1", port)
        return conn

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(f"connection lost: {exc}"))

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.waiter is None:
            return
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buf[:end]).lower()
        at = head.find(b"\r\ncontent-length:")
        length = 0
        if at >= 0:
            stop = head.find(b"\r\n", at + 2)
            length = int(head[at + 17 : stop if stop >= 0 else len(head)])
        total = end + 4 + length
        if len(self.buf) < total:
            return
        status = int(head[9:12])
        body = bytes(self.buf[end + 4 : total])
        del self.buf[:total]
        waiter, self.waiter = self.waiter, None
        waiter.set_result((status, body))

    async def post(self, path: bytes, body: bytes, headers: bytes) -> tuple[int, bytes]:
        assert self.transport is not None and self.waiter is None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(
            b"POST %s HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n%s\r\n%s" % (path, len(body), headers, body)
        )
        return await self.waiter

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


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


class Subscriber(WSListener):
    """A frontend's WebSocket: subscribes to tasks and times every step it receives."""

    def __init__(self, tally: Tally) -> None:
        super().__init__()
        self.tally = tally
        self.transport: WSTransport | None = None
        self.waiting: dict[str, asyncio.Future[None]] = {}

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type is not WSMsgType.TEXT:
            return
        now = time.monotonic_ns()
        raw = frame.get_payload_as_bytes()
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

    async def subscribe(self, topic: str, rid: str) -> None:
        assert self.transport is not None
        done = self.expect("subscribed:" + rid)
        command = {"action": "subscribe", "topics": [topic], "id": rid}
        self.transport.send(WSMsgType.TEXT, json.dumps(command).encode())
        await asyncio.wait_for(done, 30)

    def unsubscribe(self, topic: str) -> None:
        assert self.transport is not None
        command = {"action": "unsubscribe", "topics": [topic]}
        self.transport.send(WSMsgType.TEXT, json.dumps(command).encode())


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
    await sub.subscribe(topic, task_id)
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
    sub.unsubscribe(topic)


# -- profile -------------------------------------------------------------------------------


def start_py_spy(pid: int, output: Path, rate: int, native: bool) -> subprocess.Popen[bytes]:
    """``py-spy record`` of ``pid`` into ``output`` until SIGINT.

    Without ``native`` it samples without pausing the server (``--nonblocking``); with it,
    C frames (uvloop, asyncpg, msgspec) are shown too, at the cost of pausing per sample.
    """
    command = ["py-spy", "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw"]
    command += ["--output", str(output)]
    command += ["--native"] if native else ["--nonblocking"]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def summarize_profile(path: Path, top: int = 25) -> str:
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
    return f"{m.group(1)} ({m.group(2).rsplit('/', 2)[-1] if '/' in m.group(2) else m.group(2)})"


# -- the run -------------------------------------------------------------------------------


def pct(values: list[int], q: float) -> float:
    """The q-quantile of nanosecond values, in milliseconds (nearest rank)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))] / 1e6


async def drive(args: argparse.Namespace, server: Server, tally: Tally) -> dict[str, Any]:
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
    m0 = metrics(server.port, admin)
    cpu0, own0, busy0 = proc_cpu_s(server.pid), time.process_time(), machine_busy_s()
    pg0 = cpu_of_named("postgres")
    spy = None
    if args.py_spy:
        spy = start_py_spy(server.pid, args.py_spy, args.py_spy_rate, args.py_spy_native)
    t0 = time.monotonic_ns()
    tally.measuring = True
    start.set()
    await asyncio.gather(*workers)
    t1 = time.monotonic_ns()
    tally.measuring = False
    cpu1, own1, busy1 = proc_cpu_s(server.pid), time.process_time(), machine_busy_s()
    pg_cpu = cpu_of_named("postgres") - pg0
    if spy is not None:
        spy.send_signal(2)  # SIGINT: py-spy writes the profile and exits
        spy.wait(30)
    m1 = metrics(server.port, admin)
    elapsed = (t1 - t0) / 1e9
    n = len(tally.step_done_at)
    done = sorted(tally.step_done_at)
    lo, hi = done[int(0.1 * n)] if n else t0, done[int(0.9 * n) - 1] if n else t1
    middle = (0.8 * n) / ((hi - lo) / 1e9) if n and hi > lo else math.nan

    def delta(name: str) -> float:
        return m1.get(name, 0.0) - m0.get(name, 0.0)

    commit_s = delta("etherd_store_commit_duration_seconds_sum")
    commits = delta("etherd_store_commit_duration_seconds_count")
    rows = delta("etherd_store_rows_total")
    route = "/api/harness/tasks/{id}/steps"
    step_route_s = delta(f"etherd_http_request_duration_seconds_sum|{route}")
    step_route_n = delta(f"etherd_http_request_duration_seconds_count|{route}")
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
        "server_step_handler_ms_mean": round(1000 * step_route_s / step_route_n, 3)
        if step_route_n
        else None,
        "db": {
            "commit_s": round(commit_s, 3),
            "commits": int(commits),
            "rows": int(rows),
            "rows_per_commit": round(rows / commits, 1) if commits else None,
            "mean_commit_ms": round(1000 * commit_s / commits, 3) if commits else None,
            "busy_pct_of_window": round(100 * commit_s / elapsed, 1),
        },
        "server_cpu_pct": round(100 * server_cpu / elapsed, 1),
        "server_cpu_us_per_step": round(1e6 * server_cpu / n, 1) if n else None,
        "client_cpu_pct": round(100 * own_cpu / elapsed, 1),
        "postgres_cpu_pct": round(100 * pg_cpu / elapsed, 1),
        "other_processes_cpu_pct": round(100 * others / elapsed, 1),
        # Every measured step must reach its subscriber exactly once.
        "step_events_missing": n - len(tally.step_to_sub_ns),
        "errors": dict(tally.errors),
    }


def versions(store: str) -> dict[str, str]:
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
            ["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "etherd"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        out["etherd_commit"] = commit + (" (etherd/ modified)" if dirty else "")
    if store.startswith("postgres"):
        out["postgresql"] = asyncio.run(pg_version(store))
    return out


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


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
    parser.add_argument("--server-cpu", type=int, default=0)
    parser.add_argument("--client-cpu", type=int, default=1)
    parser.add_argument("--py-spy", type=Path, help="record the server into this raw profile")
    parser.add_argument("--py-spy-rate", type=int, default=200, help="samples per second")
    parser.add_argument("--py-spy-native", action="store_true", help="include C frames")
    parser.add_argument("--label", default="", help="a name for this run in the JSON line")
    parser.add_argument("--json", type=Path, help="append the figures as one JSON line")
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
        store, kind = asyncio.run(fresh_pg_database()), "postgresql"
    else:
        store = args.store
        kind = "postgresql" if store.startswith("postgres") else "sqlite"

    if hasattr(os, "sched_setaffinity"):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, {args.client_cpu})
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
    result["other_processes_cpu_pct_before"] = round(quiet, 1)
    result["versions"] = versions(store)
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
