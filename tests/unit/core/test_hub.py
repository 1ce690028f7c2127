"""The hub without sockets: encode once, one write per sink per tick, slicing, holding."""

from __future__ import annotations

from collections.abc import Callable

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from etherd.core.events import StoredEvent
from etherd.core.frames import ws_text_frame
from etherd.core.hub import KIND_SSE, KIND_WS, Hub, Pending, Prepared, Resuming


class FakeSink:
    """A subscriber that records its writes; ``direct`` WebSocket sinks by default."""

    max_pending = 1 << 30

    def __init__(self, kind: int = KIND_WS, direct: bool | None = None) -> None:
        self.kind = kind
        self.pending: list[Pending] = []
        self.resuming: dict[str, Resuming] | None = None
        self.alive = True
        self.direct = kind == KIND_WS if direct is None else direct
        self.writes: list[bytes] = []
        self.slow = False
        self.sends = 0

    def send(self, data: bytes) -> None:
        assert self.direct and self.alive
        self.sends += 1
        self.writes.append(data)

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def close(self) -> None:
        self.alive = self.direct = False

    def slow_consumer(self) -> None:
        self.slow = True
        self.close()

    def __hash__(self) -> int:
        return id(self)


class Loop:
    """Collects scheduled callbacks; run() plays one loop iteration's worth."""

    def __init__(self) -> None:
        self.ready: list[Callable[[], None]] = []

    def call_soon(self, cb: Callable[[], None]) -> None:
        self.ready.append(cb)

    def run(self) -> int:
        """One loop iteration's callbacks, counting the hub's hop to the back of the queue
        (``Hub._flush_later``) as part of the flush it schedules."""
        ran = 0
        while self.ready:
            batch, self.ready = self.ready, []
            hops = 0
            for cb in batch:
                cb()
                if getattr(cb, "__name__", "") == "_flush_later":
                    hops += 1
            ran += len(batch) - hops
            if hops < len(batch):
                break
        return ran


def prepared(topic: str, n: int) -> Prepared:
    return Prepared(topic, "e", n, b'{"n":%d}' % n)


def frames(data: bytes) -> list[bytes]:
    """Split concatenated unmasked server frames into payloads."""
    out = []
    while data:
        assert data[0] == 0x81
        n = data[1]
        start = 2
        if n == 126:
            n, start = int.from_bytes(data[2:4], "big"), 4
        elif n == 127:
            n, start = int.from_bytes(data[2:10], "big"), 10
        out.append(data[start : start + n])
        data = data[start + n :]
    return out


def test_frame_lengths() -> None:
    for size in (0, 125, 126, 65535, 65536):
        payload = b"x" * size
        assert frames(ws_text_frame(payload)) == [payload]


def test_one_write_per_sink_per_tick() -> None:
    loop = Loop()
    hub = Hub(loop.call_soon, fanout_slice=1000)
    sinks = [FakeSink() for _ in range(3)]
    for s in sinks:
        hub.subscribe("t/a", s)
    for n in range(1, 11):
        hub.publish(prepared("t/a", n))
    assert all(s.writes == [] for s in sinks)  # nothing written inside the tick
    assert loop.run() == 1
    for s in sinks:
        assert len(s.writes) == 1
        assert frames(s.writes[0]) == [b'{"n":%d}' % n for n in range(1, 11)]
    assert hub.writes == 3 and hub.frames_queued == 30


def test_frames_are_shared_not_copied() -> None:
    loop = Loop()
    hub = Hub(loop.call_soon, fanout_slice=1000)
    a, b = FakeSink(), FakeSink()
    hub.subscribe("t/a", a)
    hub.subscribe("t/>", b)
    p = prepared("t/a", 1)
    hub.publish(p)
    loop.run()
    assert a.writes[0] is p.ws and b.writes[0] is p.ws


def test_sse_sinks_get_chunks() -> None:
    loop = Loop()
    hub = Hub(loop.call_soon, fanout_slice=1000)
    sse = FakeSink(KIND_SSE)
    hub.subscribe("t/a", sse)
    hub.publish(prepared("t/a", 7))
    loop.run()
    chunk = b'id: 7\nevent: e\ndata: {"n":7}\n\n'
    assert sse.writes == [b"%x\r\n%s\r\n" % (len(chunk), chunk)]


def test_large_fanout_is_sliced_and_keeps_order() -> None:
    loop = Loop()
    hub = Hub(loop.call_soon, fanout_slice=10)
    sinks = [FakeSink() for _ in range(35)]
    for s in sinks:
        hub.subscribe("t/a", s)
    hub.publish(prepared("t/a", 1))
    assert loop.run() == 1
    assert sum(bool(s.writes) for s in sinks) == 10
    hub.publish(prepared("t/a", 2))  # arrives while the first fan-out is still going
    while loop.run():
        pass
    for s in sinks:
        assert [p for w in s.writes for p in frames(w)] == [b'{"n":1}', b'{"n":2}']


def test_dead_sinks_are_not_written() -> None:
    loop = Loop()
    hub = Hub(loop.call_soon, fanout_slice=1000)
    s = FakeSink()
    hub.subscribe("t/a", s)
    hub.publish(prepared("t/a", 1))
    s.close()
    loop.run()
    assert s.writes == [] and s.pending == []


def test_resume_holds_then_releases_without_duplicates() -> None:
    loop = Loop()
    hub = Hub(loop.call_soon, fanout_slice=1000)
    s = FakeSink()
    hub.hold(s, "t/a", 2)
    hub.subscribe("t/a", s)
    hub.subscribe("t/b", s)
    hub.publish(prepared("t/a", 5))  # committed after the replay was read: held
    hub.publish(prepared("t/b", 1))  # another topic: not affected
    loop.run()
    assert frames(s.writes[0]) == [b'{"n":1}']
    # The replay held 3..5 (5 committed before the read but published after it).
    for n in (3, 4, 5):
        hub.queue(s, prepared("t/a", n).ws)
    hub.release(s, "t/a", 5)
    hub.publish(prepared("t/a", 5))  # the same event published late: dropped
    hub.publish(prepared("t/a", 6))
    hub.publish(prepared("t/a", 7))
    loop.run()
    got = [p for w in s.writes[1:] for p in frames(w)]
    assert got == [b'{"n":%d}' % n for n in (3, 4, 5, 6, 7)]
    assert s.resuming is None  # the first event past the replay ends the check


def test_release_passes_held_events_past_the_replay() -> None:
    loop = Loop()
    hub = Hub(loop.call_soon, fanout_slice=1000)
    s = FakeSink()
    hub.hold(s, "t/a", 0)
    hub.subscribe("t/a", s)
    for n in (1, 2, 3):
        hub.publish(prepared("t/a", n))
    hub.queue(s, prepared("t/a", 1).ws)  # the replay saw only event 1
    hub.release(s, "t/a", 1)
    loop.run()
    assert [p for w in s.writes for p in frames(w)] == [b'{"n":1}', b'{"n":2}', b'{"n":3}']
    hub.forget(s, "t/a")
    assert s.resuming is None


def test_unsubscribe_all_leaves_nothing() -> None:
    loop = Loop()
    hub = Hub(loop.call_soon, fanout_slice=1000)
    s = FakeSink()
    topics = ["t/a", "t/*", "u/>"]
    for t in topics:
        hub.subscribe(t, s)
    assert hub.subscription_count == 3
    hub.unsubscribe_all(topics, s)
    assert hub.is_empty() and hub.publish(prepared("t/a", 1)) == 0


def test_publish_stored_builds_the_envelope() -> None:
    loop = Loop()
    hub = Hub(loop.call_soon, fanout_slice=1000)
    s = FakeSink()
    hub.subscribe("tasks/x", s)
    hub.publish_stored(
        [
            StoredEvent(
                "tasks/x", 3, 1_764_400_000_123, "os.harness.step", b'{"task_id":"x","phase":"p"}'
            )
        ]
    )
    loop.run()
    event = msgspec.json.decode(frames(s.writes[0])[0])
    assert event == {
        "type": "os.harness.step",
        "event": "os.harness.step",
        "topic": "tasks/x",
        "offset": 3,
        "ts": "2025-11-29T07:06:40.123Z",
        "task_id": "x",
        "phase": "p",
    }


def written(sink: FakeSink) -> list[bytes]:
    return [p for w in sink.writes for p in frames(w)]


def test_a_topic_published_many_times_per_tick_costs_one_pass() -> None:
    loop = Loop()
    hub = Hub(loop.call_soon, fanout_slice=10_000)
    sinks = [FakeSink() for _ in range(1000)]
    for s in sinks:
        hub.subscribe("t/a", s)
    for n in range(10):
        hub.publish(prepared("t/a", n))
    assert all(s.pending == [] and s.writes == [] for s in sinks)  # publishing touched none
    loop.run()
    first = sinks[0].writes[0]
    assert all(s.writes == [first] for s in sinks)
    assert all(s.writes[0] is first for s in sinks)  # joined once, the same bytes for all


def test_a_reply_between_events_keeps_its_place() -> None:
    loop = Loop()
    hub = Hub(loop.call_soon, fanout_slice=1000)
    a, b = FakeSink(), FakeSink()
    hub.subscribe("t/a", a)
    hub.subscribe("t/a", b)
    hub.publish(prepared("t/a", 1))
    hub.queue(a, ws_text_frame(b"reply"))
    hub.publish(prepared("t/a", 2))
    loop.run()
    assert written(a) == [b'{"n":1}', b"reply", b'{"n":2}']
    assert written(b) == [b'{"n":1}', b'{"n":2}']


def test_events_of_several_topics_keep_their_order() -> None:
    loop = Loop()
    hub = Hub(loop.call_soon, fanout_slice=1000)
    both, only_a = FakeSink(), FakeSink()
    hub.subscribe("t/a", both)
    hub.subscribe("t/b", both)
    hub.subscribe("t/a", only_a)
    hub.publish(prepared("t/a", 1))
    hub.publish(prepared("t/b", 2))
    hub.publish(prepared("t/a", 3))
    loop.run()
    assert written(both) == [b'{"n":1}', b'{"n":2}', b'{"n":3}']
    assert written(only_a) == [b'{"n":1}', b'{"n":3}']


def test_resuming_sink_inside_a_shared_fanout() -> None:
    loop = Loop()
    hub = Hub(loop.call_soon, fanout_slice=1000)
    live, resuming = FakeSink(), FakeSink()
    hub.subscribe("t/a", live)
    hub.subscribe("t/a", resuming)
    hub.hold(resuming, "t/a", 0)
    hub.publish(prepared("t/a", 1))
    hub.publish(prepared("t/a", 2))
    loop.run()
    assert written(live) == [b'{"n":1}', b'{"n":2}'] and resuming.writes == []
    hub.queue(resuming, prepared("t/a", 1).ws)  # the replay saw event 1 only
    hub.release(resuming, "t/a", 1)
    hub.publish(prepared("t/a", 3))
    loop.run()
    assert written(resuming) == [b'{"n":1}', b'{"n":2}', b'{"n":3}']
    assert written(live) == [b'{"n":1}', b'{"n":2}', b'{"n":3}']


def test_hold_during_an_open_fanout_applies_to_later_events() -> None:
    loop = Loop()
    hub = Hub(loop.call_soon, fanout_slice=1000)
    s, other = FakeSink(), FakeSink()
    hub.subscribe("t/a", s)
    hub.subscribe("t/a", other)
    hub.publish(prepared("t/a", 5))  # opens a segment that s holds a reference to
    hub.hold(s, "t/a", 5)  # a resume from 5 starts in the same tick
    hub.publish(prepared("t/a", 6))  # must wait for the replay, not ride the segment
    loop.run()
    assert written(s) == [b'{"n":5}']
    assert written(other) == [b'{"n":5}', b'{"n":6}']
    hub.release(s, "t/a", 5)
    loop.run()
    assert written(s) == [b'{"n":5}', b'{"n":6}']


def test_sse_and_ws_sinks_share_a_segment() -> None:
    loop = Loop()
    hub = Hub(loop.call_soon, fanout_slice=1000)
    ws, sse = FakeSink(KIND_WS), FakeSink(KIND_SSE)
    hub.subscribe("t/a", ws)
    hub.subscribe("t/a", sse)
    p1, p2 = prepared("t/a", 1), prepared("t/a", 2)
    hub.publish(p1)
    hub.publish(p2)
    loop.run()
    assert ws.writes == [p1.ws + p2.ws]
    assert sse.writes == [p1.sse + p2.sse]


def test_direct_sinks_get_one_send_and_others_one_coalesced_write() -> None:
    loop = Loop()
    hub = Hub(loop.call_soon, fanout_slice=1000)
    direct, both = FakeSink(), FakeSink(direct=False)
    hub.subscribe("t/a", direct)
    hub.subscribe("t/a", both)
    hub.subscribe("t/b", both)
    hub.publish(prepared("t/a", 1))
    hub.publish(prepared("t/b", 2))
    loop.run()
    assert direct.sends == 1 and written(direct) == [b'{"n":1}']
    assert both.sends == 0 and len(both.writes) == 1  # two segments, one write
    assert written(both) == [b'{"n":1}', b'{"n":2}']
    assert hub.writes == 2


def test_a_direct_sink_with_its_own_bytes_waiting_keeps_their_order() -> None:
    loop = Loop()
    hub = Hub(loop.call_soon, fanout_slice=1000)
    s = FakeSink()
    hub.subscribe("t/a", s)
    hub.queue(s, ws_text_frame(b"first"))
    hub.publish(prepared("t/a", 1))
    hub.queue(s, ws_text_frame(b"last"))
    loop.run()
    assert s.sends == 0 and len(s.writes) == 1
    assert written(s) == [b"first", b'{"n":1}', b"last"]


def test_slices_keep_order_with_replies_queued_in_between() -> None:
    loop = Loop()
    hub = Hub(loop.call_soon, fanout_slice=4)
    sinks = [FakeSink() for _ in range(10)]
    for s in sinks:
        hub.subscribe("t/a", s)
    hub.publish(prepared("t/a", 1))
    loop.run()  # only the first slice is written
    late = sinks[-1]
    hub.queue(late, ws_text_frame(b"reply"))  # queued after event 1 was published
    hub.publish(prepared("t/a", 2))
    while loop.run():
        pass
    assert written(late) == [b'{"n":1}', b"reply", b'{"n":2}']
    for s in sinks[:-1]:
        assert written(s) == [b'{"n":1}', b'{"n":2}']


@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("pub"), st.sampled_from(["a", "b", "c"])),
            st.tuples(st.just("reply"), st.integers(0, 3)),
            st.tuples(st.just("flush"), st.none()),
        ),
        max_size=40,
    ),
    st.lists(st.sets(st.sampled_from(["a", "b", "c"]), max_size=2), min_size=4, max_size=4),
    st.integers(1, 5),
)
@settings(max_examples=200, deadline=None)
def test_every_sink_sees_exactly_what_was_queued_for_it_in_order(
    ops: list[tuple[str, object]], subscriptions: list[set[str]], slice_size: int
) -> None:
    loop = Loop()
    hub = Hub(loop.call_soon, fanout_slice=slice_size)
    sinks = [FakeSink(direct=len(topics) <= 1) for topics in subscriptions]
    expected: list[list[bytes]] = [[] for _ in sinks]
    for sink, topics in zip(sinks, subscriptions, strict=True):
        for topic in topics:
            hub.subscribe(f"t/{topic}", sink)
    n = 0
    for op, arg in ops:
        if op == "pub":
            n += 1
            hub.publish(prepared(f"t/{arg}", n))
            for i, topics in enumerate(subscriptions):
                if arg in topics:
                    expected[i].append(b'{"n":%d}' % n)
        elif op == "reply":
            assert isinstance(arg, int)
            marker = b"reply-%d" % n
            hub.queue(sinks[arg], ws_text_frame(marker))
            expected[arg].append(marker)
        else:
            loop.run()
    while loop.run():
        pass
    for sink, want in zip(sinks, expected, strict=True):
        assert written(sink) == want
        assert sink.pending == []


def test_events_published_between_slices_reach_each_sink_in_one_write() -> None:
    """A backlog of one topic behind a sliced fan-out: every later segment to the same
    subscribers goes with the next one, in one write per sink, in order; a sink with a
    reply of its own gets each event and the reply in their order."""
    loop = Loop()
    hub = Hub(loop.call_soon, fanout_slice=2)
    sinks = [FakeSink() for _ in range(4)]
    for s in sinks:
        hub.subscribe("t/a", s)
    hub.publish(prepared("t/a", 1))
    hub.flush()  # the first slice of event 1: sinks 0 and 1
    hub.publish(prepared("t/a", 2))
    hub.queue(sinks[3], ws_text_frame(b"reply"))  # seals: event 3 opens a segment of its own
    hub.publish(prepared("t/a", 3))
    while loop.ready or hub._segments:
        loop.run()
        if hub._segments or hub._dirty:
            hub.flush()
    got = [[p for w in s.writes for p in frames(w)] for s in sinks]
    ev = [b'{"n":%d}' % n for n in (1, 2, 3)]
    assert got[:3] == [[ev[0], ev[1], ev[2]]] * 3
    assert got[3] == [ev[0], ev[1], b"reply", ev[2]]
    # Events 2 and 3 went together to each sink that had nothing of its own waiting.
    assert all(len(s.writes) == 2 for s in sinks[:3])


def test_flush_soon_waits_for_every_handler_started_before_it() -> None:
    # Two connections' requests arrive in one loop iteration: each starts its handler and
    # calls flush_soon. Both handlers' events must leave in the one flush that follows
    # them, not the second one's a whole fan-out later.
    loop = Loop()
    hub = Hub(loop.call_soon, 1000)
    sink = FakeSink()
    hub.subscribe("t", sink)

    def handler(n: int) -> Callable[[], None]:
        def run() -> None:
            hub.publish(prepared("t", n))

        return run

    loop.call_soon(handler(1))  # connection 1's handler
    hub.flush_soon()
    loop.call_soon(handler(2))  # connection 2's handler
    hub.flush_soon()
    batch, loop.ready = loop.ready, []
    for cb in batch:
        cb()
    assert sink.writes == [ws_text_frame(b'{"n":1}') + ws_text_frame(b'{"n":2}')]
    assert sink.sends == 1
    # Nothing is left scheduled but no-ops: the next iteration writes nothing more.
    loop.run()
    assert len(sink.writes) == 1


def test_flush_soon_then_publish_flushes_once() -> None:
    loop = Loop()
    hub = Hub(loop.call_soon, 1000)
    sink = FakeSink()
    hub.subscribe("t", sink)
    hub.flush_soon()
    hub.publish(prepared("t", 1))
    assert len(loop.ready) == 1  # the publish joined the flush already scheduled
    loop.run()
    assert sink.writes == [ws_text_frame(b'{"n":1}')]


def test_flush_soon_leaves_a_sliced_fan_out_one_slice_per_iteration() -> None:
    loop = Loop()
    hub = Hub(loop.call_soon, 2)
    sinks = [FakeSink() for _ in range(6)]
    for sink in sinks:
        hub.subscribe("t", sink)
    hub.publish(prepared("t", 1))
    loop.run()  # the first slice
    assert [len(s.writes) for s in sinks] == [1, 1, 0, 0, 0, 0]
    # Requests start while the next slice is scheduled: no second slice this iteration.
    hub.flush_soon()
    hub.flush_soon()
    batch, loop.ready = loop.ready, []
    for cb in batch:
        cb()
    assert [len(s.writes) for s in sinks] == [1, 1, 1, 1, 0, 0]
