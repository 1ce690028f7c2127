"""Fuzz ``etherd.core.topics``: validation, ``matches``/``covers`` and the ``TopicTrie``.

The input is text, one command per line (bytes that are not UTF-8 become lone surrogates,
so validation sees them too):

* ``+S PATTERN`` subscribes subscriber ``S`` to a pattern, ``-S PATTERN`` unsubscribes;
* ``?TOPIC`` asks who is subscribed to a topic;
* anything else is only validated.

Invariants: arbitrary strings raise nothing but ``TopicError`` and are accepted exactly
when an independent reading of the naming rules (module docstring) accepts them; for valid
input the trie (with and without its cache) answers what a naive matcher over every held
subscription answers, ``matches`` agrees with that matcher, ``covers`` never claims a
topic that the outer pattern misses, and removing everything leaves the trie empty.
"""

from __future__ import annotations

from collections.abc import Callable

import atheris

from tests.fuzz._run import main

with atheris.instrument_imports(include=["etherd"]):
    from etherd.core.topics import (
        MAX_TOPIC_BYTES,
        TopicError,
        TopicTrie,
        covers,
        is_pattern,
        matches,
        validate_pattern,
        validate_topic,
    )

_SEGMENT_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.:-")


def reference_valid(text: str, wildcards: bool) -> bool:
    """The naming rules read straight from the module docstring, segment by segment."""
    if not text or len(text.encode("utf-8", "surrogatepass")) > MAX_TOPIC_BYTES:
        return False
    segments = text.split("/")
    for index, segment in enumerate(segments):
        if wildcards and segment == "*":
            continue
        if wildcards and segment == ">" and index == len(segments) - 1:
            continue
        if not segment or segment in (".", "..") or not set(segment) <= _SEGMENT_CHARS:
            return False
    return True


def reference_match(pattern: list[str], topic: list[str]) -> bool:
    """Naive recursive matcher: ``*`` takes one segment, a final ``>`` one or more."""
    if not pattern:
        return not topic
    head = pattern[0]
    if head == ">":
        return len(topic) >= 1
    if not topic:
        return False
    if head != "*" and head != topic[0]:
        return False
    return reference_match(pattern[1:], topic[1:])


def _accepts(check: Callable[[str], None], text: str) -> bool:
    try:
        check(text)
    except TopicError:
        return False
    return True


def test_one_input(data: bytes) -> None:
    """Run one input's commands against two tries and the reference matcher."""
    text = data.decode("utf-8", "surrogateescape")
    tries: list[TopicTrie[str]] = [TopicTrie(cache_size=0), TopicTrie(cache_size=2)]
    held: dict[tuple[str, str], None] = {}
    patterns: list[str] = []
    topics: list[str] = []

    def check(topic: str) -> None:
        want = {
            sub for (pattern, sub) in held if reference_match(pattern.split("/"), topic.split("/"))
        }
        for trie in tries:
            for _ in range(2):  # the second answer may come from the cache
                got = list(trie.match(topic))
                assert len(got) == len(set(got)), (topic, got)
                assert set(got) == want, (topic, got, want)
                assert trie.has_interest(topic) == bool(want)

    for line in text.split("\n")[:64]:
        for body in {line, line[1:]}:
            topic_ok = _accepts(validate_topic, body)
            pattern_ok = _accepts(validate_pattern, body)
            assert topic_ok == reference_valid(body, wildcards=False), body
            assert pattern_ok == reference_valid(body, wildcards=True), body
            if topic_ok:
                assert pattern_ok and not is_pattern(body)
        op = line[:1]
        sub, _, body = line[1:].partition(" ")
        if op in ("+", "-") and _accepts(validate_pattern, body):
            patterns.append(body)
            expect = ((body, sub) in held) == (op == "-")
            for trie in tries:
                changed = trie.insert(body, sub) if op == "+" else trie.remove(body, sub)
                assert changed == expect, (line, changed)
            if op == "+":
                held[(body, sub)] = None
            else:
                held.pop((body, sub), None)
            for trie in tries:
                assert trie.subscription_count == len(held)
                assert trie.pattern_count == len({p for p, _ in held})
        elif op == "?" and _accepts(validate_topic, line[1:]):
            topics.append(line[1:])
            check(line[1:])

    for topic in topics:
        check(topic)
        split = topic.split("/")
        for pattern in patterns:
            assert matches(pattern, topic) == reference_match(pattern.split("/"), split)
            for outer in patterns:
                if covers(outer, pattern) and matches(pattern, topic):
                    assert matches(outer, topic), (outer, pattern, topic)
    for pattern, sub in list(held):
        for trie in tries:
            assert trie.remove(pattern, sub)
    for trie in tries:
        assert trie.is_empty() and trie.subscription_count == 0


if __name__ == "__main__":
    main(test_one_input)
