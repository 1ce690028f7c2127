"""Fan-out latency driver: N WebSocket subscribers, an open-loop HTTP publisher, one report.

Run from the repository root::

    python -m bench.fanout.driver --subscribers 1000 --rate 100 --duration 10
    python -m bench.fanout.driver --idle 10000

What it does
------------
1. Starts ``python -m etherd serve`` with a generated configuration (dev auth, a temporary
   data directory, SQLite unless ``--store``, limits raised for N connections), pinned to
   ``--server-cpu`` (default core 0). ``--url`` targets a server that is already running
   instead (``--server-pid`` then lets the driver still read its CPU and memory).
2. Spreads N subscribers over ``--clients`` processes pinned to ``--client-cpus`` (default
   core 1). Subscriber ``i`` subscribes to ``bench/{i % T}`` (or ``bench/*`` with
   ``--pattern``) and waits for the ``subscribed`` reply.
3. A publisher process (pinned with the clients) sends ``POST /api/publish`` with one event
   per request over ``--publish-conns`` keep-alive connections, OPEN LOOP: event ``i`` is
   due at ``t0 + i / R`` and carries that scheduled ``time.monotonic_ns()`` as ``t``. A
   publisher that falls behind still stamps the scheduled time, so its lateness counts as
   latency. Topics are used round-robin.
4. Each client takes ``monotonic_ns()`` when a frame is handed to it, finds ``"t":"`` in the
   payload with ``bytes.find``, calls ``int()`` on the 20 digits after it (no JSON decode),
   and adds ``receive - scheduled`` to a log-linear histogram (1 us resolution below
   1.024 ms, then 512 sub-buckets per power of two, so under 0.2 % relative error).
   CLOCK_MONOTONIC is system-wide, so the processes share one clock. ``--sample-every k``
   times one frame in k (all are counted); ``--client raw`` hands the socket, after the
   picows handshake and subscribe, to ``RawReader``, which counts same-size frames per
   read instead of taking a Python call per frame.
5. After the last publish the driver waits until every expected frame has arrived or
   nothing arrived for ``--drain-timeout`` seconds, then reports delivery, latency
   percentiles, server CPU (``/proc/PID/stat`` user+sys over the publish window, as % of
   one core and us per delivered frame), server peak RSS (VmHWM) and each client process's
   CPU %, so a saturated client is visible.

``--idle N`` only opens N connections (each subscribed to one topic unless
``--idle-no-subscribe``) and reports the server's VmRSS before and after.

Diagnosis: ``--per-message`` (first arrival and fan-out spread of each message),
``--trace-server FILE`` (runs ``traced_server.py``: flush time, publish-to-written time,
GC pauses, loop lag, and Python allocations in idle mode), ``--py-spy FILE``. On a shared
machine, ``--wait-quiet``, ``--max-noise`` and ``--retry-noisy`` keep other people's work
out of the numbers, and each record says how much CPU others used (``noise_pct``).

Output: a human-readable table on stdout and one JSON line per run, appended to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import multiprocessing as mp
import os
import platform
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Final

from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

TOKEN: Final = "test"
EVENT: Final = "bench"
TOPIC_PREFIX: Final = "bench/"
# Event data is {"t":"<20 digits>","s":"<10 digits>","p":"x..."}: fixed-width strings, so a
# frame's size does not change during a run and a reader finds t and s at fixed offsets.
MARK: Final = b'"t":"'
T_AT: Final = len(MARK)  # t's digits start this far after MARK
T_DIGITS: Final = 20
S_AT: Final = T_AT + T_DIGITS + len(b'","s":"')
S_DIGITS: Final = 10
TEXT: Final = WSMsgType.TEXT
SUB_BUCKETS_LOG2: Final = 9  # 512 sub-buckets per power of two above LINEAR_US
LINEAR_US: Final = 1 << (SUB_BUCKETS_LOG2 + 1)  # exact 1 us buckets below 1.024 ms
HIST_SIZE: Final = 64 << SUB_BUCKETS_LOG2  # covers any int64 microsecond count


# -- histogram -----------------------------------------------------------------------------


def bucket_of(us: int) -> int:
    """Index of the log-linear bucket holding a latency of ``us`` microseconds."""
    if us < LINEAR_US:
        return us if us > 0 else 0
    shift = us.bit_length() - (SUB_BUCKETS_LOG2 + 1)
    return (shift << SUB_BUCKETS_LOG2) + (us >> shift)


def bucket_value(index: int) -> float:
    """The representative latency (us) of a bucket: its midpoint."""
    if index < LINEAR_US:
        return float(index)
    shift = (index >> SUB_BUCKETS_LOG2) - 1
    low = (index - (shift << SUB_BUCKETS_LOG2)) << shift
    return low + ((1 << shift) - 1) / 2


def merge_hist(into: dict[int, int], sparse: dict[int, int]) -> None:
    for k, v in sparse.items():
        into[k] = into.get(k, 0) + v


def percentiles(hist: dict[int, int], qs: Sequence[float]) -> list[float]:
    """Latency percentiles in microseconds (NaN for an empty histogram)."""
    total = sum(hist.values())
    if total == 0:
        return [math.nan] * len(qs)
    ranks = [max(1, math.ceil(q * total)) for q in qs]
    out: list[float] = [math.nan] * len(qs)
    seen = 0
    pending = sorted(range(len(qs)), key=lambda j: ranks[j])
    pos = 0
    for idx in sorted(hist):
        seen += hist[idx]
        while pos < len(pending) and ranks[pending[pos]] <= seen:
            out[pending[pos]] = bucket_value(idx)
            pos += 1
        if pos == len(pending):
            break
    return out


def exact_summary_ms(values_ns: Sequence[int]) -> dict[str, float | None]:
    """p50/p90/p99/max of a short list of nanosecond values, in milliseconds."""
    if not values_ns:
        return {"p50": None, "p90": None, "p99": None, "max": None}
    v = sorted(values_ns)
    n = len(v)

    def q(p: float) -> float:
        return round(v[min(n - 1, max(0, math.ceil(p * n) - 1))] / 1e6, 3)

    return {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": round(v[-1] / 1e6, 3)}


def to_sparse(hist: list[int]) -> dict[int, int]:
    return {i: c for i, c in enumerate(hist) if c}


# -- /proc ---------------------------------------------------------------------------------

CLK_TCK: Final = os.sysconf("SC_CLK_TCK")


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all threads), from /proc/PID/stat."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return math.nan
    fields = text[text.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_status_kb(pid: int, key: str) -> int:
    """A ``kB`` line of /proc/PID/status (VmRSS, VmHWM), or -1."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return -1


def cpu_jiffies() -> dict[int, tuple[int, int, int]]:
    """Per-CPU (task, irq, steal) jiffies from /proc/stat.

    ``task`` is user + nice + system: time charged to processes, comparable with the sum
    of their /proc/PID/stat times. ``irq`` is irq + softirq, which on loopback is mostly the
    TCP receive work of the benchmark itself but is charged to no process.
    """
    out: dict[int, tuple[int, int, int]] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("cpu") and line[3:4].isdigit():
                name, *vals = line.split()
                v = [int(x) for x in vals]
                # user nice system idle iowait irq softirq steal guest guest_nice
                steal = v[7] if len(v) > 7 else 0
                out[int(name[3:])] = (v[0] + v[1] + v[2], v[5] + v[6], steal)
    return out


def wait_quiet(max_pct: float, timeout: float, exclude: Sequence[int] = ()) -> float:
    """Wait until the machine's CPU use (less ``exclude`` pids) stays under ``max_pct`` % of
    one core for 3 s in a row, or ``timeout`` s pass. Returns the last 1 s reading.

    Other people's test runs on a shared machine wreck latency percentiles; this skips them.
    """
    deadline = time.monotonic() + timeout
    calm = 0
    pct = math.nan
    while True:
        j0, own0, t0 = cpu_jiffies(), sum(proc_cpu_s(p) for p in exclude), time.monotonic()
        time.sleep(1.0)
        j1, own1, t1 = cpu_jiffies(), sum(proc_cpu_s(p) for p in exclude), time.monotonic()
        jiffies = sum(j1[c][0] + j1[c][1] - j0[c][0] - j0[c][1] for c in j1 if c in j0)
        busy = jiffies / CLK_TCK - (own1 - own0)
        pct = 100 * busy / (t1 - t0)
        calm = calm + 1 if pct < max_pct else 0
        if calm >= 3 or time.monotonic() > deadline:
            return pct


def all_proc_cpu() -> dict[int, tuple[str, float]]:
    """CPU seconds of every process on the machine, with its name.

    Kernel threads (children of kthreadd, pid 2) are named ``[name]``: on loopback,
    ksoftirqd and the network workers run much of the benchmark's own TCP work.
    """
    out: dict[int, tuple[str, float]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            text = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        name = text[text.index("(") + 1 : text.rindex(")")]
        fields = text[text.rindex(")") + 2 :].split()
        if fields[1] in ("0", "2") and entry.name != "1":  # ppid: kernel threads
            name = f"[{name}]"
        out[int(entry.name)] = (name, (int(fields[11]) + int(fields[12])) / CLK_TCK)
    return out


def top_foreign(
    before: dict[int, tuple[str, float]],
    after: dict[int, tuple[str, float]],
    ours: set[int],
    seconds: float,
) -> tuple[float, dict[str, float]]:
    """CPU used by other user processes in between (% of a core), and the top four."""
    used: dict[str, float] = {}
    for pid, (name, cpu) in after.items():
        if pid in ours or name.startswith("["):
            continue
        delta = cpu - before.get(pid, (name, 0.0))[1]
        if delta > 0:
            key = f"{name}[{pid}]"
            used[key] = used.get(key, 0.0) + delta
    top = sorted(used.items(), key=lambda kv: -kv[1])[:4]
    total = 100 * sum(used.values()) / seconds
    return total, {k: round(100 * v / seconds, 1) for k, v in top if 100 * v / seconds >= 0.5}


def raise_nofile() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def parse_cpus(text: str) -> set[int]:
    """``"1"``, ``"0,2"`` or ``"2-5"`` to a CPU set."""
    cpus: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            a, b = part.split("-", 1)
            cpus.update(range(int(a), int(b) + 1))
        else:
            cpus.add(int(part))
    return cpus


def pin(cpus: set[int] | None) -> None:
    if cpus:
        os.sched_setaffinity(0, cpus)


def run_loop(coro_factory: Callable[[], Any]) -> Any:
    """Run a coroutine on uvloop when installed (it is for etherd), else on asyncio."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - etherd depends on uvloop
        return asyncio.run(coro_factory())
    return uvloop.run(coro_factory())


# -- subscriber processes ------------------------------------------------------------------


class ClientState:
    """Per-process tallies shared by every subscriber of the process."""

    def __init__(self) -> None:
        self.hist: list[int] = [0] * HIST_SIZE
        self.max_ns = 0
        self.created = 0
        self.bad = 0  # frames with an unparsable "t"
        self.closed = 0  # subscribers disconnected before the end
        self.close_codes: dict[int, int] = {}
        self.stopping = False
        # RawReader's read buffer, shared by every connection of the process.
        self.buf = bytearray(256 * 1024)
        self.view = memoryview(self.buf)
        # --per-message: earliest and latest latency (ns) of each message over this process.
        self.first: list[int] = []
        self.last: list[int] = []


class Subscriber(WSListener):
    """One WebSocket subscriber: counts frames and histograms their latency.

    The hot path is what limits a client process at a million frames a second, so it does
    the least it can: one type check, a count, and for sampled frames a ``bytes.find`` of
    ``"t":`` and an ``int()`` of the digits after it (no JSON decode).
    """

    def __init__(self, state: ClientState, sample_every: int) -> None:
        super().__init__()
        self.state = state
        self.hist = state.hist
        self.n = 0
        self.sample_every = sample_every
        # Subscribers sample different messages: the phase is spread over 1..sample_every.
        state.created += 1
        self.skip = 1 + state.created % sample_every
        self.transport: WSTransport | None = None
        self.reply: asyncio.Future[bytes] | None = None

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type != TEXT or self.reply is not None:
            self._control(frame)
            return
        self.n += 1
        self.skip -= 1
        if self.skip:
            return
        self.skip = self.sample_every
        now = time.monotonic_ns()
        payload = frame.get_payload_as_bytes()
        i = payload.find(MARK)
        try:
            lat = now - int(payload[i + T_AT : i + T_AT + T_DIGITS])
        except ValueError:
            self.state.bad += 1
            return
        us = lat // 1000
        if us < LINEAR_US:
            self.hist[us if us > 0 else 0] += 1
        else:
            shift = us.bit_length() - (SUB_BUCKETS_LOG2 + 1)
            self.hist[(shift << SUB_BUCKETS_LOG2) + (us >> shift)] += 1
        if lat > self.state.max_ns:
            self.state.max_ns = lat

    def _control(self, frame: WSFrame) -> None:
        msg_type = frame.msg_type
        if msg_type == WSMsgType.CLOSE:
            code = int(frame.get_close_code().value) if frame.payload_size >= 2 else 1005
            self.state.close_codes[code] = self.state.close_codes.get(code, 0) + 1
        elif msg_type == TEXT and self.reply is not None and not self.reply.done():
            self.reply.set_result(frame.get_payload_as_bytes())

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if not self.state.stopping:
            self.state.closed += 1
        if self.reply is not None and not self.reply.done():
            self.reply.set_exception(ConnectionError("disconnected before the subscribe reply"))


class TracingSubscriber(Subscriber):
    """A subscriber that also keeps each message's first and last arrival (``--per-message``).

    The first arrival over all subscribers is the pipeline delay before the fan-out starts
    (publisher, HTTP, hub); last minus first is the fan-out spread (serial writes on the
    server, serial reads on the client).
    """

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        now = time.monotonic_ns()
        if frame.msg_type != TEXT or self.reply is not None:
            self._control(frame)
            return
        self.n += 1
        payload = frame.get_payload_as_bytes()
        i = payload.find(MARK)
        state = self.state
        try:
            lat = now - int(payload[i + T_AT : i + T_AT + T_DIGITS])
            seq = int(payload[i + S_AT : i + S_AT + S_DIGITS])
        except ValueError:
            state.bad += 1
            return
        us = lat // 1000
        if us < LINEAR_US:
            self.hist[us if us > 0 else 0] += 1
        else:
            shift = us.bit_length() - (SUB_BUCKETS_LOG2 + 1)
            self.hist[(shift << SUB_BUCKETS_LOG2) + (us >> shift)] += 1
        if lat > state.max_ns:
            state.max_ns = lat
        if 0 <= seq < len(state.first):
            if lat < state.first[seq]:
                state.first[seq] = lat
            if lat > state.last[seq]:
                state.last[seq] = lat


class RawReader(asyncio.BufferedProtocol):
    """``--client raw``: after picows' handshake and the subscribe reply, read the socket here.

    picows calls Python once per frame, which caps a client process near 0.7-1 M frames/s
    with nothing else to do. Events of a run all have one size (fixed-width fields, padded
    topic names), so this reader counts whole frames per read (``len // size``) and parses
    ``t`` at a fixed offset of every sampled frame; all frames of one read share one receive
    time. A read that does not look like a run of same-size TEXT frames (a server PING, a
    CLOSE) goes through a plain frame walker instead, which answers pings.

    It is a ``BufferedProtocol`` over one 256 KiB buffer shared by the whole process (a
    read is handled before the next one starts); a partial frame left at the end of a read
    is kept as bytes and copied to the front of the buffer before the next read.
    """

    def __init__(self, state: ClientState, sample_every: int) -> None:
        self.state = state
        self.hist = state.hist
        self.n = 0
        self.sample_every = sample_every
        state.created += 1
        self.skip = state.created % sample_every  # frames to pass before the next sample
        self.rest = b""
        self.size = 0  # bytes per event frame, learned from the first one
        self.b1 = 0  # second header byte of an event frame
        self.t_off = 0  # offset of t's digits inside an event frame
        self.fill = 0
        self.transport: asyncio.Transport | None = None

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.state.stopping:
            self.state.closed += 1

    def get_buffer(self, sizehint: int) -> memoryview:
        rest = self.rest
        n = self.fill = len(rest)
        if n:
            self.state.buf[:n] = rest
        return self.state.view[n:]

    def buffer_updated(self, nbytes: int) -> None:
        now = time.monotonic_ns()
        end = self.fill + nbytes
        data = self.state.buf
        size = self.size or self._learn(bytes(data[:end]))
        if not size:
            self._walk(bytes(data[:end]), now)
            return
        k = end // size
        last = (k - 1) * size
        if not k or data[0] != 0x81 or data[last] != 0x81 or data[last + 1] != self.b1:
            self._walk(bytes(data[:end]), now)
            return
        state = self.state
        hist = self.hist
        every = self.sample_every
        track = bool(state.first)
        j = self.skip
        t_off = self.t_off
        try:
            while j < k:
                o = j * size + t_off
                lat = now - int(data[o : o + T_DIGITS])
                us = lat // 1000
                if us < LINEAR_US:
                    hist[us if us > 0 else 0] += 1
                else:
                    shift = us.bit_length() - (SUB_BUCKETS_LOG2 + 1)
                    hist[(shift << SUB_BUCKETS_LOG2) + (us >> shift)] += 1
                if lat > state.max_ns:
                    state.max_ns = lat
                if track:
                    seq = int(data[o - T_AT + S_AT : o - T_AT + S_AT + S_DIGITS])
                    if 0 <= seq < len(state.first):
                        if lat < state.first[seq]:
                            state.first[seq] = lat
                        if lat > state.last[seq]:
                            state.last[seq] = lat
                j += every
        except ValueError:
            self._walk(bytes(data[:end]), now)
            return
        self.skip = j - k
        self.n += k
        self.rest = bytes(data[k * size : end]) if k * size < end else b""

    def _learn(self, data: bytes) -> int:
        """Take the frame size and t offset from the first event frame."""
        if len(data) < 4 or data[0] != 0x81:
            return 0
        ln = data[1] & 0x7F
        hl = 2
        if ln == 126:
            ln = int.from_bytes(data[2:4], "big")
            hl = 4
        elif ln == 127:
            return 0
        if len(data) < hl + ln:
            return 0
        i = data.find(MARK, hl, hl + ln)
        if i < 0:
            return 0
        self.size = hl + ln
        self.b1 = data[1]
        self.t_off = i + T_AT
        return self.size

    def _walk(self, data: bytes, now: int) -> None:
        """Frame by frame: count TEXT frames, sample them, answer PING, note CLOSE."""
        pos = 0
        end = len(data)
        state = self.state
        while end - pos >= 2:
            b0 = data[pos]
            ln = data[pos + 1] & 0x7F
            hl = 2
            if ln == 126:
                if end - pos < 4:
                    break
                ln = int.from_bytes(data[pos + 2 : pos + 4], "big")
                hl = 4
            elif ln == 127:
                if end - pos < 10:
                    break
                ln = int.from_bytes(data[pos + 2 : pos + 10], "big")
                hl = 10
            if end - pos < hl + ln:
                break
            payload = data[pos + hl : pos + hl + ln]
            op = b0 & 0x0F
            if op == 1:
                self.n += 1
                if self.skip:
                    self.skip -= 1
                else:
                    self.skip = self.sample_every - 1
                    i = payload.find(MARK)
                    try:
                        lat = now - int(payload[i + T_AT : i + T_AT + T_DIGITS])
                    except ValueError:
                        state.bad += 1
                    else:
                        self.hist[bucket_of(lat // 1000)] += 1
                        state.max_ns = max(state.max_ns, lat)
            elif op == 9 and self.transport is not None and ln < 126:
                # PONG, masked with a zero key (so the payload goes as it is).
                self.transport.write(bytes((0x8A, 0x80 | ln)) + b"\0\0\0\0" + payload)
            elif op == 8:
                code = int.from_bytes(payload[:2], "big") if ln >= 2 else 1005
                state.close_codes[code] = state.close_codes.get(code, 0) + 1
            pos += hl + ln
        self.rest = data[pos:]


@dataclass
class ClientPlan:
    """What one client process does."""

    ws_url: str
    topics: list[str]  # one per subscriber of this process
    cpus: set[int] | None
    concurrency: int
    read_buffer: int
    subscribe: bool
    sample_every: int
    connect_timeout_s: float
    per_message: int = 0  # messages to track first/last arrival for (0: off)
    raw: bool = False  # read with RawReader after the subscribe


async def _connect_one(
    plan: ClientPlan, state: ClientState, topic: str, sem: asyncio.Semaphore
) -> Subscriber | RawReader | str:
    factory = TracingSubscriber if plan.per_message else Subscriber
    async with sem:
        try:
            _, listener = await asyncio.wait_for(
                ws_connect(
                    lambda: factory(state, plan.sample_every),
                    plan.ws_url,
                    read_buffer_init_size=plan.read_buffer,
                    enable_auto_pong=True,
                ),
                plan.connect_timeout_s,
            )
        except Exception as exc:
            return f"connect: {type(exc).__name__}: {exc}"[:200]
        assert isinstance(listener, Subscriber)
        sub = listener
        if not plan.subscribe:
            return sub
        loop = asyncio.get_running_loop()
        sub.reply = loop.create_future()
        assert sub.transport is not None
        command = json.dumps({"action": "subscribe", "topics": [topic], "id": 1}).encode()
        sub.transport.send(WSMsgType.TEXT, command)
        try:
            reply = await asyncio.wait_for(sub.reply, plan.connect_timeout_s)
        except Exception as exc:
            return f"subscribe: {type(exc).__name__}: {exc}"[:200]
        finally:
            sub.reply = None
        if not reply.startswith(b'{"type":"subscribed"') or b'"errors":[]' not in reply:
            return "subscribe refused: " + reply[:200].decode("utf-8", "replace")
        if plan.raw:
            under = sub.transport.underlying_transport
            raw = RawReader(state, plan.sample_every)
            raw.transport = under
            under.set_protocol(raw)
            return raw
        return sub


async def _client_main(plan: ClientPlan, pipe: Connection) -> None:
    state = ClientState()
    if plan.per_message:
        state.first = [1 << 62] * plan.per_message
        state.last = [-1] * plan.per_message
    sem = asyncio.Semaphore(plan.concurrency)
    started = time.monotonic()
    results = await asyncio.gather(
        *(_connect_one(plan, state, topic, sem) for topic in plan.topics)
    )
    subs: list[Subscriber | RawReader | None] = []
    errors: dict[str, int] = {}
    for r in results:
        if isinstance(r, str):
            subs.append(None)
            key = re.sub(r"\d+", "N", r)
            errors[key] = errors.get(key, 0) + 1
        else:
            subs.append(r)
    gc.collect()
    gc.freeze()
    ok = sum(1 for s in subs if s is not None)
    pipe.send(("ready", ok, errors, time.monotonic() - started))

    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def on_command() -> None:
        while pipe.poll():
            cmd = pipe.recv()
            if cmd == "poll":
                pipe.send(("poll", sum(s.n for s in subs if s is not None), state.closed))
            elif cmd == "finish":
                state.stopping = True
                pipe.send(
                    (
                        "result",
                        {
                            "counts": [-1 if s is None else s.n for s in subs],
                            "hist": to_sparse(state.hist),
                            "max_ns": state.max_ns,
                            "bad": state.bad,
                            "closed": state.closed,
                            "close_codes": state.close_codes,
                            "first": state.first,
                            "last": state.last,
                        },
                    )
                )
                if not done.done():
                    done.set_result(None)

    loop.add_reader(pipe.fileno(), on_command)
    await done
    loop.remove_reader(pipe.fileno())
    for s in subs:
        if isinstance(s, RawReader) and s.transport is not None:
            s.transport.close()
        elif isinstance(s, Subscriber) and s.transport is not None:
            s.transport.disconnect()
    await asyncio.sleep(0.05)


def client_process(plan: ClientPlan, pipe: Connection) -> None:
    """Entry point of a subscriber process."""
    pin(plan.cpus)
    raise_nofile()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    run_loop(lambda: _client_main(plan, pipe))


# -- publisher process ---------------------------------------------------------------------


@dataclass
class PublishPlan:
    host: str
    port: int
    topics: list[str]
    rate: float
    duration: float
    payload: int
    durable: bool
    conns: int
    cpus: set[int] | None
    realtime: bool


def data_template(payload: int, topic: str) -> tuple[bytes, int]:
    """The ``data`` object's text with ``%d`` slots for t and s, and the event's size.

    Pads so that the event JSON a subscriber receives is ``payload`` bytes (or the least
    it can be).
    """
    from etherd.core.wire import event_json

    head = b'{"t":"%0' + str(T_DIGITS).encode() + b'd","s":"%0' + str(S_DIGITS).encode() + b'd"'
    probe = head % (0, 0) + b',"p":""}'
    envelope = len(event_json(topic, EVENT, None, int(time.time() * 1000), probe))
    pad = max(0, payload - envelope)
    return head + b',"p":"' + b"x" * pad + b'"}', envelope + pad


class _PubConn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.sent_at: list[int] = []
        self.head = 0
        self.wakeup = asyncio.Event()


async def _publisher_main(plan: PublishPlan, pipe: Connection) -> None:
    conns: list[_PubConn] = []
    for _ in range(plan.conns):
        r, w = await asyncio.open_connection(plan.host, plan.port)
        sock = w.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conns.append(_PubConn(r, w))
    template = {t: data_template(plan.payload, t)[0] for t in plan.topics}
    durable = b"true" if plan.durable else b"false"
    head = (
        b"POST /api/publish HTTP/1.1\r\nHost: %s:%d\r\nAuthorization: Bearer %s\r\n"
        b"Content-Type: application/json\r\nContent-Length: %%d\r\n\r\n"
        % (plan.host.encode(), plan.port, TOKEN.encode())
    )
    prefix = {
        t: b'{"topic":"%s","event":"%s","durable":%s,"data":'
        % (t.encode(), EVENT.encode(), durable)
        for t in plan.topics
    }
    total = round(plan.rate * plan.duration)
    statuses: dict[int, int] = {}
    errors: dict[str, int] = {}
    lag_hist = [0] * HIST_SIZE  # send time - scheduled time
    rtt_hist = [0] * HIST_SIZE  # response time - send time
    answered = 0
    done = asyncio.Event()

    async def read_answers(c: _PubConn) -> None:
        nonlocal answered
        while True:
            try:
                head_bytes = await c.reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                if c.head < len(c.sent_at):
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                return
            now = time.monotonic_ns()
            status = int(head_bytes[9:12])
            m = re.search(rb"(?i)content-length:\s*(\d+)", head_bytes)
            if m and int(m.group(1)):
                await c.reader.readexactly(int(m.group(1)))
            statuses[status] = statuses.get(status, 0) + 1
            rtt_hist[bucket_of((now - c.sent_at[c.head]) // 1000)] += 1
            c.head += 1
            answered += 1
            if answered == total:
                done.set()

    readers = [asyncio.get_running_loop().create_task(read_answers(c)) for c in conns]
    pipe.send(("ready",))
    t0: int = pipe.recv()
    step = 1e9 / plan.rate
    ntopics = len(plan.topics)
    i = 0
    first_send = last_send = 0
    while i < total:
        now = time.monotonic_ns()
        due = t0 + int(i * step)
        if due > now:
            await asyncio.sleep((due - now) / 1e9)
            continue
        if not first_send:
            first_send = now
        while i < total:
            due = t0 + int(i * step)
            if due > now:
                break
            topic = plan.topics[i % ntopics]
            body = prefix[topic] + template[topic] % (due, i) + b"}"
            c = conns[i % len(conns)]
            c.writer.write(head % len(body) + body)
            c.sent_at.append(now)
            lag_hist[bucket_of((now - due) // 1000)] += 1
            i += 1
            now = time.monotonic_ns()
        last_send = now
    if total:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), 60.0)
    for task in readers:
        task.cancel()
    for c in conns:
        c.writer.close()
    pipe.send(
        (
            "result",
            {
                "planned": total,
                "sent": i,
                "answered": answered,
                "statuses": statuses,
                "errors": errors,
                "lag_hist": to_sparse(lag_hist),
                "rtt_hist": to_sparse(rtt_hist),
                "send_span_s": (last_send - first_send) / 1e9,
                "rt": plan.realtime,
            },
        )
    )


def publisher_process(plan: PublishPlan, pipe: Connection) -> None:
    """Entry point of the publisher process."""
    pin(plan.cpus)
    raise_nofile()
    if plan.realtime:
        # The publisher is the clock of the benchmark: with SCHED_FIFO it runs as soon as a
        # send is due instead of waiting for a client process on the same core to yield.
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
        except OSError:
            plan.realtime = False
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    run_loop(lambda: _publisher_main(plan, pipe))


# -- the server ----------------------------------------------------------------------------


@dataclass
class ServerHandle:
    host: str
    port: int
    pid: int | None
    proc: subprocess.Popen[bytes] | None = None
    tmp: str | None = None
    log_path: str | None = None
    trace: str | None = None  # --trace-server: the traced_server.py summary file

    def request_trace(self) -> None:
        """Ask the traced server to write its summary now (see traced_server.py)."""
        assert self.trace is not None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.trace)
        Path(self.trace + ".dump").touch()

    def read_trace(self, timeout: float = 5.0) -> dict[str, Any] | None:
        assert self.trace is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
                data: dict[str, Any] = json.loads(Path(self.trace).read_text())
                return data
            time.sleep(0.02)
        return None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)


def _toml_str(s: str) -> str:
    return json.dumps(s)


def start_server(args: argparse.Namespace, n_conns: int) -> ServerHandle:
    """Start etherd with a generated configuration; returns once it answers /healthz."""
    tmp = tempfile.mkdtemp(prefix="etherd-fanout-")
    data_dir = os.path.join(tmp, "data")
    limit = n_conns + 1000
    lines = [
        "[server]",
        'host = "127.0.0.1"',
        "port = 0",
        f"data_dir = {_toml_str(data_dir)}",
        f"max_connections = {max(limit, 50_000)}",
        "drain_window_s = 0.2",
        "shutdown_grace_s = 2.0",
        "[ws]",
        f"max_connections_per_subject = {limit}",
        f"max_pending_bytes = {args.server_max_pending_mb * 1024 * 1024}",
        "[auth]",
        "dev = true",
        "[log]",
        'level = "warning"',
    ]
    if args.store:
        lines += ["[store]", f"url = {_toml_str(args.store)}"]
    cfg = os.path.join(tmp, "etherd.toml")
    Path(cfg).write_text("\n".join(lines) + "\n")
    log_path = os.path.join(tmp, "server.log")
    cpus = parse_cpus(args.server_cpu) if args.server_cpu else None

    def preexec() -> None:
        pin(cpus)
        raise_nofile()
        os.setpgid(0, 0)  # a Ctrl-C at the terminal reaches the driver, which stops it

    cmd = [sys.executable, "-m", "etherd", "serve", "--config", cfg]
    trace = None
    if args.trace_server:
        trace = os.path.abspath(args.trace_server)
        tracer = str(Path(__file__).resolve().parent / "traced_server.py")
        extra = ["--tracemalloc"] if args.idle and not args.experiment else []
        if args.experiment:
            extra += ["--experiment", args.experiment]
        cmd = [sys.executable, tracer, *extra, trace, "serve", "--config", cfg]
    log = open(log_path, "wb")  # noqa: SIM115 - the child owns it
    proc = subprocess.Popen(
        cmd,
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=preexec,
    )
    log.close()
    handle = ServerHandle("127.0.0.1", 0, proc.pid, proc, tmp, log_path, trace)
    deadline = time.monotonic() + 30
    pattern = re.compile(rb"listening on http://[^:]+:(\d+)")
    while time.monotonic() < deadline:
        m = pattern.search(Path(log_path).read_bytes())
        if m:
            handle.port = int(m.group(1))
            break
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    if not handle.port:
        out = Path(log_path).read_text(errors="replace")
        handle.stop()
        raise SystemExit(f"etherd did not start:\n{out}")
    wait_healthy(handle.host, handle.port)
    return handle


def wait_healthy(host: str, port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    url = f"http://{host}:{port}/healthz"
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.05)


# -- orchestration -------------------------------------------------------------------------


@dataclass
class Clients:
    procs: list[mp.process.BaseProcess] = field(default_factory=list)
    pipes: list[Connection] = field(default_factory=list)
    topics: list[list[str]] = field(default_factory=list)

    def cpu(self) -> list[float]:
        return [proc_cpu_s(p.pid) if p.pid else math.nan for p in self.procs]

    def poll(self) -> tuple[int, int]:
        for pipe in self.pipes:
            pipe.send("poll")
        total = closed = 0
        for pipe in self.pipes:
            _, n, c = pipe.recv()
            total += n
            closed += c
        return total, closed

    def finish(self, timeout: float = 60.0) -> list[dict[str, Any]]:
        for pipe in self.pipes:
            pipe.send("finish")
        out = []
        for pipe in self.pipes:
            if not pipe.poll(timeout):
                raise SystemExit("a client process did not answer finish")
            _, result = pipe.recv()
            out.append(result)
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.terminate()
        return out

    def kill(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.terminate()


def topic_name(t: int, topics: int) -> str:
    """Topic ``t`` of ``topics``, zero-padded so every topic (and frame) has one size."""
    return f"{TOPIC_PREFIX}{t:0{len(str(max(0, topics - 1)))}d}"


def topic_of(i: int, topics: int, pattern: bool) -> str:
    return TOPIC_PREFIX + "*" if pattern else topic_name(i % topics, topics)


def start_clients(
    args: argparse.Namespace, ctx: Any, ws_url: str, n: int, subscribe: bool
) -> tuple[Clients, dict[str, Any]]:
    """Spawn the client processes and wait until every subscriber is connected."""
    k = max(1, min(args.clients, n))
    all_topics = [topic_of(i, args.topics, args.pattern) for i in range(n)]
    clients = Clients()
    cpus = parse_cpus(args.client_cpus) if args.client_cpus else None
    for j in range(k):
        mine = all_topics[j::k]
        plan = ClientPlan(
            ws_url=ws_url,
            topics=mine,
            cpus=cpus,
            concurrency=args.connect_concurrency,
            read_buffer=args.read_buffer,
            subscribe=subscribe,
            sample_every=args.sample_every,
            connect_timeout_s=args.connect_timeout,
            per_message=round(args.rate * args.duration) if args.per_message else 0,
            raw=args.client == "raw",
        )
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=client_process, args=(plan, child), daemon=True)
        proc.start()
        child.close()
        clients.procs.append(proc)
        clients.pipes.append(parent)
        clients.topics.append(mine)
    started = time.monotonic()
    ok = 0
    errors: dict[str, int] = {}
    slowest = 0.0
    for pipe in clients.pipes:
        if not pipe.poll(args.connect_timeout + n / 100 + 60):
            clients.kill()
            raise SystemExit("a client process did not finish connecting")
        _, n_ok, errs, took = pipe.recv()
        ok += n_ok
        slowest = max(slowest, took)
        merge_hist(errors, errs)  # type: ignore[arg-type]
    setup = {
        "connected": ok,
        "connect_errors": errors,
        "connect_s": round(time.monotonic() - started, 3),
    }
    return clients, setup


def machine_info() -> dict[str, Any]:
    """CPU model, cores, RAM, kernel, Python and library versions, etherd commit."""
    from importlib.metadata import PackageNotFoundError, version

    model = platform.processor() or "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    versions: dict[str, str | None] = {}
    for pkg in ("uvloop", "picows", "msgspec", "httptools", "asyncpg"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    commit, tree = git_state()
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "ram_gb": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        **versions,
        "etherd_commit": commit,
        "etherd_tree": tree,
    }


def git_state() -> tuple[str | None, str | None]:
    """``git rev-parse --short HEAD`` plus ``+dirty`` when tracked files differ from HEAD,
    and where: ``clean``, ``dirty outside etherd/`` or ``dirty in etherd/``.

    Untracked files do not count (as with ``git describe --dirty``).
    """
    here = Path(__file__).resolve().parent

    def git(*argv: str) -> str:
        return subprocess.run(
            ["git", *argv], capture_output=True, text=True, check=True, cwd=here
        ).stdout

    try:
        commit = git("rev-parse", "--short", "HEAD").strip()
        changed = [
            line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines()
        ]
    except (OSError, subprocess.CalledProcessError):
        return None, None
    if not changed:
        return commit, "clean"
    inside = any(path.startswith("etherd/") for path in changed)
    return commit + "+dirty", "dirty in etherd/" if inside else "dirty outside etherd/"


def _ms(us: float) -> float | None:
    return None if math.isnan(us) else round(us / 1000, 3)


def run_idle(
    args: argparse.Namespace, ctx: Any, server: ServerHandle, ws_url: str
) -> dict[str, Any]:
    n = args.idle
    pid = server.pid
    gc_wait = 1.0
    if server.trace:
        Path(server.trace + ".snap1").touch()
    time.sleep(gc_wait)
    before = proc_status_kb(pid, "VmRSS") if pid else -1
    clients, setup = start_clients(args, ctx, ws_url, n, subscribe=not args.idle_no_subscribe)
    time.sleep(args.idle_settle)
    after = proc_status_kb(pid, "VmRSS") if pid else -1
    hwm = proc_status_kb(pid, "VmHWM") if pid else -1
    trace = None
    if server.trace:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(server.trace)
        Path(server.trace + ".snap2").touch()
        trace = server.read_trace(timeout=180.0)  # tracemalloc's snapshot diff is slow
    results = clients.finish()
    closed = sum(r["closed"] for r in results)
    record: dict[str, Any] = {
        "mode": "idle",
        "connections": n,
        "subscribed": not args.idle_no_subscribe,
        **setup,
        "closed_early": closed,
        "server_rss_before_mb": round(before / 1024, 1),
        "server_rss_after_mb": round(after / 1024, 1),
        "server_peak_rss_mb": round(hwm / 1024, 1),
        "kb_per_connection": round((after - before) / max(1, setup["connected"]), 2),
        "target_mb": 100,
        "target_met": setup["connected"] == n and 0 < after <= 100 * 1024,
    }
    if trace is not None:
        record["server_trace"] = trace
    if args.experiment:
        record["experiment"] = args.experiment
    return record


@dataclass
class Pids:
    server: int | None
    clients: list[int]
    publisher: int


@dataclass
class Sample:
    """CPU counters at one instant of the publish window."""

    t: float
    server: float
    clients: list[float]
    publisher: float
    driver: float
    cpus: dict[int, tuple[int, int, int]]

    @classmethod
    def take(cls, pids: Pids) -> Sample:
        return cls(
            time.monotonic(),
            proc_cpu_s(pids.server) if pids.server else math.nan,
            [proc_cpu_s(p) for p in pids.clients],
            proc_cpu_s(pids.publisher),
            proc_cpu_s(os.getpid()),
            cpu_jiffies(),
        )


def expected_frames(args: argparse.Namespace, n: int, pub: dict[str, Any]) -> int:
    """Frames the subscribers should receive, given what the publisher got accepted."""
    ok: int = pub["statuses"].get(200, 0)
    if args.pattern:
        return n * ok
    # Message i went to topic i % T; subscriber j listens to topic j % T.
    per_topic_msgs = [len(range(t, pub["sent"], args.topics)) for t in range(args.topics)]
    subs_per_topic = [len(range(t, n, args.topics)) for t in range(args.topics)]
    expected = sum(s * m for s, m in zip(subs_per_topic, per_topic_msgs, strict=True))
    if ok < pub["sent"]:  # which publishes failed is unknown: assume they spread evenly
        expected = round(expected * ok / max(1, pub["sent"]))
    return expected


def run_fanout(
    args: argparse.Namespace, ctx: Any, server: ServerHandle, ws_url: str
) -> dict[str, Any]:
    n = args.subscribers
    pid = server.pid
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    clients, setup = start_clients(args, ctx, ws_url, n, subscribe=True)
    if setup["connected"] < n:
        print(f"warning: only {setup['connected']} of {n} subscribers connected", file=sys.stderr)
    topics = [topic_name(t, args.topics) for t in range(args.topics)]
    pub_cpus = parse_cpus(args.publisher_cpus or args.client_cpus or "") or None
    plan = PublishPlan(
        host=server.host,
        port=server.port,
        topics=topics,
        rate=args.rate,
        duration=args.duration,
        payload=args.payload,
        durable=args.durable,
        conns=args.publish_conns,
        cpus=pub_cpus,
        realtime=args.publisher_rt,
    )
    frame_bytes = data_template(args.payload, topics[0])[1]
    parent, child = ctx.Pipe()
    pub = ctx.Process(target=publisher_process, args=(plan, child), daemon=True)
    pub.start()
    child.close()
    if not parent.poll(30):
        clients.kill()
        raise SystemExit("the publisher did not connect")
    parent.recv()

    profiler: subprocess.Popen[bytes] | None = None
    if args.py_spy and pid:
        profiler = subprocess.Popen(
            [
                args.py_spy_bin,
                "record",
                "--pid",
                str(pid),
                "--rate",
                str(args.py_spy_rate),
                "--duration",
                str(math.ceil(args.duration + 1)),
                "--format",
                args.py_spy_format,
                "--output",
                args.py_spy,
                "--nonblocking",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(1.0)

    t0 = time.monotonic_ns() + 300_000_000
    parent.send(t0)
    if server.trace:
        Path(server.trace + ".start").touch()
    while time.monotonic_ns() < t0:
        time.sleep(0.001)
    pids = Pids(pid, [p.pid or 0 for p in clients.procs], pub.pid or 0)
    everyone_before = all_proc_cpu()
    start = Sample.take(pids)
    w0 = start.t

    # Poll delivery while publishing, then drain.
    last_total = -1
    last_progress = w0
    mark = start
    pub_result: dict[str, Any] | None = None
    expected: int | None = None
    while True:
        time.sleep(args.poll_interval)
        now = time.monotonic()
        total, _closed = clients.poll()
        if total != last_total:
            last_total = total
            last_progress = now
            mark = Sample.take(pids)
        if pub_result is None and parent.poll():
            _, pub_result = parent.recv()
            expected = expected_frames(args, n, pub_result)
        if expected is not None:
            if total >= expected:
                break
            if now - last_progress > args.drain_timeout:
                break
        elif now - w0 > args.duration + 120:
            print("warning: the publisher did not finish", file=sys.stderr)
            break
    everyone_after = all_proc_cpu()
    t_after = time.monotonic()
    if profiler is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            profiler.wait(args.duration + 30)
    window = max(1e-9, mark.t - w0)
    ours_pids = {os.getpid(), pub.pid or 0, *pids.clients}
    if pid:
        ours_pids.add(pid)
    if profiler is not None:
        ours_pids.add(profiler.pid)  # --py-spy's sampler is ours, not a neighbour's
    noise, foreign_top = top_foreign(everyone_before, everyone_after, ours_pids, t_after - w0)
    kthreads = sum(
        cpu - everyone_before.get(p, (name, 0.0))[1]
        for p, (name, cpu) in everyone_after.items()
        if name.startswith("[")
    )
    if server.trace:
        server.request_trace()
    results = clients.finish()
    pub.join(10)
    hwm = proc_status_kb(pid, "VmHWM") if pid else -1
    rss = proc_status_kb(pid, "VmRSS") if pid else -1

    hist: dict[int, int] = {}
    for r in results:
        merge_hist(hist, r["hist"])
    p50, p90, p99, p999 = percentiles(hist, (0.50, 0.90, 0.99, 0.999))
    max_ns = max((r["max_ns"] for r in results), default=0)
    delivered = sum(sum(c for c in r["counts"] if c > 0) for r in results)
    assert pub_result is not None
    sent = pub_result["sent"]
    ok = pub_result["statuses"].get(200, 0)
    lag50, lag99, lagmax = percentiles(pub_result["lag_hist"], (0.5, 0.99, 1.0))
    rtt50, rtt99, rttmax = percentiles(pub_result["rtt_hist"], (0.5, 0.99, 1.0))
    exp = expected or 0
    server_cpu = mark.server - start.server
    client_pct = [
        round(100 * (b - a) / window, 1) for a, b in zip(start.clients, mark.clients, strict=True)
    ]
    pub_pct = round(100 * (mark.publisher - start.publisher) / window, 1)
    ours = server_cpu + sum(b - a for a, b in zip(start.clients, mark.clients, strict=True))
    ours += mark.publisher - start.publisher + mark.driver - start.driver

    def per_cpu(k: int) -> dict[str, float]:
        return {
            str(c): round(100 * (mark.cpus[c][k] - start.cpus[c][k]) / CLK_TCK / window, 1)
            for c in sorted(mark.cpus)
            if c in start.cpus
        }

    task_pct = per_cpu(0)
    irq_pct = per_cpu(1)
    steal_pct = per_cpu(2)
    busy_pct = {c: round(task_pct[c] + irq_pct[c], 1) for c in task_pct}
    # Tick-based accounting charges softirq ticks to the task they interrupted too, so the
    # processes' own times are compared with task + irq time.
    foreign = sum(busy_pct.values()) - 100 * ours / window
    short_subs = sum(1 for r in results for c in r["counts"] if c < 0)
    per_message: dict[str, Any] | None = None
    if args.per_message and results and results[0]["first"]:
        m = len(results[0]["first"])
        first = [min(r["first"][i] for r in results) for i in range(m)]
        last = [max(r["last"][i] for r in results) for i in range(m)]
        seen = [i for i in range(m) if last[i] >= 0]
        per_message = {
            "messages": len(seen),
            "first_arrival_ms": exact_summary_ms([first[i] for i in seen]),
            "last_arrival_ms": exact_summary_ms([last[i] for i in seen]),
            "spread_ms": exact_summary_ms([last[i] - first[i] for i in seen]),
        }
    trace = server.read_trace() if server.trace else None
    record: dict[str, Any] = {
        "mode": "fanout",
        "subscribers": n,
        "topics": args.topics,
        "pattern": args.pattern,
        "rate": args.rate,
        "duration_s": args.duration,
        "durable": args.durable,
        "payload_bytes": frame_bytes,
        "client": args.client,
        "clients": len(clients.procs),
        "publish_conns": args.publish_conns,
        "sample_every": args.sample_every,
        **setup,
        "published_ok": ok,
        "publish_sent": sent,
        "publish_statuses": {str(k): v for k, v in pub_result["statuses"].items()},
        "publish_errors": pub_result["errors"],
        "expected_frames": exp,
        "delivered_frames": delivered,
        "delivered_fraction": round(delivered / exp, 6) if exp else None,
        "window_s": round(window, 3),
        "delivered_fps": round(delivered / window),
        "latency_ms": {
            "p50": _ms(p50),
            "p90": _ms(p90),
            "p99": _ms(p99),
            "p99.9": _ms(p999),
            "max": round(max_ns / 1e6, 3),
        },
        "latency_samples": sum(hist.values()),
        "publisher_lag_ms": {"p50": _ms(lag50), "p99": _ms(lag99), "max": _ms(lagmax)},
        "publish_rtt_ms": {"p50": _ms(rtt50), "p99": _ms(rtt99), "max": _ms(rttmax)},
        "server_cpu_s": round(server_cpu, 3),
        "server_cpu_pct": round(100 * server_cpu / window, 1),
        "server_us_per_frame": round(1e6 * server_cpu / delivered, 3) if delivered else None,
        "server_peak_rss_mb": round(hwm / 1024, 1),
        "server_rss_end_mb": round(rss / 1024, 1),
        "client_cpu_pct": client_pct,
        "publisher_cpu_pct": pub_pct,
        "publisher_rt": pub_result.get("rt", False),
        "cpu_busy_pct": busy_pct,
        "cpu_softirq_pct": irq_pct,
        "cpu_steal_pct": steal_pct,
        # Busy CPU not charged to the benchmark's processes (softirq, kernel threads, others).
        "foreign_cpu_pct": round(foreign, 1),
        # CPU of other user processes during the run: other people's work on a shared
        # machine. A run with more than a few % here measured the neighbours too.
        "noise_pct": round(noise, 1),
        "noise_top_pct": foreign_top,
        "kernel_threads_pct": round(100 * kthreads / (t_after - w0), 1),
        "loadavg_before": load_before,
        "closed_early": sum(r["closed"] for r in results),
        "close_codes": {str(k): v for r in results for k, v in r["close_codes"].items()},
        "bad_frames": sum(r["bad"] for r in results),
        "unconnected_subscribers": short_subs,
    }
    if per_message is not None:
        record["per_message"] = per_message
    if trace is not None:
        record["server_trace"] = trace
    if args.py_spy:
        record["py_spy"] = os.path.basename(args.py_spy)
    if args.experiment:
        record["experiment"] = args.experiment
    return record


def human(record: dict[str, Any]) -> str:
    """A two-column table of a run's record."""
    rows: list[tuple[str, str]] = []
    for key, value in record.items():
        if key == "machine":
            continue
        if (
            isinstance(value, dict)
            and value
            and all(not isinstance(v, dict) for v in value.values())
        ):
            text = ", ".join(f"{k}={v}" for k, v in value.items())
        else:
            text = json.dumps(value) if isinstance(value, dict | list) else str(value)
        rows.append((key, text))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.fanout.driver",
        description="etherd fan-out latency driver (see the module docstring)",
    )
    p.add_argument("--subscribers", "-n", type=int, default=1000, help="N subscribers")
    p.add_argument("--topics", "-t", type=int, default=1, help="T topics, N/T subscribers each")
    p.add_argument("--pattern", action="store_true", help="subscribe to bench/* instead")
    p.add_argument("--rate", "-r", type=float, default=100.0, help="published msg/s (open loop)")
    p.add_argument("--duration", "-d", type=float, default=10.0, help="publish seconds")
    p.add_argument("--payload", type=int, default=134, help="event JSON bytes a client receives")
    p.add_argument("--durable", action="store_true", help="publish durable events (default not)")
    p.add_argument(
        "--client",
        choices=("picows", "raw"),
        default="picows",
        help="picows: a listener per frame; raw: count same-size frames per read (cheaper)",
    )
    p.add_argument("--clients", "-k", type=int, default=1, help="client processes")
    p.add_argument("--client-cpus", default="1", help="CPUs for clients and publisher ('' any)")
    p.add_argument(
        "--publisher-cpus", default=None, help="CPUs for the publisher (default clients')"
    )
    p.add_argument("--server-cpu", default="0", help="CPUs for the server ('' = no pinning)")
    p.add_argument(
        "--publisher-rt",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the publisher SCHED_FIFO so it sends on time (needs root/CAP_SYS_NICE)",
    )
    p.add_argument("--publish-conns", type=int, default=4, help="keep-alive publish connections")
    p.add_argument("--read-buffer", type=int, default=2048, help="picows read_buffer_init_size")
    p.add_argument("--connect-concurrency", type=int, default=100, help="handshakes in flight")
    p.add_argument("--connect-timeout", type=float, default=30.0)
    p.add_argument(
        "--sample-every", type=int, default=1, help="histogram every k-th frame (all counted)"
    )
    p.add_argument("--drain-timeout", type=float, default=5.0, help="stop after this long idle")
    p.add_argument("--poll-interval", type=float, default=0.1)
    p.add_argument("--url", help="target a running server (http://host:port) instead")
    p.add_argument("--server-pid", type=int, help="with --url: the server's pid, for CPU/RSS")
    p.add_argument("--store", help="store URL for the started server (default SQLite)")
    p.add_argument("--server-max-pending-mb", type=int, default=256, help="ws.max_pending_bytes")
    p.add_argument("--idle", type=int, default=0, help="idle mode: open N connections only")
    p.add_argument("--idle-no-subscribe", action="store_true", help="idle without subscribing")
    p.add_argument("--idle-settle", type=float, default=3.0, help="seconds before reading RSS")
    p.add_argument(
        "--per-message",
        action="store_true",
        help="also report each message's first arrival and fan-out spread",
    )
    p.add_argument(
        "--trace-server",
        metavar="FILE",
        help="run the server under traced_server.py (flush time, GC pauses, loop lag)",
    )
    p.add_argument(
        "--experiment",
        help="with --trace-server: apply a proposed etherd change (traced_server.py)",
    )
    p.add_argument("--py-spy", metavar="FILE", help="record the server with py-spy into FILE")
    p.add_argument("--py-spy-format", default="flamegraph", help="flamegraph, speedscope, raw")
    p.add_argument("--py-spy-rate", type=int, default=250)
    p.add_argument("--py-spy-bin", default=shutil.which("py-spy") or "py-spy")
    p.add_argument("--repeat", type=int, default=1, help="runs against the same server")
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=15.0,
        metavar="PCT",
        help="before each run wait until other processes use < PCT %% of a core (0: don't)",
    )
    p.add_argument(
        "--max-noise",
        type=float,
        default=5.0,
        metavar="PCT",
        help="a run where other processes used more than PCT %% of a core is noisy",
    )
    p.add_argument("--retry-noisy", type=int, default=0, help="rerun a noisy run up to N times")
    p.add_argument("--wait-quiet-max", type=float, default=300.0, help="give up waiting after s")
    p.add_argument("--label", default="", help="a name for the run in the JSON line")
    p.add_argument("--out", help="append the JSON line to this file")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    raise_nofile()
    ctx = mp.get_context("fork")
    client_cpus = parse_cpus(args.client_cpus) if args.client_cpus else None
    server: ServerHandle
    n_conns = args.idle or args.subscribers
    if args.url:
        m = re.match(r"https?://([^:/]+):(\d+)", args.url)
        if not m:
            raise SystemExit("--url must look like http://host:port")
        server = ServerHandle(m.group(1), int(m.group(2)), args.server_pid)
        wait_healthy(server.host, server.port)
    else:
        server = start_server(args, n_conns)
    pin(client_cpus)  # the driver itself stays off the server's core
    ws_url = f"ws://{server.host}:{server.port}/api/realtime?token={TOKEN}"
    try:
        for run in range(args.repeat):
            quiet = math.nan
            exclude = [server.pid] if server.pid else []
            if args.wait_quiet > 0:
                quiet = wait_quiet(args.wait_quiet, args.wait_quiet_max, exclude)
            if args.idle:
                record = run_idle(args, ctx, server, ws_url)
            else:
                for attempt in range(1 + args.retry_noisy):
                    record = run_fanout(args, ctx, server, ws_url)
                    record["attempt"] = attempt + 1
                    if record["noise_pct"] <= args.max_noise:
                        break
                    print(
                        f"noisy run ({record['noise_pct']} % of a core used by other "
                        f"processes: {record['noise_top_pct']}); retrying",
                        file=sys.stderr,
                    )
                    if args.wait_quiet > 0:
                        wait_quiet(args.wait_quiet, args.wait_quiet_max, exclude)
            record = {
                "label": args.label,
                "run": run + 1,
                **record,
                "quiet_before_pct": None if math.isnan(quiet) else round(quiet, 1),
                "machine": machine_info(),
            }
            print(human(record))
            line = json.dumps(record, separators=(",", ":"))
            if args.out:
                with open(args.out, "a", encoding="utf-8") as f:
                    f.write(line + "\n")
            else:
                print(line)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
