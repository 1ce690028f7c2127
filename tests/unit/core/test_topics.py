"""Topic and pattern rules, the reference matcher, ``covers``, and the ``TopicTrie`` index."""

from __future__ import annotations

import itertools
import re
from collections import Counter
from functools import cache

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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

SEG_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.:-"
FAST = settings(max_examples=150, deadline=None, database=None)

# -- validation -------------------------------------------------------------------------

VALID_TOPICS = [
    "a",
    "tasks",
    "tasks/123",
    "tasks/abc-DEF_0.9:x/events",
    "A/b/C/d/E/f",
    "...",
    "-/_/:/.x",
    ".a/a.",
    "x" * MAX_TOPIC_BYTES,
    "/".join(["ab"] * 85),  # 254 bytes
]

# (text, substrings the message must contain)
INVALID_TOPICS = [
    ("", ["topic is empty"]),
    ("tasks//x", ["segment 2 of 'tasks//x' is empty"]),
    ("/a", ["segment 1 of '/a' is empty", "leading"]),
    ("a/", ["segment 2 of 'a/' is empty", "trailing"]),
    ("/", ["segment 1 of '/' is empty"]),
    ("x" * 300, ["topic is 300 bytes, at most 255 allowed"]),
    ("x" * 256, ["topic is 256 bytes"]),
    ("é" * 128, ["topic is 256 bytes"]),  # 128 characters, 256 bytes
    ("a/b c", ["segment 2 of 'a/b c'", "' '", "character 2", "A-Z a-z 0-9"]),
    ("a/é", ["segment 2 of 'a/é'", "'é'"]),
    ("a\n", ["segment 1", "'\\n'"]),
    ("a/*", ["segment 2 of 'a/*'", "wildcard '*'", "may not contain"]),
    ("a/>", ["segment 2 of 'a/>'", "wildcard '>'"]),
    (">", ["segment 1 of '>'", "wildcard"]),
    ("ta*/x", ["segment 1 of 'ta*/x'", "'*'", "may not contain wildcards"]),
    ("a/b#", ["segment 2", "'#'", "character 2"]),
    ("tasks/../x", ["segment 2 of 'tasks/../x' is '..'", "not allowed as a whole segment"]),
    (".", ["segment 1 of '.' is '.'"]),
    ("a/.", ["segment 2 of 'a/.' is '.'"]),
]

VALID_PATTERNS = [
    *VALID_TOPICS,
    "*",
    ">",
    "*/>",
    "tasks/*",
    "tasks/>",
    "a/*/c",
    "*/*/*",
    "a/*/>",
    "*" + "/*" * 127,  # 255 bytes
]

INVALID_PATTERNS = [
    ("", ["pattern is empty"]),
    ("*/..", ["segment 2 of '*/..' is '..'"]),
    ("a/>/b", ["'>' may only be the last segment of 'a/>/b'"]),
    (">/a", ["'>' may only be the last segment of '>/a'"]),
    ("ta*", ["segment 1 of 'ta*'", "'*' must be a whole segment"]),
    ("a/b>", ["segment 2 of 'a/b>'", "'>' must be a whole segment"]),
    ("a/**", ["segment 2", "'*' must be a whole segment"]),
    ("a/>>", ["segment 2", "'>' must be a whole segment"]),
    ("tasks//*", ["segment 2 of 'tasks//*' is empty"]),
    ("*/", ["segment 2 of '*/' is empty", "trailing"]),
    ("/>", ["segment 1 of '/>' is empty", "leading"]),
    ("*" + "/*" * 150, ["pattern is 301 bytes, at most 255 allowed"]),
    ("a/ *", ["segment 2", "' '"]),
]


@pytest.mark.parametrize("topic", VALID_TOPICS)
def test_valid_topics_pass(topic: str) -> None:
    validate_topic(topic)
    validate_pattern(topic)
    assert not is_pattern(topic)


@pytest.mark.parametrize(("topic", "parts"), INVALID_TOPICS)
def test_invalid_topics_fail_with_a_useful_message(topic: str, parts: list[str]) -> None:
    with pytest.raises(TopicError) as caught:
        validate_topic(topic)
    message = str(caught.value)
    for part in parts:
        assert part in message, (part, message)
    assert "is not valid" not in message  # the catch-all must never be needed


@pytest.mark.parametrize("pattern", VALID_PATTERNS)
def test_valid_patterns_pass(pattern: str) -> None:
    validate_pattern(pattern)


@pytest.mark.parametrize(("pattern", "parts"), INVALID_PATTERNS)
def test_invalid_patterns_fail_with_a_useful_message(pattern: str, parts: list[str]) -> None:
    with pytest.raises(TopicError) as caught:
        validate_pattern(pattern)
    message = str(caught.value)
    for part in parts:
        assert part in message, (part, message)
    assert "is not valid" not in message


def test_topic_error_is_a_value_error() -> None:
    assert issubclass(TopicError, ValueError)


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [("a", False), ("a/b", False), ("*", True), (">", True), ("a/*/c", True), ("a/>", True)],
)
def test_is_pattern(pattern: str, expected: bool) -> None:
    assert is_pattern(pattern) is expected


def oracle_topic_ok(text: str) -> bool:
    if not text or len(text.encode("utf-8", "surrogatepass")) > MAX_TOPIC_BYTES:
        return False
    return all(
        seg and seg not in (".", "..") and set(seg) <= set(SEG_CHARS) for seg in text.split("/")
    )


def oracle_pattern_ok(text: str) -> bool:
    if not text or len(text.encode("utf-8", "surrogatepass")) > MAX_TOPIC_BYTES:
        return False
    segments = text.split("/")
    return all(
        seg == "*"
        or (seg == ">" and i == len(segments) - 1)
        or (seg and seg not in (".", "..") and set(seg) <= set(SEG_CHARS))
        for i, seg in enumerate(segments)
    )


def _joined(segments: list[str]) -> str:
    return "/".join(segments)


# Mostly well-formed text with the odd flaw, so both verdicts come up often.
candidate_text = st.one_of(
    st.text(alphabet="ab_.:-/*> é\n", max_size=12),
    st.lists(
        st.one_of(
            st.sampled_from(["a", "b", "*", ">", "", "x.y", "é", "a*", "-"]),
            st.text(alphabet=SEG_CHARS, min_size=1, max_size=8),
        ),
        min_size=1,
        max_size=6,
    ).map(_joined),
    st.lists(st.text(alphabet="abc", min_size=1, max_size=40), min_size=1, max_size=12).map(
        _joined
    ),
)


@FAST
@given(candidate_text)
def test_validation_agrees_with_a_plain_oracle(text: str) -> None:
    for validate, oracle in (
        (validate_topic, oracle_topic_ok),
        (validate_pattern, oracle_pattern_ok),
    ):
        if oracle(text):
            validate(text)
        else:
            with pytest.raises(TopicError) as caught:
                validate(text)
            assert "is not valid" not in str(caught.value)  # a specific reason was found


# -- the reference matcher ----------------------------------------------------------------

MATCH_CASES = [
    ("a", "a", True),
    ("a", "b", False),
    ("a", "a/b", False),
    ("a/b", "a", False),
    ("*", "a", True),
    ("*", "a/b", False),
    (">", "a", True),
    (">", "a/b/c", True),
    ("a/>", "a", False),  # '>' needs at least one segment
    ("a/>", "a/b", True),
    ("a/>", "a/b/c", True),
    ("a/>", "b/c", False),
    ("a/*/c", "a/b/c", True),
    ("a/*/c", "a/b/d", False),
    ("a/*/c", "a/c", False),
    ("*/*", "a/b", True),
    ("*/>", "a", False),
    ("*/>", "a/b", True),
    ("tasks/x", "tasks/x", True),
]


@pytest.mark.parametrize(("pattern", "topic", "expected"), MATCH_CASES)
def test_matches_table(pattern: str, topic: str, expected: bool) -> None:
    assert matches(pattern, topic) is expected


def as_regex(pattern: str) -> re.Pattern[str]:
    parts = []
    for seg in pattern.split("/"):
        if seg == "*":
            parts.append("[^/]+")
        elif seg == ">":
            parts.append("[^/]+(?:/[^/]+)*")
        else:
            parts.append(re.escape(seg))
    return re.compile("/".join(parts))


# Small alphabets so that matches actually happen.
def pattern_strategy(
    literals: tuple[str, ...] = ("a", "b"), max_len: int = 3
) -> st.SearchStrategy[str]:
    body = st.lists(st.sampled_from([*literals, "*"]), min_size=1, max_size=max_len)
    return st.tuples(body, st.booleans()).map(
        lambda bt: "/".join([*bt[0][:-1], ">"]) if bt[1] else "/".join(bt[0])
    )


topic_strategy = st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=4).map(_joined)


@FAST
@given(pattern_strategy(), topic_strategy)
def test_matches_agrees_with_a_regex_translation(pattern: str, topic: str) -> None:
    validate_pattern(pattern)
    validate_topic(topic)
    assert matches(pattern, topic) is (as_regex(pattern).fullmatch(topic) is not None)


# -- covers -------------------------------------------------------------------------------

# Every topic over {a, b, z} of up to 4 segments: enough to find a counterexample for any two
# patterns of up to 3 segments over {a, b, *, >}, since 'z' never appears as a literal.
UNIVERSE = [
    "/".join(combo)
    for length in range(1, 5)
    for combo in itertools.product(["a", "b", "z"], repeat=length)
]


@cache
def matched_set(pattern: str) -> frozenset[str]:
    return frozenset(t for t in UNIVERSE if matches(pattern, t))


def all_small_patterns() -> list[str]:
    out = []
    for length in range(1, 4):
        for combo in itertools.product(["a", "b", "*"], repeat=length):
            out.append("/".join(combo))
            out.append("/".join([*combo[:-1], ">"]))
    return sorted(set(out))


@pytest.mark.parametrize(
    ("outer", "inner", "expected"),
    [
        ("tasks/>", "tasks/*", True),
        ("tasks/*", "tasks/>", False),
        ("a/*/c", "a/b/c", True),
        ("*/b", "a/*", False),
        (">", "a", True),
        (">", "*/*/>", True),
        (">", ">", True),
        ("a/b", "a/b", True),
        ("a/b", "a/c", False),
        ("a/b", "a/*", False),
        ("a/>", "a", False),
        ("a/>", "a/>", True),
        ("a/>", "a/b/>", True),
        ("a/b/>", "a/>", False),
        ("*/>", ">", False),  # '>' also matches one-segment topics
        ("*/>", "*/*", True),
        ("*", ">", False),
        ("*/*", "a/>", False),
        ("tasks/*", "tasks", False),
    ],
)
def test_covers_table(outer: str, inner: str, expected: bool) -> None:
    assert covers(outer, inner) is expected


def test_covers_is_exact_over_all_small_patterns() -> None:
    patterns = all_small_patterns()
    assert len(patterns) == 52
    checked = 0
    for outer in patterns:
        for inner in patterns:
            brute = matched_set(inner) <= matched_set(outer)
            assert covers(outer, inner) is brute, (outer, inner)
            checked += brute
    assert 0 < checked < len(patterns) ** 2  # both verdicts occur


@FAST
@given(pattern_strategy(), pattern_strategy())
def test_covers_agrees_with_brute_force(outer: str, inner: str) -> None:
    assert covers(outer, inner) is (matched_set(inner) <= matched_set(outer))
    assert covers(outer, outer)
    if covers(outer, inner) and covers(inner, outer):
        assert outer == inner  # distinct valid patterns never match the same topics


# -- TopicTrie ------------------------------------------------------------------------------

# Topics over {a, b, c} of up to 3 segments, plus all 4-segment ones over {a, b}.
TRIE_TOPICS = [
    "/".join(combo)
    for length in range(1, 4)
    for combo in itertools.product(["a", "b", "c"], repeat=length)
] + ["/".join(combo) for combo in itertools.product(["a", "b"], repeat=4)]

ops_strategy = st.lists(
    st.tuples(st.booleans(), pattern_strategy(), st.integers(0, 3)), min_size=1, max_size=20
)


def brute_force(model: set[tuple[str, int]], topic: str) -> set[int]:
    return {sub for pattern, sub in model if matches(pattern, topic)}


@pytest.mark.parametrize("cache_size", [0, 3, 4096])
@settings(max_examples=60, deadline=None, database=None)
@given(ops=ops_strategy, data=st.data())
def test_trie_agrees_with_brute_force(
    cache_size: int, ops: list[tuple[bool, str, int]], data: st.DataObject
) -> None:
    trie: TopicTrie[int] = TopicTrie(cache_size=cache_size)
    model: set[tuple[str, int]] = set()
    kept: list[tuple[str, tuple[int, ...], set[int]]] = []  # earlier results, as snapshots
    for add, pattern, sub in ops:
        # Bias removals toward pairs that are held, so removal paths run.
        if not add and model and data.draw(st.booleans()):
            pattern, sub = data.draw(st.sampled_from(sorted(model)))
        if add:
            assert trie.insert(pattern, sub) is ((pattern, sub) not in model)
            model.add((pattern, sub))
        else:
            assert trie.remove(pattern, sub) is ((pattern, sub) in model)
            model.discard((pattern, sub))
        assert trie.subscription_count == len(model)
        assert trie.pattern_count == len({p for p, _ in model})
        counts = Counter(p for p, _ in model)
        assert trie.subscriber_counts(100) == sorted(
            counts.items(), key=lambda item: (-item[1], item[0])
        )
        for topic in TRIE_TOPICS:
            got = trie.match(topic)
            assert len(got) == len(set(got)), "each subscriber at most once"
            expected = brute_force(model, topic)
            assert set(got) == expected, (topic, sorted(model))
            assert trie.has_interest(topic) is bool(expected)
            assert trie.match(topic) == got  # a second (possibly cached) answer agrees
        probe = data.draw(st.sampled_from(TRIE_TOPICS))
        got = trie.match(probe)
        kept.append((probe, tuple(got), set(got)))
        if cache_size:
            assert len(trie._cache) <= cache_size
    for _, frozen, members in kept:
        assert set(frozen) == members
    for pattern, sub in sorted(model):
        assert trie.remove(pattern, sub)
    assert trie.is_empty()
    assert trie.subscription_count == 0
    assert trie.pattern_count == 0


@pytest.mark.parametrize("cache_size", [0, 4096])
def test_insert_then_remove_all_leaves_nothing(cache_size: int) -> None:
    trie: TopicTrie[str] = TopicTrie(cache_size=cache_size)
    assert trie.is_empty()
    patterns = ["tasks/x", "tasks/>", "tasks/*", "*/x", ">", "a/*/c/>", "a/b/c", "*/*/*"]
    for i, pattern in enumerate(patterns):
        for sub in ("s1", "s2"):
            assert trie.insert(pattern, sub)
            assert not trie.insert(pattern, sub)
        trie.match("tasks/x")
        trie.match(f"a/b/c/{i}")
        assert not trie.is_empty()
    assert trie.subscription_count == 2 * len(patterns)
    assert trie.pattern_count == len(patterns)
    for pattern in reversed(patterns):
        for sub in ("s1", "s2"):
            assert trie.remove(pattern, sub)
            assert not trie.remove(pattern, sub)
            trie.match("tasks/x")
    assert trie.is_empty()
    assert trie.match("tasks/x") == ()
    assert trie.is_empty(), "a match on an empty index must not fill the cache"


def test_remove_of_unknown_pairs_is_refused() -> None:
    trie: TopicTrie[str] = TopicTrie()
    trie.insert("a/*/c", "s")
    assert not trie.remove("a/*/c", "other")
    assert not trie.remove("a/*", "s")
    assert not trie.remove("a/*/c/>", "s")
    assert not trie.remove("a/b/c", "s")
    assert not trie.remove("x/>", "s")
    assert trie.subscription_count == 1
    assert set(trie.match("a/b/c")) == {"s"}


def test_match_result_is_a_snapshot() -> None:
    trie: TopicTrie[str] = TopicTrie()
    trie.insert("tasks/x", "s1")
    trie.insert("tasks/x", "s2")
    trie.insert("tasks/>", "s3")
    before = trie.match("tasks/x")
    assert isinstance(before, tuple)
    assert set(before) == {"s1", "s2", "s3"}
    trie.remove("tasks/x", "s1")
    trie.remove("tasks/>", "s3")
    trie.insert("tasks/x", "s4")
    assert set(before) == {"s1", "s2", "s3"}
    assert set(trie.match("tasks/x")) == {"s2", "s4"}


def test_subscriber_with_overlapping_patterns_is_delivered_once() -> None:
    for cache_size in (0, 16):
        trie: TopicTrie[str] = TopicTrie(cache_size=cache_size)
        for pattern in ("tasks/x", "tasks/>", "tasks/*", ">", "*/x"):
            trie.insert(pattern, "s")
        trie.insert("tasks/>", "t")
        for _ in range(2):  # uncached, then cached
            assert sorted(trie.match("tasks/x")) == ["s", "t"]
            assert sorted(trie.match("tasks/y")) == ["s", "t"]
            assert list(trie.match("other")) == ["s"]
        assert trie.subscription_count == 6
        assert trie.pattern_count == 5


def test_exact_change_invalidates_only_that_topic() -> None:
    trie: TopicTrie[int] = TopicTrie()
    trie.insert("a", 1)
    trie.insert("b", 2)
    first_a = trie.match("a")
    first_b = trie.match("b")
    assert trie.match("b") is first_b  # served from the cache
    trie.insert("a", 3)
    assert trie.match("b") is first_b  # untouched by a change to another topic
    assert set(trie.match("a")) == {1, 3}
    assert set(first_a) == {1}
    trie.insert("*", 4)  # a wildcard may touch any topic
    assert set(trie.match("b")) == {2, 4}


def test_exact_ramp_up_with_many_subscribers() -> None:
    trie: TopicTrie[int] = TopicTrie()
    for i in range(10_000):
        trie.insert("tasks/hot", i)
        if i % 1000 == 0:
            assert len(trie.match("tasks/hot")) == i + 1
    got = trie.match("tasks/hot")
    assert len(got) == 10_000
    assert trie.match("tasks/hot") is got  # built once, then served as is
    assert trie.match("tasks/cold") == ()
    assert not trie.has_interest("tasks/cold")
    assert trie.has_interest("tasks/hot")
    for i in range(10_000):
        trie.remove("tasks/hot", i)
    assert trie.is_empty()


def test_cache_stays_bounded() -> None:
    trie: TopicTrie[int] = TopicTrie(cache_size=8)
    trie.insert("t/>", 1)
    for i in range(100):
        assert list(trie.match(f"t/{i}")) == [1]
        assert len(trie._cache) <= 8
    assert trie.match("u") == ()


def test_negative_cache_size_is_refused() -> None:
    with pytest.raises(ValueError, match="cache_size"):
        TopicTrie(cache_size=-1)


def test_subscriber_counts_lists_the_busiest_patterns_first() -> None:
    trie: TopicTrie[int] = TopicTrie()
    for sub in range(3):
        trie.insert("tasks/a", sub)
        trie.insert(">", sub)
    for sub in range(2):
        trie.insert("tasks/*", sub)
        trie.insert("tasks/b/>", sub)
    trie.insert("activity/alice", 9)
    assert trie.subscriber_counts(10) == [
        (">", 3),
        ("tasks/a", 3),
        ("tasks/*", 2),
        ("tasks/b/>", 2),
        ("activity/alice", 1),
    ]
    assert trie.subscriber_counts(2) == [(">", 3), ("tasks/a", 3)]
    assert trie.subscriber_counts(0) == []
    trie.remove("tasks/*", 0)
    assert ("tasks/*", 1) in trie.subscriber_counts(10)
    assert TopicTrie[int]().subscriber_counts(5) == []
