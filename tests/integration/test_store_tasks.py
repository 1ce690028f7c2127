"""Task rows stored with their events: optimistic concurrency, per-write conflicts, the task
reads, run against both stores (SQLite file and a real PostgreSQL)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import msgspec
import pytest

from etherd.core.events import (
    Idempotency,
    IdempotentAnswer,
    NewEvent,
    StoredEvent,
    TaskWrite,
    Write,
)
from etherd.core.tasks import Status, Task
from etherd.store import IdempotencyConflict, Store, TaskConflict
from tests.storekit import batching, opened, run

ROOT = Path(__file__).resolve().parents[2]


def task(
    task_id: str,
    *,
    owner: str = "alice",
    status: Status = Status.QUEUED,
    version: int = 1,
    updated_ms: int = 1_000,
    holder: str | None = None,
    lease_expires_ms: int | None = None,
) -> Task:
    return Task(
        id=task_id,
        owner=owner,
        title=f"title of {task_id}",
        prompt="do it",
        status=status,
        created_ms=500,
        updated_ms=updated_ms,
        version=version,
        holder=holder,
        run_id=None if holder is None else f"run-{holder}",
        lease_expires_ms=lease_expires_ms,
    )


def row(t: Task, expected: int | None = None) -> TaskWrite:
    """The row to store for ``t``; by default computed from the version before it."""
    return TaskWrite(
        id=t.id,
        owner=t.owner,
        status=str(t.status),
        created_ms=t.created_ms,
        updated_ms=t.updated_ms,
        lease_expires_ms=t.lease_expires_ms,
        holder=t.holder,
        version=t.version,
        expected_version=t.version - 1 if expected is None else expected,
        data=msgspec.json.encode(t),
    )


def write(t: Task, expected: int | None = None, event: str = "task.changed", **kw: Any) -> Write:
    """``t`` stored with one event on its topic and one on the owner's activity topic."""
    data = msgspec.json.encode({"task_id": t.id, "version": t.version})
    return Write(
        [
            NewEvent(f"tasks/{t.id}", event, data),
            NewEvent(f"activity/{t.owner}", "activity.list_updated", data),
        ],
        task=row(t, expected),
        **kw,
    )


def offsets(result: list[StoredEvent] | BaseException) -> list[int]:
    """The offsets of stored events; a refused write's exception is raised."""
    if isinstance(result, BaseException):
        raise result
    return [e.offset for e in result]


def decoded(raw: bytes | None) -> Task:
    assert raw is not None
    return msgspec.json.decode(raw, type=Task)


def ids(rows: list[bytes]) -> list[str]:
    return [decoded(r).id for r in rows]


async def create(store: Store, *tasks: Task) -> None:
    results = await store.commit([write(t, 0, "task.created") for t in tasks])
    for result in results:
        offsets(result)


def test_create_and_read_back(store_url: str) -> None:
    t = task("t1")

    async def body() -> None:
        async with opened(store_url) as store:
            assert await store.get_task("t1") is None
            async with batching(store) as batcher:
                stored = await batcher.submit(write(t, 0, "task.created"))
            assert [(e.topic, e.offset) for e in stored] == [("tasks/t1", 1), ("activity/alice", 1)]
            raw = await store.get_task("t1")
            assert raw == msgspec.json.encode(t)  # exactly the bytes written
            assert decoded(raw) == t
            assert await store.get_task("t2") is None
        async with opened(store_url) as store:  # durable
            assert decoded(await store.get_task("t1")) == t

    run(body)


def test_update_with_the_right_version(store_url: str) -> None:
    async def body() -> None:
        async with opened(store_url) as store:
            await create(store, task("t1"))
            claimed = task(
                "t1",
                status=Status.RUNNING,
                version=2,
                updated_ms=2_000,
                holder="h1",
                lease_expires_ms=9_000,
            )
            (result,) = await store.commit([write(claimed)])
            assert offsets(result) == [2, 2]
            assert decoded(await store.get_task("t1")) == claimed
            done = task("t1", status=Status.COMPLETED, version=3, updated_ms=3_000)
            (result,) = await store.commit([write(done, 2)])
            assert offsets(result) == [3, 3]
            assert decoded(await store.get_task("t1")) == done

    run(body)


def test_stale_version_stores_nothing(store_url: str) -> None:
    key = Idempotency(key="k1", scope="s", fingerprint="fp")

    def respond(stored: list[StoredEvent]) -> tuple[int, bytes]:
        return 200, b"ok"

    async def body() -> None:
        async with opened(store_url) as store, batching(store) as batcher:
            await create(store, task("t1"))
            v2 = task("t1", status=Status.RUNNING, version=2, holder="h1", lease_expires_ms=9)
            await batcher.submit(write(v2))

            # Computed from version 1, which is gone: refused through the batcher, with its
            # idempotency key, events and offsets all left alone.
            stale = task("t1", status=Status.CANCELLED, version=2, updated_ms=5_000)
            with pytest.raises(TaskConflict) as info:
                await batcher.submit(write(stale, idempotency=key, respond=respond))
            assert (info.value.task_id, info.value.current_version) == ("t1", 2)
            assert "t1" in str(info.value)
            assert decoded(await store.get_task("t1")) == v2
            assert await store.idempotent("s", "k1") is None
            assert (await store.head("tasks/t1"), await store.head("activity/alice")) == (2, 2)
            replay = await store.read("tasks/t1", 0, 10)
            assert [e.event for e in replay.events] == ["task.created", "task.changed"]

            # An update of a task that does not exist.
            with pytest.raises(TaskConflict) as info:
                await batcher.submit(write(task("nope", version=2)))
            assert (info.value.task_id, info.value.current_version) == ("nope", None)
            assert await store.get_task("nope") is None

            # Within a batch, the refused write consumes no offsets: its neighbours on the
            # same topics get consecutive ones.
            v3 = task("t1", status=Status.COMPLETED, version=3, updated_ms=6_000)
            results = await store.commit(
                [
                    Write([NewEvent("activity/alice", "e", b"{}")]),
                    write(stale),
                    Write([NewEvent("activity/alice", "e", b"{}")]),
                    write(v3),
                ]
            )
            assert offsets(results[0]) == [3]
            assert isinstance(results[1], TaskConflict) and results[1].current_version == 2
            assert offsets(results[2]) == [4]
            assert offsets(results[3]) == [3, 5]
            assert decoded(await store.get_task("t1")) == v3
            # And the key is still free for a write that applies.
            v4 = task("t1", status=Status.COMPLETED, version=4, updated_ms=7_000)
            stored = await batcher.submit(write(v4, idempotency=key, respond=respond))
            assert offsets(stored) == [4, 6]
            assert await store.idempotent("s", "k1") == IdempotentAnswer("fp", 200, b"ok")

    run(body)


def test_create_twice_conflicts(store_url: str) -> None:
    async def body() -> None:
        async with opened(store_url) as store, batching(store) as batcher:
            first = task("t1")
            await batcher.submit(write(first, 0))
            with pytest.raises(TaskConflict) as info:
                await batcher.submit(write(task("t1", owner="bob"), 0))
            assert info.value.current_version == 1
            assert decoded(await store.get_task("t1")) == first
            assert await store.head("activity/bob") == 0
            # Two creates of one id in one batch: the first wins.
            results = await store.commit([write(task("t2"), 0), write(task("t2", owner="bob"), 0)])
            assert offsets(results[0]) == [1, 2]
            assert isinstance(results[1], TaskConflict) and results[1].current_version == 1
            assert decoded(await store.get_task("t2")).owner == "alice"

    run(body)


def test_refused_write_leaves_no_task_row(store_url: str) -> None:
    """A write refused for another reason (its key is taken, its answer fails, its version
    numbers make no sense) does not store its task row either."""
    key = Idempotency(key="k", scope="s", fingerprint="fp")

    def respond(stored: list[StoredEvent]) -> tuple[int, bytes]:
        return 201, b"created"

    def broken(stored: list[StoredEvent]) -> tuple[int, bytes]:
        raise RuntimeError("cannot answer")

    async def body() -> None:
        async with opened(store_url) as store:
            await store.commit([Write([NewEvent("x", "e", b"{}")], key, respond)])
            results = await store.commit(
                [
                    write(task("t1"), 0, idempotency=key, respond=respond),
                    write(task("t2"), 0, idempotency=Idempotency("k2", "s", "f"), respond=broken),
                    write(task("t3", version=1), 1),
                ]
            )
            assert isinstance(results[0], IdempotencyConflict)
            assert isinstance(results[1], RuntimeError)
            assert isinstance(results[2], ValueError)
            for task_id in ("t1", "t2", "t3"):
                assert await store.get_task(task_id) is None
            assert await store.claimable_tasks(10) == []
            assert await store.head("activity/alice") == 0
            # The ids are still free.
            results = await store.commit([write(task(i), 0) for i in ("t1", "t2", "t3")])
            assert [offsets(r)[1] for r in results] == [1, 2, 3]

    run(body)


def test_two_changes_of_one_task_in_one_batch(store_url: str) -> None:
    async def body() -> None:
        async with opened(store_url) as store:
            await create(store, task("t1"))
            a = task("t1", status=Status.RUNNING, version=2, holder="a", lease_expires_ms=9)
            b = task("t1", status=Status.RUNNING, version=2, holder="b", lease_expires_ms=9)
            c = task("t1", status=Status.COMPLETED, version=3, updated_ms=3_000)
            # a and b were both computed from version 1: a commits, b conflicts; c was
            # computed from a's version 2, which the batch stored just before it.
            results = await store.commit([write(a), write(b), write(c)])
            assert offsets(results[0]) == [2, 2]
            assert isinstance(results[1], TaskConflict) and results[1].current_version == 2
            assert offsets(results[2]) == [3, 3]
            assert decoded(await store.get_task("t1")) == c
            # Create and change in one batch.
            n1 = task("new")
            n2 = task("new", status=Status.CANCELLED, version=2, updated_ms=4_000)
            results = await store.commit([write(n1, 0), write(n2)])
            assert [offsets(r) for r in results] == [[1, 4], [2, 5]]
            assert decoded(await store.get_task("new")) == n2

    run(body)


def test_concurrent_claims_of_one_task(store_url: str) -> None:
    async def body() -> None:
        async with opened(store_url) as store, batching(store) as batcher:
            await create(store, task("x"))
            claims = [
                task("x", status=Status.RUNNING, version=2, holder=f"h{i}", lease_expires_ms=9)
                for i in range(20)
            ]
            outcomes = await asyncio.gather(
                *(batcher.submit(write(c, event="task.claimed")) for c in claims),
                return_exceptions=True,
            )
            won = [i for i, o in enumerate(outcomes) if isinstance(o, list)]
            lost = [o for o in outcomes if isinstance(o, TaskConflict)]
            assert len(won) == 1 and len(lost) == 19
            assert all(c.current_version == 2 for c in lost)
            assert decoded(await store.get_task("x")) == claims[won[0]]
            replay = await store.read("tasks/x", 0, 100)
            assert [e.event for e in replay.events] == ["task.created", "task.claimed"]
            assert replay.head == 2

    run(body)


def test_list_tasks_newest_first_with_cursor(store_url: str) -> None:
    async def body() -> None:
        async with opened(store_url) as store:
            # Ties on updated_ms are broken by id, descending.
            specs = [("a", 10), ("b", 30), ("c", 20), ("d", 30), ("e", 5), ("f", 20), ("g", 30)]
            await create(store, *(task(i, updated_ms=ms) for i, ms in specs))
            await create(store, task("z", owner="bob", updated_ms=25))
            expected = ["g", "d", "b", "f", "c", "a", "e"]
            assert ids(await store.list_tasks("alice", 100, None)) == expected
            assert ids(await store.list_tasks("bob", 100, None)) == ["z"]
            assert await store.list_tasks("carol", 100, None) == []
            assert ids(await store.list_tasks("alice", 3, None)) == expected[:3]

            # Page through with the last task of each page as the cursor.
            pages: list[list[str]] = []
            before: tuple[int, str] | None = None
            while True:
                page = [decoded(r) for r in await store.list_tasks("alice", 2, before)]
                if not page:
                    break
                pages.append([t.id for t in page])
                before = (page[-1].updated_ms, page[-1].id)
            assert pages == [["g", "d"], ["b", "f"], ["c", "a"], ["e"]]
            # The cursor is exclusive and need not name a stored task.
            assert ids(await store.list_tasks("alice", 10, (30, "d"))) == expected[2:]
            assert ids(await store.list_tasks("alice", 10, (25, "zzz"))) == expected[3:]
            assert ids(await store.list_tasks("alice", 10, (20, "c"))) == ["a", "e"]
            assert await store.list_tasks("alice", 10, (5, "e")) == []

            # A change moves a task to the front.
            (r,) = await store.commit([write(task("e", version=2, updated_ms=40))])
            offsets(r)
            assert ids(await store.list_tasks("alice", 2, None)) == ["e", "g"]

    run(body)


def test_claimable_tasks_oldest_first(store_url: str) -> None:
    async def body() -> None:
        async with opened(store_url) as store:
            await create(
                store,
                task("q3", updated_ms=300),
                task("q1", updated_ms=100),
                task("q2b", updated_ms=200, owner="bob"),
                task("q2a", updated_ms=200),
                task("r", status=Status.RUNNING, updated_ms=50, holder="h", lease_expires_ms=1),
                task("i", status=Status.INTERRUPTED, updated_ms=60),
                task("done", status=Status.COMPLETED, updated_ms=70),
            )
            assert ids(await store.claimable_tasks(10)) == ["q1", "q2a", "q2b", "q3"]
            assert ids(await store.claimable_tasks(2)) == ["q1", "q2a"]
            # Claimed: no longer claimable.
            claimed = task("q1", status=Status.RUNNING, version=2, holder="h", lease_expires_ms=9)
            offsets((await store.commit([write(claimed)]))[0])
            assert ids(await store.claimable_tasks(10)) == ["q2a", "q2b", "q3"]

    run(body)


def test_expired_leases(store_url: str) -> None:
    async def body() -> None:
        async with opened(store_url) as store:
            running = Status.RUNNING
            await create(
                store,
                task("r300", status=running, holder="h", lease_expires_ms=300),
                task("r100", status=running, holder="h", lease_expires_ms=100),
                task("r200", status=running, holder="h", lease_expires_ms=200),
                task("i150", status=Status.INTERRUPTED, holder="h", lease_expires_ms=150),
                task("i-parked", status=Status.INTERRUPTED),  # the run ended: no lease
                task("q", lease_expires_ms=10),  # not a live status
                task("c", status=Status.COMPLETED, lease_expires_ms=10),
            )
            assert ids(await store.expired_leases(99, 10)) == []
            assert ids(await store.expired_leases(100, 10)) == ["r100"]  # <= now
            assert ids(await store.expired_leases(250, 10)) == ["r100", "i150", "r200"]
            assert ids(await store.expired_leases(10_000, 2)) == ["r100", "i150"]
            # A renewed lease is no longer expired.
            renewed = task("r100", status=running, version=2, holder="h", lease_expires_ms=900)
            offsets((await store.commit([write(renewed)]))[0])
            assert ids(await store.expired_leases(250, 10)) == ["i150", "r200"]

    run(body)


def test_reset_clears_tasks(store_url: str) -> None:
    async def body() -> None:
        async with opened(store_url) as store:
            await create(store, task("t1"))
            await store.reset()
            assert await store.get_task("t1") is None
            assert await store.list_tasks("alice", 10, None) == []
            await create(store, task("t1"))  # the id is free again
            assert decoded(await store.get_task("t1")) == task("t1")

    run(body)


@pytest.mark.pg
def test_create_raced_by_another_transaction(pg_url: str) -> None:
    """Another transaction inserts the same task id and has not committed: the create waits
    for it, then conflicts (it committed) or goes through (it rolled back), and the other
    writes of the batch are stored either way."""

    async def body() -> None:
        import asyncpg

        other = await asyncpg.connect(pg_url)
        try:
            async with opened(pg_url) as store:
                for outcome in ("commit", "rollback"):
                    mine = task(f"race-{outcome}")
                    tx = other.transaction()
                    await tx.start()
                    await other.execute(
                        "INSERT INTO tasks (id, owner, status, created_ms, updated_ms, version,"
                        " data) VALUES ($1, 'bob', 'queued', 1, 1, 1, 'theirs')",
                        mine.id,
                    )
                    commit = asyncio.ensure_future(
                        store.commit([write(mine, 0), Write([NewEvent("t", "e", b"{}")])])
                    )
                    await asyncio.sleep(0.2)
                    assert not commit.done()  # waiting for the other transaction's row
                    await (tx.commit() if outcome == "commit" else tx.rollback())
                    first, second = await commit
                    assert isinstance(second, list)
                    if outcome == "commit":
                        assert isinstance(first, TaskConflict) and first.current_version == 1
                        assert await store.get_task(mine.id) == b"theirs"
                    else:
                        assert isinstance(first, list)
                        assert decoded(await store.get_task(mine.id)) == mine
                replay = await store.read("t", 0, 10)
                assert [e.offset for e in replay.events] == [1, 2]
                assert await store.head("activity/alice") == 1  # only the create that won
        finally:
            await other.close()

    run(body)


# A claiming process. It opens the store at argv[1], says "ready", waits for a line on
# stdin, then moves every task named in argv[3:] from version 1 to 2 (holder argv[2]),
# through a Batcher with small batches, all submits at once, in the given order. It prints
# the ids it won and, per lost id, the version the conflict reported.
CLAIMER = textwrap.dedent(
    """
    import asyncio, json, sys
    import msgspec, uvloop
    from etherd.core.config import Config, StoreConfig
    from etherd.core.events import NewEvent, TaskWrite, Write
    from etherd.store import Batcher, TaskConflict
    from etherd.store.factory import open_store

    url, holder, ids = sys.argv[1], sys.argv[2], sys.argv[3:]

    def claim(task_id):
        data = msgspec.json.encode({"id": task_id, "holder": holder, "version": 2})
        row = TaskWrite(id=task_id, owner="alice", status="running", created_ms=1,
                        updated_ms=2, lease_expires_ms=10, holder=holder, version=2,
                        expected_version=1, data=data)
        return Write([NewEvent(f"tasks/{task_id}", "task.claimed", data),
                      NewEvent("activity/alice", "activity.list_updated", data)], task=row)

    async def main():
        store = open_store(Config(store=StoreConfig(url=url)))
        await store.open()
        batcher = Batcher(store, max_rows=6, max_delay_ms=0, queue_max_rows=100000,
                          retry_max_delay_s=1)
        batcher.start()
        print(json.dumps({"ready": True}), flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        won, lost = [], {}
        async def one(task_id):
            try:
                await batcher.submit(claim(task_id))
                won.append(task_id)
            except TaskConflict as exc:
                lost[task_id] = exc.current_version
        await asyncio.gather(*(one(i) for i in ids))
        await batcher.drain()
        await store.close()
        print(json.dumps({"won": won, "lost": lost, "batches": batcher.batches}), flush=True)

    uvloop.run(main())
    """
)


@pytest.mark.pg
def test_two_processes_race_to_claim_the_same_tasks(pg_url: str) -> None:
    task_ids = [f"t{i:02d}" for i in range(50)]

    async def setup() -> None:
        async with opened(pg_url) as store:
            await create(store, *(task(i) for i in task_ids))

    run(setup)
    # Different orders, so the two processes' batches overlap in every way.
    orders = [task_ids, random.Random(7).sample(task_ids, len(task_ids))]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CLAIMER, pg_url, f"p{n}", *order],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for n, order in enumerate(orders)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            assert json.loads(proc.stdout.readline()) == {"ready": True}
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        done = []
        for proc in procs:
            assert proc.stdout is not None
            done.append(json.loads(proc.stdout.readline()))
            assert proc.wait(30) == 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None:
                    pipe.close()

    won = [set(d["won"]) for d in done]
    assert not won[0] & won[1]  # never both
    assert won[0] | won[1] == set(task_ids)  # always one
    for n, d in enumerate(done):
        assert set(d["lost"]) == set(task_ids) - won[n]
        assert set(d["lost"].values()) <= {2}
        assert d["batches"] >= 50 // 3  # small batches, interleaved with the other process

    async def check() -> None:
        async with opened(pg_url) as store:
            for task_id in task_ids:
                stored = msgspec.json.decode(await store.get_task(task_id) or b"null")
                winner = "p0" if task_id in won[0] else "p1"
                assert stored == {"id": task_id, "holder": winner, "version": 2}
                replay = await store.read(f"tasks/{task_id}", 0, 10)
                assert [e.event for e in replay.events] == ["task.created", "task.claimed"]
            # Refused claims took no offsets: 50 creates and 50 claims, gap-free.
            replay = await store.read("activity/alice", 0, 1_000)
            assert (
                [e.offset for e in replay.events]
                == list(range(1, 101))
                == [*range(1, replay.head + 1)]
            )

    run(check)
