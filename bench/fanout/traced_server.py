"""``etherd serve`` with timing probes, for explaining fan-out latency (not for production).

Usage (the driver does this with ``--trace-server FILE``)::

    python bench/fanout/traced_server.py TRACE.json serve --config etherd.toml

Wraps, without editing etherd:

* ``Hub.flush``: wall time of each call and the number of sinks it wrote (one flush is one
  loop callback; its duration is how long every other callback waits behind it);
* ``Hub.publish``: calls, and the time from a publish to the end of the flush that wrote it;
* the garbage collector (``gc.callbacks``): pause per collection, by generation;
* event-loop lag: a 5 ms ``call_later`` chain records how late each tick ran.

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


def main() -> int:
    out_path = sys.argv[1]
    argv = sys.argv[2:]

    from etherd import hub as hub_mod

    flush_ns: list[int] = []
    flush_sinks: list[int] = []
    publish_to_flushed: list[int] = []
    pending_publish: list[int] = []  # publish times waiting for the flush that writes them
    gc_ns: dict[int, list[int]] = {0: [], 1: [], 2: []}
    lag_ns: list[int] = []

    def reset() -> None:
        for lst in (flush_ns, flush_sinks, publish_to_flushed, pending_publish, lag_ns):
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
        done_publishes = len(pending_publish)
        rest = len(self._dirty) > self._slice
        orig_flush(self)
        end = time.perf_counter_ns()
        flush_ns.append(end - t)
        flush_sinks.append(self.writes - before)
        if not rest:  # the last slice: every publish queued so far is now written
            publish_to_flushed.extend(end - p for p in pending_publish[:done_publishes])
            del pending_publish[:done_publishes]

    def publish(self: Any, prepared: Any) -> int:
        pending_publish.append(time.perf_counter_ns())
        return orig_publish(self, prepared)

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
