"""The event log contract, run against both stores (SQLite file and a real PostgreSQL)."""

from __future__ import annotations

import asyncio
import time

import msgspec
import pytest

from etherd.core.config import Config, RetentionRule, StoreConfig
from etherd.core.events import Idempotency, IdempotentAnswer, NewEvent, Replay, StoredEvent, Write
from etherd.store import (
    Batcher,
    IdempotencyConflict,
    Overloaded,
    StoreUnavailable,
)
from etherd.store.base import IDEMPOTENCY_TTL_MS, RETENTION_BATCH
from etherd.store.factory import open_store
from tests.storekit import batching, opened, run


def ev(topic: str, n: int = 0, event: str = "test.event") -> NewEvent:
    return NewEvent(topic, event, msgspec.json.encode({"n": n}))


def events(topic: str, count: int, start: int = 0) -> list[NewEvent]:
    return [ev(topic, start + i) for i in range(count)]


def offsets(result: list[StoredEvent] | BaseException) -> list[int]:
    """The offsets of stored events; a refused write's exception is raised."""
    if isinstance(result, BaseException):
        raise result
    return [e.offset for e in result]


def test_append_and_read_round_trip(store_url: str) -> None:
    async def body() -> None:
        before = time.time_ns() // 1_000_000
        async with opened(store_url) as store:
            epoch = store.epoch
            assert epoch
            async with batching(store) as batcher:
                a = await batcher.submit(Write([ev("a", 1), ev("a", 2), ev("b", 3), ev("a", 4)]))
                b = await batcher.submit(Write([ev("b", 5, "other.event")]))
            assert [(e.topic, e.offset) for e in a] == [("a", 1), ("a", 2), ("b", 1), ("a", 3)]
            assert [(e.topic, e.offset) for e in b] == [("b", 2)]
            assert len({e.ts_ms for e in a}) == 1  # one commit, one time
            assert before - 1000 <= a[0].ts_ms <= b[0].ts_ms <= time.time_ns() // 1_000_000 + 1000

            replay = await store.read("a", 0, 100)
            assert replay.events == [e for e in a if e.topic == "a"]
            assert (replay.first, replay.head) == (1, 3)
            replay = await store.read("b", 0, 100)
            assert replay.events == [a[2], b[0]]
            assert replay.events[1].event == "other.event"
            assert msgspec.json.decode(replay.events[1].data) == {"n": 5}
            assert await store.head("a") == 3
            assert await store.head("never") == 0
            assert await store.read("never", 0, 10) == Replay([], 0, 0)

        # Everything, including the epoch, survives a reopen.
        async with opened(store_url) as store:
            assert store.epoch == epoch
            assert (await store.read("a", 0, 100)).events == [e for e in a if e.topic == "a"]
            stored = await store.commit([Write([ev("a")])])
            assert offsets(stored[0]) == [4]

    run(body)


def test_concurrent_submits_are_gap_free_and_batched(store_url: str) -> None:
    tasks, per_task, topics = 50, 100, [f"tasks/t{i}" for i in range(5)]

    async def body() -> None:
        async with opened(store_url) as store, batching(store) as batcher:

            async def submitter(n: int) -> list[StoredEvent]:
                acked: list[StoredEvent] = []
                for i in range(per_task):
                    topic = topics[(n + i) % len(topics)]
                    stored = await batcher.submit(Write([ev(topic, n * 1000 + i)]))
                    acked.extend(stored)
                return acked

            results = await asyncio.gather(*(submitter(n) for n in range(tasks)))
            acked = [e for r in results for e in r]
            assert len(acked) == tasks * per_task
            # Many submits shared each commit.
            assert batcher.batches < tasks * per_task / 5
            assert batcher.rows == tasks * per_task
            for topic in topics:
                replay = await store.read(topic, 0, 100_000)
                assert offsets(replay.events) == list(range(1, len(replay.events) + 1))
                assert replay.head == len(replay.events) == tasks * per_task // len(topics)
                assert sorted((e for e in acked if e.topic == topic), key=lambda e: e.offset) == (
                    replay.events
                )

    run(body)


def test_batch_with_several_writes_to_one_topic(store_url: str) -> None:
    async def body() -> None:
        async with opened(store_url) as store:
            results = await store.commit(
                [Write(events("a", 2)), Write(events("b", 1)), Write(events("a", 3, 2)), Write([])]
            )
            assert [offsets(r) for r in results] == [[1, 2], [1], [3, 4, 5], []]
            assert offsets((await store.commit([Write(events("a", 1))]))[0]) == [6]
            replay = await store.read("a", 0, 10)
            assert [msgspec.json.decode(e.data)["n"] for e in replay.events] == [0, 1, 2, 3, 4, 0]

    run(body)


def test_read_limits_first_and_head(store_url: str) -> None:
    async def body() -> None:
        async with opened(store_url) as store:
            await store.commit([Write(events("t", 10))])
            replay = await store.read("t", 0, 3)
            assert (offsets(replay.events), replay.first, replay.head) == ([1, 2, 3], 1, 10)
            replay = await store.read("t", 8, 5)
            assert (offsets(replay.events), replay.first, replay.head) == ([9, 10], 1, 10)
            for after in (10, 100):
                replay = await store.read("t", after, 5)
                assert (replay.events, replay.first, replay.head) == ([], 1, 10)

    run(body)


def test_read_with_a_byte_cap_stops_after_the_event_that_reaches_it(store_url: str) -> None:
    async def body() -> None:
        async with opened(store_url) as store:
            # Ten events of 1,000 bytes of data each.
            big = [NewEvent("t", "e", b'"' + b"x" * 998 + b'"') for _ in range(10)]
            await store.commit([Write(big)])
            replay = await store.read("t", 0, 100, max_bytes=2500)
            assert (offsets(replay.events), replay.first, replay.head) == ([1, 2, 3], 1, 10)
            # The first event always comes, however small the cap.
            assert offsets((await store.read("t", 4, 100, max_bytes=1)).events) == [5]
            # The row limit still applies, and the tail ends the page.
            assert offsets((await store.read("t", 0, 2, max_bytes=10**9)).events) == [1, 2]
            assert offsets((await store.read("t", 8, 100, max_bytes=10**9)).events) == [9, 10]
            replay = await store.read("t", 10, 100, max_bytes=1000)
            assert (replay.events, replay.first, replay.head) == ([], 1, 10)
            assert await store.read("never", 0, 10, max_bytes=1000) == Replay([], 0, 0)

    run(body)


def test_retention_by_count_trims_oldest_and_keeps_head(store_url: str) -> None:
    bulk = 2 * RETENTION_BATCH + 123

    async def body() -> None:
        async with opened(store_url) as store:
            await store.commit(
                [
                    Write(events("tasks/1", 20)),
                    Write(events("tasks/2", 5)),
                    Write(events("other/1", 20)),
                    Write(events("bulk", bulk)),
                ]
            )
            now = time.time_ns() // 1_000_000
            rules = [
                RetentionRule(prefix="tasks/", max_count=10),
                RetentionRule(prefix="bulk", max_count=3),
            ]
            assert await store.enforce_retention(rules, now) == 10 + bulk - 3
            replay = await store.read("tasks/1", 0, 100)
            assert (offsets(replay.events), replay.first, replay.head) == (
                list(range(11, 21)),
                11,
                20,
            )
            assert offsets((await store.read("tasks/2", 0, 100)).events) == [1, 2, 3, 4, 5]
            assert len((await store.read("other/1", 0, 100)).events) == 20
            replay = await store.read("bulk", 0, 100)
            assert (offsets(replay.events), replay.first, replay.head) == (
                [bulk - 2, bulk - 1, bulk],
                bulk - 2,
                bulk,
            )
            # Nothing more to trim; appends continue after the head.
            assert await store.enforce_retention(rules, now) == 0
            assert offsets((await store.commit([Write(events("tasks/1", 1))]))[0]) == [21]

    run(body)


def test_retention_by_age(store_url: str) -> None:
    async def body() -> None:
        async with opened(store_url) as store:
            old = (await store.commit([Write(events("t", 5)), Write(events("u", 2))]))[0]
            await asyncio.sleep(0.02)
            new = (await store.commit([Write(events("t", 3))]))[0]
            assert isinstance(old, list) and isinstance(new, list)
            assert old[0].ts_ms < new[0].ts_ms
            rule = RetentionRule(prefix="", max_age_s=10.0)
            # The cut falls between the two commits: the first five are older than 10 s.
            now = new[0].ts_ms + 10_000
            assert await store.enforce_retention([rule], now) == 5 + 2
            replay = await store.read("t", 0, 100)
            assert (offsets(replay.events), replay.first, replay.head) == ([6, 7, 8], 6, 8)
            replay = await store.read("u", 0, 100)
            assert (replay.events, replay.first, replay.head) == ([], 0, 2)
            # Everything older: the topic is empty but keeps its head.
            assert await store.enforce_retention([rule], now + 60_000) == 3
            replay = await store.read("t", 0, 100)
            assert (replay.events, replay.first, replay.head) == ([], 0, 8)
            assert offsets((await store.commit([Write(events("t", 1))]))[0]) == [9]

    run(body)


def answer_with_offsets(stored: list[StoredEvent]) -> tuple[int, bytes]:
    return 201, msgspec.json.encode({"offsets": offsets(stored)})


def test_idempotency_answer_stored_with_the_events(store_url: str) -> None:
    key = Idempotency(key="k1", scope="user:alice POST /api/publish", fingerprint="fp1")

    async def body() -> None:
        async with opened(store_url) as store, batching(store) as batcher:
            assert await store.idempotent(key.scope, key.key) is None
            stored = await batcher.submit(
                Write(events("t", 2), idempotency=key, respond=answer_with_offsets)
            )
            expected = IdempotentAnswer("fp1", 201, b'{"offsets":[1,2]}')
            assert await store.idempotent(key.scope, key.key) == expected
            assert await store.idempotent("another scope", key.key) is None

            # The same key again: refused with the stored answer, nothing written.
            with pytest.raises(IdempotencyConflict) as info:
                await batcher.submit(
                    Write(events("t", 1), idempotency=key, respond=answer_with_offsets)
                )
            assert info.value.existing == expected
            assert await store.head("t") == 2 == stored[-1].offset

            # Within one batch: the second use of a key is refused, a failing respond
            # refuses only its write, and no offset is skipped.
            def broken(stored: list[StoredEvent]) -> tuple[int, bytes]:
                raise RuntimeError("cannot answer")

            k2 = Idempotency(key="k2", scope="s", fingerprint="a")
            k3 = Idempotency(key="k3", scope="s", fingerprint="b")
            results = await store.commit(
                [
                    Write(events("t", 1), idempotency=k3, respond=broken),
                    Write(events("t", 2), idempotency=k2, respond=answer_with_offsets),
                    Write(events("t", 1), idempotency=k2, respond=answer_with_offsets),
                    Write(events("t", 1), idempotency=k3, respond=answer_with_offsets),
                    Write(events("t", 1), idempotency=k3),
                ]
            )
            assert isinstance(results[0], RuntimeError)
            assert offsets(results[1]) == [3, 4]
            assert isinstance(results[2], IdempotencyConflict)
            assert results[2].existing == IdempotentAnswer("a", 201, b'{"offsets":[3,4]}')
            assert offsets(results[3]) == [5]
            assert isinstance(results[4], IdempotencyConflict)  # k3 was answered just before
            assert await store.idempotent("s", "k3") == IdempotentAnswer(
                "b", 201, b'{"offsets":[5]}'
            )
            replay = await store.read("t", 0, 100)
            assert (offsets(replay.events), replay.head) == ([1, 2, 3, 4, 5], 5)

            # A write with a key but no way to answer is refused (a caller bug).
            k4 = Idempotency(key="k4", scope="s", fingerprint="c")
            (result,) = await store.commit([Write(events("t", 1), idempotency=k4)])
            assert isinstance(result, ValueError)
            assert await store.idempotent("s", "k4") is None

            # Answers expire after 24 hours.
            later = time.time_ns() // 1_000_000 + IDEMPOTENCY_TTL_MS + 60_000
            await store.enforce_retention([], later)
            assert await store.idempotent(key.scope, key.key) is None
            assert await store.head("t") == 5

    run(body)


def test_reset_changes_epoch_and_empties_the_log(store_url: str) -> None:
    async def body() -> None:
        async with opened(store_url) as store:
            first_epoch = store.epoch
            key = Idempotency(key="k", scope="s", fingerprint="f")
            await store.commit(
                [Write(events("t", 3), idempotency=key, respond=answer_with_offsets)]
            )
            epoch = await store.reset()
            assert epoch == store.epoch != first_epoch
            assert await store.read("t", 0, 10) == Replay([], 0, 0)
            assert await store.idempotent("s", "k") is None
            assert offsets((await store.commit([Write(events("t", 1))]))[0]) == [1]
        async with opened(store_url) as store:
            assert store.epoch == epoch

    run(body)


def test_overloaded_when_the_queue_is_full(store_url: str) -> None:
    async def body() -> None:
        async with opened(store_url) as store, batching(store, queue_max_rows=5) as batcher:
            # All ten submits reach the queue before the writer runs.
            outcomes = await asyncio.gather(
                *(batcher.submit(Write([ev("t", i)])) for i in range(10)),
                return_exceptions=True,
            )
            stored = [o for o in outcomes if isinstance(o, list)]
            refused = [o for o in outcomes if isinstance(o, Overloaded)]
            assert (len(stored), len(refused)) == (5, 5)
            assert "queue_max_rows" in str(refused[0])
            assert sorted(e.offset for s in stored for e in s) == [1, 2, 3, 4, 5]
            # Once the queue has room again, submits are taken.
            assert offsets(await batcher.submit(Write([ev("t")]))) == [6]

    run(body)


def test_drain_commits_what_is_queued_then_refuses(store_url: str) -> None:
    async def body() -> None:
        async with opened(store_url) as store:
            batcher = Batcher(
                store, max_rows=10, max_delay_ms=0, queue_max_rows=1000, retry_max_delay_s=1
            )
            batcher.start()
            pending = [
                asyncio.ensure_future(batcher.submit(Write([ev("t", i)]))) for i in range(50)
            ]
            await asyncio.sleep(0)  # all queued
            await batcher.drain()
            assert all(p.done() and not p.exception() for p in pending)
            assert batcher.batches >= 5 and batcher.last_batch_rows <= 10  # max_rows respected
            assert await store.head("t") == 50
            with pytest.raises(StoreUnavailable, match="not accepting writes"):
                await batcher.submit(Write([ev("t")]))

    run(body)


def test_open_refuses_an_old_schema_when_migrations_are_off(store_url: str) -> None:
    async def body() -> None:
        store = open_store(Config(store=StoreConfig(url=store_url, migrate_on_start=False)))
        with pytest.raises(StoreUnavailable, match=r"schema version 0 .* run `etherd migrate`"):
            await store.open()
        await store.close()
        async with opened(store_url) as migrated:
            assert migrated.migrated == [1, 2]
        async with opened(store_url, migrate_on_start=False) as store:
            assert store.migrated == []
            assert await store.head("t") == 0

    run(body)
