"""The fan-out driver's open-loop HTTP publisher: one event per ``POST /api/publish``.

Event ``i`` is due at ``t0 + i / R`` and carries that *scheduled* ``time.monotonic_ns()``
as ``t``, so a late send counts as latency (no coordinated omission) and the publisher's
own lag is reported beside it. Requests are pipelined over ``conns`` keep-alive
connections without waiting for answers, and the process runs ``SCHED_FIFO`` on the load
core so the subscribers there do not delay its sends. The same publisher drives etherd and
the uWS peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Final

import uvloop

from bench.common.cpu import pin, raise_nofile
from bench.common.histogram import bucket_of, new_hist, to_sparse
from bench.common.http import HttpConn
from bench.common.openloop import schedule

EVENT: Final = "bench"
T_DIGITS: Final = 20
S_DIGITS: Final = 10


@dataclass
class PublishPlan:
    """What the publisher process sends."""

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


def envelope_size(topic: str, durable: bool, data: bytes) -> int:
    """Bytes of the event JSON a subscriber receives for ``data`` (etherd's envelope:
    type, event, topic, offset when durable, an RFC 3339 ``ts`` with milliseconds)."""
    offset = b'"offset":%d,' % 1 if durable else b""
    head = b'{"type":"%s","event":"%s","topic":"%s",%s"ts":"2026-01-01T00:00:00.000Z"' % (
        EVENT.encode(),
        EVENT.encode(),
        topic.encode(),
        offset,
    )
    return len(head) + 1 + len(data) - 1  # "," + data without its "{"


def data_template(payload: int, topic: str, durable: bool = False) -> tuple[bytes, int]:
    """The ``data`` object's text with ``%d`` slots for t and s, and the event's size.

    Pads so that the event JSON a subscriber receives is ``payload`` bytes (or the least
    it can be). Fields are fixed-width, so every frame of a run has one size.
    """
    head = b'{"t":"%0' + str(T_DIGITS).encode() + b'd","s":"%0' + str(S_DIGITS).encode() + b'd"'
    probe = head % (0, 0) + b',"p":""}'
    size = envelope_size(topic, durable, probe)
    pad = max(0, payload - size)
    return head + b',"p":"' + b"x" * pad + b'"}', size + pad


class _Conn(HttpConn):
    def __init__(self, tally: _Tally) -> None:
        super().__init__()
        self.tally = tally

    def answered(self, status: int, body: bytes, sent_ns: int, now_ns: int) -> None:
        t = self.tally
        t.statuses[status] = t.statuses.get(status, 0) + 1
        if status == 0:
            t.errors["connection lost"] = t.errors.get("connection lost", 0) + 1
        else:
            t.rtt_hist[bucket_of((now_ns - sent_ns) // 1000)] += 1
        t.answered += 1
        if t.answered == t.total:
            t.done.set()


class _Tally:
    def __init__(self, total: int) -> None:
        self.total = total
        self.answered = 0
        self.statuses: dict[int, int] = {}
        self.errors: dict[str, int] = {}
        self.lag_hist = new_hist()  # send time - scheduled time
        self.rtt_hist = new_hist()  # answer time - send time
        self.done = asyncio.Event()


async def _publish(plan: PublishPlan, pipe: Connection) -> None:
    loop = asyncio.get_running_loop()
    total = round(plan.rate * plan.duration)
    tally = _Tally(total)
    conns: list[_Conn] = []
    for _ in range(plan.conns):
        _, conn = await loop.create_connection(lambda: _Conn(tally), plan.host, plan.port)
        conns.append(conn)
    template = {t: data_template(plan.payload, t, plan.durable)[0] for t in plan.topics}
    durable = b"true" if plan.durable else b"false"
    head = (
        b"POST /api/publish HTTP/1.1\r\nHost: %s:%d\r\nAuthorization: Bearer test\r\n"
        b"Content-Type: application/json\r\nContent-Length: %%d\r\n\r\n"
        % (plan.host.encode(), plan.port)
    )
    prefix = {
        t: b'{"topic":"%s","event":"%s","durable":%s,"data":'
        % (t.encode(), EVENT.encode(), durable)
        for t in plan.topics
    }
    pipe.send(("ready",))
    t0: int = pipe.recv()
    ntopics = len(plan.topics)
    sent = 0
    first_send = last_send = 0
    async for i, due in schedule(t0, plan.rate, total=total):
        now = time.monotonic_ns()
        first_send = first_send or now
        topic = plan.topics[i % ntopics]
        body = prefix[topic] + template[topic] % (due, i) + b"}"
        conns[i % len(conns)].send(head % len(body) + body)
        tally.lag_hist[bucket_of((now - due) // 1000)] += 1
        sent = i + 1
        last_send = now
    if total:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(tally.done.wait(), 60.0)
    for c in conns:
        c.close()
    result: dict[str, Any] = {
        "planned": total,
        "sent": sent,
        "answered": tally.answered,
        "statuses": tally.statuses,
        "errors": tally.errors,
        "lag_hist": to_sparse(tally.lag_hist),
        "rtt_hist": to_sparse(tally.rtt_hist),
        "send_span_s": (last_send - first_send) / 1e9,
        "rt": plan.realtime,
    }
    pipe.send(("result", result))


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
    uvloop.run(_publish(plan, pipe))
