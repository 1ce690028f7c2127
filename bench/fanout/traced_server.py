"""``etherd serve`` with timing probes, for explaining fan-out latency (not for production).

Usage (the driver does this with ``--trace-server FILE``)::

    python bench/fanout/traced_server.py TRACE.json serve --config etherd.toml

Wraps, without editing etherd:

* ``Hub.flush``: wall time of each call and the number of sinks it wrote (one flush is one
  loop callback; its duration is how long every other callback waits behind it);
* ``Hub.publish``: the time from a publish to the end of the flush slice that wrote its
  last subscriber (``publish_to_flushed``: the server's share of the latency, up to the
  kernel's socket buffer);
* the garbage collector (``gc.callbacks``): pause per collection, by generation;
* event-loop lag: a 5 ms ``call_later`` chain records how late each tick ran.

``--experiment NAME`` (after ``--tracemalloc`` if both) applies a proposed etherd change at
run time; see ``apply_experiment``.

With ``--tracemalloc`` first (``traced_server.py --tracemalloc TRACE.json serve ...``) Python
allocations are traced too: ``TRACE.json.snap1`` takes a baseline snapshot and
``TRACE.json.snap2`` writes the 30 source lines whose allocations grew most since then into
the summary (how the driver's ``--idle`` mode explains memory per connection).

Control files beside TRACE.json: when ``TRACE.json.start`` appears the probes drop what they
hold (the driver creates it when publishing starts); when ``TRACE.json.dump`` appears the
summary is written to TRACE.json (the driver creates it when delivery is over). Each file
is deleted once seen. On exit the summary is written as well.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import sys
import time
import tracemalloc
import types
from collections import deque
from collections.abc import Callable
from typing import Any

# Sorted percentile summaries from plain lists: a traced run is short.


def summary(values: list[int]) -> dict[str, float]:
    """Count, mean and percentiles of nanosecond values, in milliseconds."""
    if not values:
        return {"count": 0}
    v = sorted(values)
    n = len(v)

    def q(p: float) -> float:
        return round(v[min(n - 1, int(p * n))] / 1e6, 3)

    return {
        "count": n,
        "mean": round(sum(v) / n / 1e6, 3),
        "p50": q(0.5),
        "p90": q(0.9),
        "p99": q(0.99),
        "max": round(v[-1] / 1e6, 3),
        "total_s": round(sum(v) / 1e9, 3),
    }


def type_census() -> dict[str, int]:
    """Live objects tracked by the GC, by type name."""
    counts: dict[str, int] = {}
    for obj in gc.get_objects():
        name = type(obj).__qualname__
        counts[name] = counts.get(name, 0) + 1
    return counts


def describe(obj: object) -> str:
    """A short name for a referrer: its type, and for closures and methods what they are."""
    name = f"{type(obj).__module__}.{type(obj).__qualname__}"
    if isinstance(obj, types.FunctionType):
        return f"function {obj.__module__}.{obj.__qualname__}"
    if isinstance(obj, types.MethodType):
        return f"method {getattr(obj.__func__, '__qualname__', '?')}"
    if isinstance(obj, types.CellType):
        holders = [
            f.__qualname__
            for f in gc.get_referrers(obj)
            if isinstance(f, tuple)
            for g in gc.get_referrers(f)
            if isinstance(g, types.FunctionType)
            for f in [g]
        ]
        return f"cell of {holders[:3]}"
    return name


def referrers_of(type_name: str) -> list[str]:
    """What holds one live instance of a type (why it was not freed), two levels up."""
    for obj in gc.get_objects():
        if type(obj).__name__ == type_name:
            out = []
            for r in gc.get_referrers(obj):
                if r is obj:
                    continue
                up = [describe(u) for u in gc.get_referrers(r)][:4]
                out.append(f"{describe(r)} <- {up}")
            return out[:12]
    return []


class _Group:
    """Frames published to one match result, and how far each slice of it has been written."""

    __slots__ = ("frames", "next_slice", "sinks", "written")

    def __init__(self, sinks: tuple[Any, ...], slice_size: int) -> None:
        self.sinks = sinks
        self.frames: list[bytes] = []
        nslices = max(1, -(-len(sinks) // slice_size))
        self.written = [0] * nslices  # per slice: frames already written to it
        self.next_slice = 0


def install_group_fanout() -> None:
    """See ``apply_experiment``: O(1) publish, one join per slice, shared bytes per write."""
    from etherd.core import hub as hub_mod

    groups: dict[int, _Group] = {}
    busy: list[_Group] = []  # groups with frames not yet written to every slice
    orig_flush = hub_mod.Hub.flush

    def publish(self: Any, prepared: Any) -> int:
        self.published += 1
        subs = self._trie.match(prepared.topic)
        if not subs:
            return 0
        key = id(subs)
        group = groups.get(key)
        if group is None or group.sinks is not subs:
            group = groups[key] = _Group(tuple(subs), self._slice)
        if not group.frames:  # a group with frames is in busy until all are written
            busy.append(group)
        group.frames.append(prepared.ws)
        self.frames_queued += len(subs)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._schedule(self.flush)
        return len(subs)

    def flush(self: Any) -> None:
        if self._dirty:  # private replies and replays: the per-sink path
            orig_flush(self)
        self._flush_scheduled = bool(self._dirty)
        budget = self._slice
        writes = nbytes = 0
        for group in list(busy):
            if budget <= 0:
                break
            frames = group.frames
            n = len(frames)
            nslices = len(group.written)
            size = self._slice
            visited = 0
            while budget > 0 and visited < nslices:
                j = group.next_slice
                group.next_slice = (j + 1) % nslices
                visited += 1
                start = group.written[j]
                if start == n:
                    continue
                data = frames[start] if n - start == 1 else b"".join(frames[start:])
                group.written[j] = n
                for sink in group.sinks[j * size : (j + 1) * size]:
                    if sink.alive:
                        sink.write(data)
                        writes += 1
                        nbytes += len(data)
                budget -= size
            if all(w == n for w in group.written):
                frames.clear()
                group.written = [0] * nslices
                group.next_slice = 0
                busy.remove(group)
        self.writes += writes
        self.bytes_written += nbytes
        if busy and not self._flush_scheduled:
            self._flush_scheduled = True
            self._schedule(self.flush)

    hub_mod.Hub.publish = publish  # type: ignore[method-assign]
    hub_mod.Hub.flush = flush  # type: ignore[method-assign]


def apply_experiment(name: str) -> None:
    """Proposed etherd changes, applied at run time so their effect can be measured first.

    ``group-fanout``: ``Hub.publish`` appends the frame once to the batch of its match result
    (the trie's cached tuple) instead of to every subscriber's pending list, and ``flush``
    joins each batch once per slice of subscribers and writes that one bytes object to every
    subscriber of the slice. Per slice it remembers how many frames it already wrote, so a
    subscriber still gets everything published since its last write in one write. Only for
    measuring: it ignores resuming sinks and orders a sink's private replies before the
    group's frames of the same tick.

    (The earlier experiments ``release-http``, ``logger-adapter`` and ``lazy-queue`` were
    adopted by etherd itself.)
    """
    if name == "group-fanout":
        install_group_fanout()
    else:
        raise SystemExit(f"unknown experiment {name!r}; known: group-fanout")


def main() -> int:
    args = sys.argv[1:]
    use_tracemalloc = args[:1] == ["--tracemalloc"]
    if use_tracemalloc:
        args = args[1:]
        tracemalloc.start(1)
    if args[:1] == ["--experiment"]:
        apply_experiment(args[1])
        args = args[2:]
    out_path = args[0]
    argv = args[1:]
    snapshots: dict[str, Any] = {}
    memory: dict[str, Any] = {}

    from etherd.core import hub as hub_mod

    flush_ns: list[int] = []
    flush_sinks: list[int] = []
    publish_to_flushed: list[int] = []
    # Publishes not yet written: (time, sinks dequeued by flush when it is written). The
    # dirty list is FIFO, so a publish is out once flush has dequeued every sink that was
    # in the list when the publish returned.
    pending_publish: deque[tuple[int, int]] = deque()
    dequeued = [0]
    gc_ns: dict[int, list[int]] = {0: [], 1: [], 2: []}
    lag_ns: list[int] = []

    def reset() -> None:
        for lst in (flush_ns, flush_sinks, publish_to_flushed, lag_ns):
            lst.clear()
        for lst in gc_ns.values():
            lst.clear()

    def dump() -> None:
        sinks = sorted(flush_sinks)
        result = {
            "flush": summary(flush_ns),
            "flush_sinks_p50": sinks[len(sinks) // 2] if sinks else 0,
            "flush_sinks_max": sinks[-1] if sinks else 0,
            "publish_to_flushed": summary(publish_to_flushed),
            "gc": {str(g): summary(v) for g, v in gc_ns.items()},
            "loop_lag_5ms_tick": summary(lag_ns),
            **memory,
        }
        tmp = out_path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, out_path)

    start_marker = out_path + ".start"
    dump_marker = out_path + ".dump"

    orig_flush: Callable[[Any], None] = hub_mod.Hub.flush
    orig_publish: Callable[[Any, Any], int] = hub_mod.Hub.publish

    def flush(self: Any) -> None:
        t = time.perf_counter_ns()
        before = self.writes
        taken = min(len(self._dirty), self._slice)
        orig_flush(self)
        end = time.perf_counter_ns()
        flush_ns.append(end - t)
        flush_sinks.append(self.writes - before)
        dequeued[0] += taken
        while pending_publish and pending_publish[0][1] <= dequeued[0]:
            publish_to_flushed.append(end - pending_publish.popleft()[0])

    def publish(self: Any, prepared: Any) -> int:
        t = time.perf_counter_ns()
        n = orig_publish(self, prepared)
        if n:
            pending_publish.append((t, dequeued[0] + len(self._dirty)))
        return n

    hub_mod.Hub.flush = flush  # type: ignore[method-assign]
    hub_mod.Hub.publish = publish  # type: ignore[method-assign]

    gc_start = [0]

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            gc_start[0] = time.perf_counter_ns()
        else:
            gc_ns[info["generation"]].append(time.perf_counter_ns() - gc_start[0])

    gc.callbacks.append(on_gc)

    from etherd import server as server_mod

    orig_serve = server_mod.serve
    interval_ns = 5_000_000

    async def serve(*args: Any, **kwargs: Any) -> int:
        loop = asyncio.get_running_loop()
        expected = [time.perf_counter_ns() + interval_ns]

        def tick() -> None:
            now = time.perf_counter_ns()
            lag_ns.append(max(0, now - expected[0]))
            if os.path.exists(start_marker):
                os.unlink(start_marker)
                reset()
            if os.path.exists(dump_marker):
                os.unlink(dump_marker)
                dump()
            if os.path.exists(out_path + ".snap1"):
                os.unlink(out_path + ".snap1")
                gc.collect()
                snapshots["types"] = type_census()
                if use_tracemalloc:
                    snapshots["base"] = tracemalloc.take_snapshot()
            if os.path.exists(out_path + ".snap2"):
                os.unlink(out_path + ".snap2")
                gc.collect()
                if use_tracemalloc:
                    snap = tracemalloc.take_snapshot()
                    diff = snap.compare_to(snapshots.get("base", snap), "lineno")
                    memory["tracemalloc_growth_kb"] = round(sum(d.size_diff for d in diff) / 1024)
                    memory["tracemalloc_top"] = [
                        {
                            "where": f"{d.traceback[0].filename.rsplit('/', 2)[-2:][-1]}"
                            f":{d.traceback[0].lineno}",
                            "kb": round(d.size_diff / 1024, 1),
                            "count": d.count_diff,
                        }
                        for d in diff[:30]
                    ]
                memory["gc_objects"] = len(gc.get_objects())
                before = snapshots.get("types", {})
                after = type_census()
                growth = {k: v - before.get(k, 0) for k, v in after.items()}
                memory["gc_types_growth"] = dict(sorted(growth.items(), key=lambda kv: -kv[1])[:25])
                memory["http_connection_referrers"] = referrers_of("HttpConnection")
                dump()
            expected[0] = now + interval_ns
            loop.call_later(interval_ns / 1e9, tick)

        loop.call_later(interval_ns / 1e9, tick)
        return await orig_serve(*args, **kwargs)

    server_mod.serve = serve

    from etherd.__main__ import main as etherd_main

    code = 1
    try:
        code = etherd_main(argv)
    finally:
        gc.callbacks.remove(on_gc)
        if not os.path.exists(out_path):
            dump()
    return code


if __name__ == "__main__":
    sys.exit(main())
