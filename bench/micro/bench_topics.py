"""Micro-benchmarks for ``etherd.core.topics``: the fan-out lookup on the publish path.

Not collected by the normal test run (which only looks in ``tests/``). Run with:

    python -m pytest bench/micro/bench_topics.py --benchmark-only

(``python -m`` puts the work tree on ``sys.path`` so ``etherd`` imports uninstalled.)

The headline case is 10,000 subscribers on one exact topic, published to repeatedly.
"""

from __future__ import annotations

from itertools import cycle

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from etherd.core.topics import TopicTrie, matches, validate_pattern, validate_topic

CACHE = pytest.mark.parametrize("cache_size", [4096, 0], ids=["cache", "nocache"])


def exact_trie(cache_size: int, subs: int = 10_000) -> TopicTrie[int]:
    trie: TopicTrie[int] = TopicTrie(cache_size=cache_size)
    for i in range(subs):
        trie.insert("tasks/hot", i)
    for i in range(1_000):  # other, quieter topics
        trie.insert(f"tasks/t{i}", i)
    return trie


def pattern_trie(cache_size: int) -> TopicTrie[int]:
    trie: TopicTrie[int] = TopicTrie(cache_size=cache_size)
    sub = 0
    for i in range(200):
        for pattern in (f"tasks/t{i}", f"tasks/t{i}/*", f"tasks/t{i}/>", f"*/t{i}/events"):
            trie.insert(pattern, sub)
            sub += 1
    trie.insert("tasks/>", sub)
    trie.insert(">", sub + 1)
    return trie


@CACHE
def test_exact_hit_10k_subs(benchmark: BenchmarkFixture, cache_size: int) -> None:
    trie = exact_trie(cache_size)
    result = benchmark(trie.match, "tasks/hot")
    assert len(result) == 10_000


@CACHE
def test_exact_hit_1_sub(benchmark: BenchmarkFixture, cache_size: int) -> None:
    trie = exact_trie(cache_size)
    result = benchmark(trie.match, "tasks/t7")
    assert len(result) == 1


@CACHE
def test_exact_miss(benchmark: BenchmarkFixture, cache_size: int) -> None:
    trie = exact_trie(cache_size)
    result = benchmark(trie.match, "tasks/nobody")
    assert len(result) == 0


@CACHE
def test_has_interest_miss(benchmark: BenchmarkFixture, cache_size: int) -> None:
    trie = exact_trie(cache_size)
    assert benchmark(trie.has_interest, "tasks/nobody") is False


@CACHE
def test_pattern_hit(benchmark: BenchmarkFixture, cache_size: int) -> None:
    trie = pattern_trie(cache_size)
    result = benchmark(trie.match, "tasks/t7/events")
    assert len(result) == 5  # t7/*, t7/>, */t7/events, tasks/>, >


@CACHE
def test_pattern_miss(benchmark: BenchmarkFixture, cache_size: int) -> None:
    trie = pattern_trie(cache_size)
    trie.remove(">", 801)
    result = benchmark(trie.match, "runs/x/y")
    assert len(result) == 0


def test_pattern_many_topics_churn(benchmark: BenchmarkFixture) -> None:
    """10,000 distinct topics round-robin through a 4,096-entry cache: eviction cost."""
    trie = pattern_trie(4096)
    topics = cycle([f"tasks/t{i % 200}/e{i}" for i in range(10_000)])

    def one() -> int:
        return len(trie.match(next(topics)))

    assert benchmark(one) >= 2


def test_ramp_up_10k_exact_with_publishes(benchmark: BenchmarkFixture) -> None:
    """10,000 subscribes on one topic, a publish after every 10: invalidation + rebuild."""

    def ramp() -> int:
        trie: TopicTrie[int] = TopicTrie()
        for i in range(10_000):
            trie.insert("tasks/hot", i)
            if i % 10 == 0:
                trie.match("tasks/hot")
        return len(trie.match("tasks/hot"))

    assert benchmark(ramp) == 10_000


def test_reference_matches(benchmark: BenchmarkFixture) -> None:
    assert benchmark(matches, "tasks/*/events/>", "tasks/abc/events/1/2")


def test_validate_topic(benchmark: BenchmarkFixture) -> None:
    benchmark(validate_topic, "tasks/0b5c6f1e-3f55-4a8e-9f0e-7d1e8a2b9c10/events")


def test_validate_pattern(benchmark: BenchmarkFixture) -> None:
    benchmark(validate_pattern, "tasks/*/events/>")
