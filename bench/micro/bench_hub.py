"""Micro-benchmarks for ``etherd.core.hub``: frame building and the publish-then-flush fan-out.

No sockets: subscribers are fake sinks that count what they are given, and the event loop
is a list of callbacks run by hand (the pattern of ``tests/unit/core/test_hub.py``). A
fan-out round is ``publish`` (trie lookup, a segment opened, flush scheduled) plus running
the scheduled flushes until every subscriber's write happened, so the clock stops only
after the last write.

    python -m pytest bench/micro --benchmark-only -q -p no:cacheprovider
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from etherd.core.events import StoredEvent
from etherd.core.frames import ws_text_frame
from etherd.core.hub import KIND_SSE, KIND_WS, Hub, Pending, Prepared, Resuming
from etherd.core.wire import event_json

# The server's default (config ``realtime.fanout_slice``).
FANOUT_SLICE = 2_000
TOPIC = "tasks/task_0b5c6f1e3f554a8e9f0e"
STEP = (
    b'{"task_id":"task_0b5c6f1e3f554a8e9f0e","run_id":"run_1","phase":"edit",'
    b'"user_message":"Editing checkout.py","internal_label":""}'
)
JSON = event_json(TOPIC, "os.harness.step", 1742, 1_764_400_000_123, STEP)


class CountingSink:
    """A hub sink whose write only counts (a list of writes would grow without bound)."""

    __slots__ = ("alive", "bytes", "direct", "kind", "pending", "resuming", "writes")
    max_pending = 1 << 30

    def __init__(self, kind: int = KIND_WS) -> None:
        self.kind = kind
        self.pending: list[Pending] = []
        self.resuming: dict[str, Resuming] | None = None
        self.alive = True
        # Like an open WebSocket session with one subscription.
        self.direct = kind == KIND_WS
        self.writes = 0
        self.bytes = 0

    def slow_consumer(self) -> None:
        self.alive = False

    def write(self, data: bytes) -> None:
        self.writes += 1
        self.bytes += len(data)

    def send(self, data: bytes) -> None:
        self.writes += 1
        self.bytes += len(data)

    def __hash__(self) -> int:
        return id(self)


class Loop:
    """Collects scheduled callbacks; ``drain`` runs them (and what they schedule) to the end."""

    def __init__(self) -> None:
        self.ready: list[Callable[[], None]] = []

    def call_soon(self, cb: Callable[[], None]) -> None:
        self.ready.append(cb)

    def drain(self) -> int:
        ticks = 0
        while self.ready:
            batch, self.ready = self.ready, []
            for cb in batch:
                cb()
            ticks += 1
        return ticks


# -- frames ---------------------------------------------------------------------------------

SIZES = pytest.mark.parametrize("size", [100, 10_000, 100_000], ids=["100B", "10KB", "100KB"])


@SIZES
def test_ws_text_frame(benchmark: BenchmarkFixture, size: int) -> None:
    payload = b"x" * size
    frame = benchmark(ws_text_frame, payload)
    assert len(frame) - size in (2, 4, 10)


@SIZES
def test_prepared(benchmark: BenchmarkFixture, size: int) -> None:
    """What ``publish_stored`` builds per event: the WebSocket frame is made eagerly."""
    payload = b"x" * size
    prepared = benchmark(Prepared, TOPIC, "os.harness.step", 1742, payload)
    assert prepared.ws.endswith(payload)


@SIZES
def test_prepared_sse(benchmark: BenchmarkFixture, size: int) -> None:
    """``Prepared(...).sse``: the object, its WebSocket frame and the SSE chunk, first use."""
    payload = b"x" * size

    def build() -> bytes:
        return Prepared(TOPIC, "os.harness.step", 1742, payload).sse

    chunk = benchmark(build)
    assert chunk.endswith(b"\n\n\r\n")


def test_prepared_sse_cached(benchmark: BenchmarkFixture) -> None:
    """The second and later SSE subscribers of an event read the cached chunk."""
    prepared = Prepared(TOPIC, "os.harness.step", 1742, JSON)
    first = prepared.sse
    assert benchmark(lambda: prepared.sse) is first


# -- publish + flush ------------------------------------------------------------------------


def hub_with(subscribers: int, kind: int = KIND_WS) -> tuple[Hub, Loop, list[CountingSink]]:
    loop = Loop()
    hub = Hub(loop.call_soon, fanout_slice=FANOUT_SLICE)
    sinks = [CountingSink(kind) for _ in range(subscribers)]
    for sink in sinks:
        hub.subscribe(TOPIC, sink)
    for i in range(1_000):  # other, quieter topics in the trie
        hub.subscribe(f"tasks/other{i}", CountingSink())
    return hub, loop, sinks


SUBSCRIBERS = pytest.mark.parametrize("n", [1, 100, 10_000], ids=["1", "100", "10k"])


@SUBSCRIBERS
def test_publish_flush(benchmark: BenchmarkFixture, n: int) -> None:
    """One event to n WebSocket subscribers, until the last one's write."""
    hub, loop, sinks = hub_with(n)
    prepared = Prepared(TOPIC, "os.harness.step", 1742, JSON)

    def round_() -> int:
        queued = hub.publish(prepared)
        loop.drain()
        return queued

    assert benchmark(round_) == n
    assert sinks[-1].writes == sinks[0].writes > 0
    assert hub.writes == sinks[0].writes * n


@SUBSCRIBERS
def test_publish_stored_flush(benchmark: BenchmarkFixture, n: int) -> None:
    """The committed-event path: envelope and frame built once, then fan-out and flush."""
    hub, loop, sinks = hub_with(n)
    events = [StoredEvent(TOPIC, 1742, 1_764_400_000_123, "os.harness.step", STEP)]

    def round_() -> int:
        queued = hub.publish_stored(events)
        loop.drain()
        return queued

    assert benchmark(round_) == n
    assert sinks[-1].writes == sinks[0].writes > 0


@SUBSCRIBERS
def test_publish_10_per_tick_flush(benchmark: BenchmarkFixture, n: int) -> None:
    """Ten events in one loop iteration: coalesced into one write per subscriber."""
    hub, loop, sinks = hub_with(n)
    batch = [Prepared(TOPIC, "os.harness.step", i, JSON) for i in range(10)]

    def round_() -> int:
        queued = 0
        for prepared in batch:
            queued += hub.publish(prepared)
        loop.drain()
        return queued

    assert benchmark(round_) == 10 * n
    assert sinks[-1].writes == sinks[0].writes > 0
    assert sinks[0].bytes == sinks[0].writes * 10 * len(batch[0].ws)


def test_publish_flush_sse_100(benchmark: BenchmarkFixture) -> None:
    """100 SSE subscribers: the chunk is built once per event and shared."""
    hub, loop, _ = hub_with(100, KIND_SSE)

    def round_() -> int:
        queued = hub.publish(Prepared(TOPIC, "os.harness.step", 1742, JSON))
        loop.drain()
        return queued

    assert benchmark(round_) == 100


def test_publish_no_subscriber(benchmark: BenchmarkFixture) -> None:
    """An event nobody listens to: the trie miss and nothing else."""
    hub, loop, _ = hub_with(0)
    prepared = Prepared("tasks/nobody", "os.harness.step", 1, JSON)

    def round_() -> int:
        queued = hub.publish(prepared)
        loop.drain()
        return queued

    assert benchmark(round_) == 0
