"""PostgreSQL store behaviour that needs several processes or a server that goes away."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import uvloop

from etherd.core.config import Config, StoreConfig
from etherd.core.events import Idempotency, IdempotentAnswer, NewEvent, StoredEvent, Write
from etherd.store import Batcher, IdempotencyConflict, StoreUnavailable, migrate
from etherd.store.factory import open_store
from tests.pgcluster import PgCluster, Server

pytestmark = pytest.mark.pg

ROOT = Path(__file__).resolve().parents[2]

# A writer process. It says "started" and waits for a line on stdin; opens the store at
# argv[1] (migrating), says "ready" with its epoch and the migrations it applied; waits for
# another line, then pushes argv[2] events over the topics argv[3:] through a Batcher from
# 20 concurrent submitters and prints every acked (topic, offset, label).
WORKER = textwrap.dedent(
    """
    import asyncio, json, os, sys
    import uvloop
    from etherd.core.config import Config, StoreConfig
    from etherd.core.events import NewEvent, Write
    from etherd.store import Batcher
    from etherd.store.factory import open_store

    url, count, topics = sys.argv[1], int(sys.argv[2]), sys.argv[3:]

    def say(**what):
        print(json.dumps(what), flush=True)

    async def main():
        store = open_store(Config(store=StoreConfig(url=url)))
        await store.open()
        say(ready=store.epoch, migrated=store.migrated)
        await asyncio.to_thread(sys.stdin.readline)
        batcher = Batcher(store, max_rows=500, max_delay_ms=0, queue_max_rows=100000,
                          retry_max_delay_s=1)
        batcher.start()
        acked = []
        async def submitter(k):
            for i in range(k, count, 20):
                data = json.dumps({"label": f"{os.getpid()}-{i}"}).encode()
                write = Write([NewEvent(topics[i % len(topics)], "e", data)])
                for e in await batcher.submit(write):
                    acked.append([e.topic, e.offset, json.loads(e.data)["label"]])
        await asyncio.gather(*(submitter(k) for k in range(20)))
        await batcher.drain()
        await store.close()
        say(acked=acked, batches=batcher.batches)

    say(started=True)
    sys.stdin.readline()
    uvloop.run(main())
    """
)


def start_workers(url: str, n: int, count: int, topics: list[str]) -> list[subprocess.Popen[str]]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, url, str(count), *topics],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(n)
    ]


def line(proc: subprocess.Popen[str]) -> dict[str, Any]:
    assert proc.stdout is not None
    text = proc.stdout.readline()
    if not text:
        proc.wait(10)
        raise AssertionError(f"worker exited with {proc.returncode} before answering")
    result: dict[str, Any] = json.loads(text)
    return result


def reap(procs: list[subprocess.Popen[str]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()


def go(procs: list[subprocess.Popen[str]]) -> None:
    """Release all workers from their current wait at (nearly) the same moment."""
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()


def test_two_processes_write_the_same_topics_gap_free(pg_url: str) -> None:
    topics = ["shared/a", "shared/b", "shared/c"]
    count = 3000
    procs = start_workers(pg_url, 2, count, topics)
    try:
        for proc in procs:
            line(proc)
        go(procs)
        ready = [line(p) for p in procs]
        assert ready[0]["ready"] == ready[1]["ready"]  # one epoch for the database
        go(procs)
        done = [line(p) for p in procs]
        for proc in procs:
            assert proc.wait(30) == 0
    finally:
        reap(procs)

    acked = [tuple(a) for d in done for a in d["acked"]]
    assert len(acked) == 2 * count
    assert len({(t, o) for t, o, _ in acked}) == len(acked)  # no offset given out twice

    async def check() -> None:
        store = open_store(Config(store=StoreConfig(url=pg_url)))
        await store.open()
        try:
            for topic in topics:
                replay = await store.read(topic, 0, 100_000)
                assert [e.offset for e in replay.events] == list(range(1, len(replay.events) + 1))
                assert replay.head == len(replay.events)
                stored = {(e.topic, e.offset, json.loads(e.data)["label"]) for e in replay.events}
                assert stored == {a for a in acked if a[0] == topic}
        finally:
            await store.close()

    uvloop.run(check())
    # Both processes really ran at the same time: offsets of one topic interleave.
    by_process = [{(t, o) for t, o, _ in map(tuple, d["acked"]) if t == topics[0]} for d in done]
    first_half = set(range(1, count // len(topics)))
    assert all({o for _, o in offs} & first_half for offs in by_process)


def test_concurrent_migrations_apply_once(pg_url: str) -> None:
    procs = start_workers(pg_url, 2, 0, ["unused"])
    try:
        for proc in procs:
            line(proc)
        go(procs)  # both open (and migrate) the empty database at once
        ready = [line(p) for p in procs]
        go(procs)
        for proc in procs:
            line(proc)
            assert proc.wait(30) == 0
    finally:
        reap(procs)
    assert ready[0]["ready"] == ready[1]["ready"]
    # Exactly one of the two applied the migrations; the other found them applied.
    shipped = [m.version for m in migrate.load("postgres")]
    assert sorted(r["migrated"] for r in ready) == [[], shipped]

    async def check() -> None:
        import asyncpg

        con = await asyncpg.connect(pg_url)
        try:
            versions = [r[0] for r in await con.fetch("SELECT version FROM schema_migrations")]
        finally:
            await con.close()
        assert sorted(versions) == shipped

    uvloop.run(check())


async def wait_until(condition: Callable[[], bool], within_s: float, failure: str) -> None:
    deadline = time.monotonic() + within_s
    while not condition():
        assert time.monotonic() < deadline, failure
        await asyncio.sleep(0.01)


def test_unreachable_server_raises_store_unavailable(tmp_path: Path) -> None:
    url = f"postgresql://etherd:secret@/db?host={tmp_path}&port=5999"

    async def body() -> None:
        store = open_store(Config(store=StoreConfig(url=url)))
        started = time.perf_counter()
        with pytest.raises(StoreUnavailable) as info:
            await store.open()
        assert time.perf_counter() - started < 2
        message = str(info.value)
        assert "PostgreSQL at" in message and "unavailable" in message
        assert "secret" not in message
        with pytest.raises(StoreUnavailable):
            await store.ping()
        await store.close()

    uvloop.run(body())


def test_idempotency_key_raced_by_another_transaction(pg_url: str) -> None:
    """Another process holds the same key in an open transaction: the commit waits for it,
    then reports the key as taken (it committed) or takes it (it rolled back)."""

    def respond(stored: list[StoredEvent]) -> tuple[int, bytes]:
        return 201, b"mine"

    async def body() -> None:
        import asyncpg

        store = open_store(Config(store=StoreConfig(url=pg_url)))
        await store.open()
        other = await asyncpg.connect(pg_url)
        try:
            for outcome in ("commit", "rollback"):
                key = Idempotency(key=f"race-{outcome}", scope="s", fingerprint="mine")
                tx = other.transaction()
                await tx.start()
                await other.execute(
                    "INSERT INTO idempotency (scope, key, fingerprint, status, body, created_ms)"
                    " VALUES ('s', $1, 'theirs', 202, 'theirs', 0)",
                    key.key,
                )
                commit = asyncio.ensure_future(
                    store.commit(
                        [
                            Write([NewEvent("t", "e", b"{}")], idempotency=key, respond=respond),
                            Write([NewEvent("t", "e", b"{}")]),
                        ]
                    )
                )
                await asyncio.sleep(0.2)
                assert not commit.done()  # waiting for the other transaction's key
                await (tx.commit() if outcome == "commit" else tx.rollback())
                first, second = await commit
                assert isinstance(second, list)
                if outcome == "commit":
                    assert isinstance(first, IdempotencyConflict)
                    assert first.existing == IdempotentAnswer("theirs", 202, b"theirs")
                else:
                    assert isinstance(first, list)
                    answer = await store.idempotent("s", key.key)
                    assert answer == IdempotentAnswer("mine", 201, b"mine")
            replay = await store.read("t", 0, 10)
            assert [e.offset for e in replay.events] == [1, 2, 3] == list(range(1, replay.head + 1))
        finally:
            await other.close()
            await store.close()

    uvloop.run(body())


@pytest.fixture
def own_cluster() -> Iterator[tuple[PgCluster, str]]:
    """A private cluster (fsync on: acknowledged writes must survive a crash) that the
    test may stop and start."""
    cluster = PgCluster.create(fsync=True)
    try:
        cluster.start()
        server = Server(cluster.url, cluster)
        yield cluster, server.create_database()
    finally:
        cluster.destroy()


def test_outage_fails_fast_and_recovers_without_losing_acked_writes(
    own_cluster: tuple[PgCluster, str],
) -> None:
    cluster, url = own_cluster
    config = StoreConfig(url=url, connect_timeout_s=2.0)

    async def body() -> None:
        store = open_store(Config(store=config))
        await store.open()
        batcher = Batcher(
            store, max_rows=1000, max_delay_ms=0, queue_max_rows=10_000, retry_max_delay_s=0.4
        )
        batcher.start()
        acked: list[StoredEvent] = []
        failed = 0
        stop = asyncio.Event()

        async def writer(k: int) -> None:
            nonlocal failed
            i = 0
            while not stop.is_set():
                write = Write([NewEvent("t", "e", msgspec.json.encode({"w": k, "i": i}))])
                i += 1
                try:
                    acked.extend(await batcher.submit(write))
                except StoreUnavailable:
                    failed += 1
                    await asyncio.sleep(0.01)

        writers = [asyncio.ensure_future(writer(k)) for k in range(10)]
        await asyncio.sleep(0.3)
        assert batcher.is_up and len(acked) > 0 and failed == 0

        # Crash the server while writes are in flight.
        await asyncio.to_thread(cluster.stop, "immediate")
        await wait_until(lambda: not batcher.is_up, 5, "the batcher did not notice the outage")
        acked_before = len(acked)
        started = time.perf_counter()
        with pytest.raises(StoreUnavailable, match="unavailable"):
            await batcher.submit(Write([NewEvent("t", "e", b"{}")]))
        assert time.perf_counter() - started < 0.05  # fails fast, nothing waits
        with pytest.raises(StoreUnavailable):
            await store.ping()
        await asyncio.sleep(0.5)
        assert len(acked) == acked_before and failed > 0

        # Back up: the batcher notices by itself and writes flow again.
        await asyncio.to_thread(cluster.start)
        await wait_until(lambda: batcher.is_up, 10, "the batcher did not recover by itself")
        await store.ping()
        await asyncio.sleep(0.3)
        stop.set()
        await asyncio.gather(*writers)
        assert len(acked) > acked_before
        await batcher.drain()

        # Every acknowledged write is stored where it was acknowledged, offsets are
        # gap-free, and nothing is stored that was not submitted (an unacknowledged
        # write can only be stored if the crash hit its COMMIT in flight).
        replay = await store.read("t", 0, 1_000_000)
        assert [e.offset for e in replay.events] == list(range(1, replay.head + 1))
        stored = {e.offset: e for e in replay.events}
        assert all(stored[e.offset] == e for e in acked)
        assert replay.head - len(acked) <= 1000  # at most the batch in flight at the crash
        await store.close()

    uvloop.run(body())
