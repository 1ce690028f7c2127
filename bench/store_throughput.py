"""Throughput of the event log: N events through a Batcher from K concurrent submitters.

    python -m bench.store_throughput [-n 50000] [-k 100] [--per-write 1] [--pg URL]

Runs against a fresh SQLite file (synchronous=FULL, as in production) and against
PostgreSQL: the URL given with ``--pg`` (its tables are reset), or else a throwaway cluster
with fsync on, started from the installed binaries. Prints events/s, commits and the
average batch size. Every submit waits for its commit, as a request handler does.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import uvloop

from bench.common import pg
from etherd.core.config import Config, StoreConfig
from etherd.core.events import NewEvent, Write
from etherd.store import Batcher
from etherd.store.factory import open_store

DATA = b'{"task_id":"task_abc","run_id":"run_1","phase":"working","user_message":"step done"}'


async def measure(url: str, total: int, submitters: int, per_write: int) -> dict[str, float]:
    store = open_store(Config(store=StoreConfig(url=url)))
    await store.open()
    await store.reset()
    config = store.config
    batcher = Batcher(
        store,
        max_rows=config.batch_max_rows,
        max_delay_ms=config.batch_max_delay_ms,
        queue_max_rows=config.queue_max_rows,
        retry_max_delay_s=config.retry_max_delay_s,
    )
    batcher.start()
    writes = total // per_write
    latencies: list[float] = []

    async def submitter(k: int) -> None:
        for i in range(k, writes, submitters):
            topic = f"tasks/task_{i % 1000}"
            started = time.perf_counter()
            await batcher.submit(Write([NewEvent(topic, "os.harness.step", DATA)] * per_write))
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(submitter(k) for k in range(submitters)))
    elapsed = time.perf_counter() - started
    await batcher.drain()
    await store.close()
    latencies.sort()
    return {
        "events_per_s": batcher.rows / elapsed,
        "commits": batcher.batches,
        "avg_batch": batcher.rows / batcher.batches,
        "p50_ms": latencies[len(latencies) // 2] * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
        "commit_ms_avg": batcher.commit_seconds_total / batcher.batches * 1000,
    }


def report(name: str, r: dict[str, float]) -> None:
    print(
        f"{name:<10} {r['events_per_s']:>9.0f} events/s  {r['commits']:>6.0f} commits  "
        f"avg batch {r['avg_batch']:>7.1f}  commit {r['commit_ms_avg']:.2f} ms  "
        f"submit p50 {r['p50_ms']:.1f} ms  p99 {r['p99_ms']:.1f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=50_000, help="events in all")
    parser.add_argument("-k", type=int, default=100, help="concurrent submitters")
    parser.add_argument("--per-write", type=int, default=1, help="events per submit")
    parser.add_argument("--pg", help="PostgreSQL URL (default: a throwaway cluster)")
    parser.add_argument("--no-pg", action="store_true", help="SQLite only")
    args = parser.parse_args()
    print(f"{args.n} events, {args.k} submitters, {args.per_write} event(s) per submit")

    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'bench.db'}"
        report("sqlite", uvloop.run(measure(url, args.n, args.k, args.per_write)))

    if args.no_pg:
        return
    if args.pg:
        report("postgres", uvloop.run(measure(args.pg, args.n, args.k, args.per_write)))
        return
    with pg.throwaway_cluster(fsync=True) as server:
        url = pg.fresh_database(server, "etherd_bench_store")
        report("postgres", uvloop.run(measure(url, args.n, args.k, args.per_write)))


if __name__ == "__main__":
    main()
