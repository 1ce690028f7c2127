"""The fan-out driver's subscribers: the C client (default) and the Python ones.

``--client c`` runs ``subclient.c`` (one thread for thousands of sockets, a fraction of
the CPU per frame of the Python clients). ``--client picows`` takes a picows listener per
frame; ``--client raw`` lets picows do the handshake, then counts same-size frames per
read. Only the Python clients track ``--per-message``. Either kind is spread over
``--clients`` processes pinned to the load core, and every kind fills the latency buckets
of ``bench.common.histogram``, so their figures merge and compare.
"""

from __future__ import annotations

import asyncio
import gc
import json
import re
import signal
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, Final

import uvloop
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

from bench.common.cpu import parse_cpus, pin, raise_nofile
from bench.common.histogram import (
    LINEAR_US,
    SUB_BUCKETS_LOG2,
    bucket_of,
    merge,
    new_hist,
    to_sparse,
)
from bench.common.subclient import SubClient

# Event data is {"t":"<20 digits>","s":"<10 digits>","p":"x..."}: fixed-width strings, so a
# frame's size does not change during a run and a reader finds t and s at fixed offsets.
MARK: Final = b'"t":"'
T_AT: Final = len(MARK)  # t's digits start this far after MARK
T_DIGITS: Final = 20
S_AT: Final = T_AT + T_DIGITS + len(b'","s":"')
S_DIGITS: Final = 10
TEXT: Final = WSMsgType.TEXT
TOPIC_PREFIX: Final = "bench/"


class ClientState:
    """Per-process tallies shared by every subscriber of the process."""

    def __init__(self) -> None:
        self.hist: list[int] = new_hist()
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
        self.hist[bucket_of(lat // 1000)] += 1
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
        self.hist[bucket_of(lat // 1000)] += 1
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
                # bucket_of, inlined: this loop is what lets one process take 1 M frames/s.
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
    uvloop.run(_client_main(plan, pipe))


# -- what every client kind reports --------------------------------------------------------


@dataclass
class Totals:
    """What the subscribers measured over a run, merged over client processes."""

    hist: dict[int, int]  # sparse latency histogram (bench.common.histogram buckets)
    max_ns: int
    delivered: int  # event frames received
    closed: int  # connections that went away before the end
    close_codes: dict[str, int]
    bad: int  # event frames with no readable "t"
    unconnected: int
    first: list[int] = field(default_factory=list)  # --per-message: earliest arrival (ns)
    last: list[int] = field(default_factory=list)  # and latest, per message


def topic_name(t: int, topics: int) -> str:
    """Topic ``t`` of ``topics``, zero-padded so every topic (and frame) has one size.

    ``subclient.c`` names them the same way.
    """
    return f"{TOPIC_PREFIX}{t:0{len(str(max(0, topics - 1)))}d}"


def topic_of(i: int, topics: int, pattern: bool) -> str:
    """The topic (or pattern) subscriber ``i`` takes."""
    return TOPIC_PREFIX + "*" if pattern else topic_name(i % topics, topics)


def blocks(n: int, k: int) -> list[range]:
    """``range(n)`` cut into ``k`` contiguous blocks of nearly equal size."""
    k = max(1, min(k, n)) if n else 1
    cuts = [round(j * n / k) for j in range(k + 1)]
    return [range(cuts[j], cuts[j + 1]) for j in range(k)]


@dataclass
class ClientOptions:
    """How the subscribers connect (the driver's command line)."""

    ws_url: str
    n: int
    topics: int
    pattern: bool
    processes: int
    cpus: str
    concurrency: int
    connect_timeout: float
    subscribe: bool = True
    read_buffer: int = 2048
    sample_every: int = 1
    per_message: int = 0
    raw: bool = False


# -- Python clients ------------------------------------------------------------------------


class PyClients:
    """``--client picows`` / ``raw``: subscriber processes forked from the driver."""

    def __init__(self, ctx: Any, opts: ClientOptions) -> None:
        self.ctx = ctx
        self.opts = opts
        self.procs: list[BaseProcess] = []
        self.pipes: list[Connection] = []

    @property
    def pids(self) -> list[int]:
        return [p.pid or 0 for p in self.procs]

    def start(self) -> dict[str, Any]:
        """Spawn the processes and wait until every subscriber is connected."""
        o = self.opts
        cpus = parse_cpus_or_none(o.cpus)
        for part in blocks(o.n, o.processes):
            plan = ClientPlan(
                ws_url=o.ws_url,
                topics=[topic_of(i, o.topics, o.pattern) for i in part],
                cpus=cpus,
                concurrency=o.concurrency,
                read_buffer=o.read_buffer,
                subscribe=o.subscribe,
                sample_every=o.sample_every,
                connect_timeout_s=o.connect_timeout,
                per_message=o.per_message,
                raw=o.raw,
            )
            parent, child = self.ctx.Pipe()
            proc = self.ctx.Process(target=client_process, args=(plan, child), daemon=True)
            proc.start()
            child.close()
            self.procs.append(proc)
            self.pipes.append(parent)
        started = time.monotonic()
        ok = 0
        errors: dict[str, int] = {}
        for pipe in self.pipes:
            if not pipe.poll(o.connect_timeout + o.n / 100 + 60):
                self.kill()
                raise SystemExit("a client process did not finish connecting")
            _, n_ok, errs, _took = pipe.recv()
            ok += n_ok
            merge(errors, errs)
        return {
            "connected": ok,
            "connect_errors": errors,
            "connect_s": round(time.monotonic() - started, 3),
        }

    def poll(self) -> int:
        """Event frames received so far, over all processes."""
        for pipe in self.pipes:
            pipe.send("poll")
        return sum(pipe.recv()[1] for pipe in self.pipes)

    def finish(self, timeout: float = 60.0) -> Totals:
        for pipe in self.pipes:
            pipe.send("finish")
        results: list[dict[str, Any]] = []
        for pipe in self.pipes:
            if not pipe.poll(timeout):
                raise SystemExit("a client process did not answer finish")
            results.append(pipe.recv()[1])
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.terminate()
        hist: dict[int, int] = {}
        codes: dict[str, int] = {}
        for r in results:
            merge(hist, r["hist"])
            merge(codes, {str(k): v for k, v in r["close_codes"].items()})
        totals = Totals(
            hist=hist,
            max_ns=max((r["max_ns"] for r in results), default=0),
            delivered=sum(sum(c for c in r["counts"] if c > 0) for r in results),
            closed=sum(r["closed"] for r in results),
            close_codes=codes,
            bad=sum(r["bad"] for r in results),
            unconnected=sum(1 for r in results for c in r["counts"] if c < 0),
        )
        if results and results[0]["first"]:
            m = len(results[0]["first"])
            totals.first = [min(r["first"][i] for r in results) for i in range(m)]
            totals.last = [max(r["last"][i] for r in results) for i in range(m)]
        return totals

    def kill(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.terminate()


def parse_cpus_or_none(text: str) -> set[int] | None:
    """A CPU list, or None for "no pinning"."""
    return parse_cpus(text) or None


# -- the C client --------------------------------------------------------------------------


class CClients:
    """``--client c``: ``subclient`` processes, each holding a block of the subscribers."""

    def __init__(self, opts: ClientOptions) -> None:
        self.opts = opts
        self.procs: list[SubClient] = []

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def start(self) -> dict[str, Any]:
        o = self.opts
        started = time.monotonic()
        for part in blocks(o.n, o.processes):
            self.procs.append(
                SubClient(
                    o.ws_url,
                    len(part),
                    first=part.start,
                    topics=o.topics,
                    prefix=TOPIC_PREFIX,
                    pattern=TOPIC_PREFIX + "*" if o.pattern else None,
                    concurrency=o.concurrency,
                    connect_timeout=o.connect_timeout,
                    subscribe=o.subscribe,
                    cpus=o.cpus or None,
                )
            )
        ok = 0
        errors: dict[str, int] = {}
        for p in self.procs:
            got, failed = p.wait_ready(o.connect_timeout + o.n / 100 + 60)
            ok += got
            if failed:
                merge(errors, p.report()["connections"]["errors"])
        return {
            "connected": ok,
            "connect_errors": errors,
            "connect_s": round(time.monotonic() - started, 3),
        }

    def poll(self) -> int:
        return sum(p.count() for p in self.procs)

    def finish(self, timeout: float = 60.0) -> Totals:
        reports = [p.report() for p in self.procs]
        for p in self.procs:
            p.close()
        hist: dict[int, int] = {}
        codes: dict[str, int] = {}
        for r in reports:
            merge(hist, r["hist"])
            merge(codes, r["closes"])
        max_ms = max((r["latency_ms"]["max"] or 0.0 for r in reports), default=0.0)
        return Totals(
            hist=hist,
            max_ns=round(max_ms * 1e6),
            delivered=sum(r["text_frames"] for r in reports),
            closed=sum(r["connections"]["lost"] + sum(r["closes"].values()) for r in reports),
            close_codes=codes,
            bad=sum(r["no_t"] for r in reports),
            unconnected=sum(r["connections"]["failed"] for r in reports),
        )

    def kill(self) -> None:
        for p in self.procs:
            p.close()


def make_clients(kind: str, ctx: Any, opts: ClientOptions) -> PyClients | CClients:
    """The subscriber side for ``--client`` ``c``, ``picows`` or ``raw``."""
    if kind == "c":
        return CClients(opts)
    opts.raw = kind == "raw"
    return PyClients(ctx, opts)
