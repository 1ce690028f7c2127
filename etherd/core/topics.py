"""Topics, subscription patterns, and the index that finds who is subscribed to a topic.

Theory of operation
-------------------
A *topic* is a name that events are published to: ``/``-separated segments, each made of
``[A-Za-z0-9_.:-]``, at most ``MAX_TOPIC_BYTES`` bytes in all. The segments ``.`` and
``..`` are refused: topics end up in URLs and paths, where they would read as "here" and
"up one level". A *pattern* is what a client
subscribes to: a topic in which whole segments may be the wildcards ``*`` (exactly one
segment) or, as the last segment only, ``>`` (one or more trailing segments), as in NATS.
``matches`` is the reference definition of "pattern matches topic"; ``covers`` decides whether
one pattern allows everything another one does (a token's ``topics`` claim against a
subscription pattern).

``TopicTrie`` is the fan-out index. It keeps two structures:

* exact subscriptions (no wildcard, by far the common case) in a dict
  ``topic -> {sub: None}``, so looking them up is one dict probe;
* wildcard patterns in a segment trie. Each node has a dict of literal children, one ``*``
  child slot, the subscribers of patterns that end at the node, and the subscribers of
  patterns that end with ``>`` right below the node. Matching a topic walks the trie once,
  segment by segment, following at most a literal and a ``*`` edge from each live node.

The result of ``match`` is a tuple: an immutable snapshot that callers may keep while the
index changes. Each subscriber appears once even if several of its patterns match. Results
go into a bounded cache (``cache_size`` entries; 0 turns it off), NATS sublist style; a full
cache drops its older half at once, which keeps eviction amortised O(1). Invalidation is
targeted rather than global:

* adding or removing an *exact* subscription on topic T can change only the result for T,
  so only T's cache entry is dropped. A ramp-up of 10,000 subscribers on one topic thus
  costs one dict pop per subscribe, and the next publish rebuilds that one tuple;
* adding or removing a *wildcard* subscription may change the result of any cached topic.
  Finding the affected entries would cost a ``matches`` call per cached topic, more than
  simply clearing the cache (wildcard subscriptions are rare next to publishes), so the
  whole cache is cleared.

With no wildcard subscriptions at all, a miss (a topic nobody follows) is answered with one
dict probe and is not cached, so a stream of unwatched topics cannot evict the hot entries.
Nothing is cached while the index is empty, and the cache is cleared when the last
subscription goes, so an unused index holds no memory.

This module is pure: no I/O and no event loop. Callers validate topics and patterns with
``validate_topic``/``validate_pattern`` at the edge; the index and the matchers assume
valid input.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Hashable
from heapq import nsmallest
from itertools import islice
from typing import Final, Generic, TypeVar

__all__ = [
    "MAX_TOPIC_BYTES",
    "TopicError",
    "TopicTrie",
    "covers",
    "is_pattern",
    "matches",
    "validate_pattern",
    "validate_topic",
]

MAX_TOPIC_BYTES: Final = 255

_SEG: Final = r"[A-Za-z0-9_.:\-]+"
_TOPIC_RE: Final = re.compile(rf"{_SEG}(?:/{_SEG})*")
_PATTERN_RE: Final = re.compile(rf"(?:{_SEG}|\*)(?:/(?:{_SEG}|\*))*(?:/>)?|>")
_SEG_CHARS: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.:-")
_ALLOWED_TEXT: Final = "A-Z a-z 0-9 _ . : -"


class TopicError(ValueError):
    """A topic or pattern that breaks the naming rules; the message says which rule and where."""


def _diagnose(text: str, kind: str, wildcards: bool) -> str:
    """Describe the first problem with ``text``, which the fast-path regex rejected."""
    if not text:
        return f"{kind} is empty; expected one or more '/'-separated segments"
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_TOPIC_BYTES:
        return f"{kind} is {size} bytes, at most {MAX_TOPIC_BYTES} allowed"
    segments = text.split("/")
    count = len(segments)
    for number, segment in enumerate(segments, 1):
        where = f"segment {number} of {text!r}"
        if not segment:
            if number == 1:
                return f"{where} is empty (leading '/')"
            if number == count:
                return f"{where} is empty (trailing '/')"
            return f"{where} is empty"
        if segment in ("*", ">"):
            if not wildcards:
                return (
                    f"{where} is the wildcard {segment!r}; a topic to publish to "
                    "may not contain '*' or '>' (only subscription patterns may)"
                )
            if segment == ">" and number != count:
                return (
                    f"'>' may only be the last segment of {text!r}, "
                    f"found at segment {number} of {count}"
                )
            continue
        if segment in (".", ".."):
            return f"{where} is {segment!r}; '.' and '..' are not allowed as a whole segment"
        for position, char in enumerate(segment, 1):
            if char not in _SEG_CHARS:
                hint = ""
                if char in "*>":
                    hint = (
                        f"; {char!r} must be a whole segment"
                        if wildcards
                        else "; a topic to publish to may not contain wildcards"
                    )
                return (
                    f"{where} has {char!r} at character {position} of {segment!r}; "
                    f"expected only {_ALLOWED_TEXT}{hint}"
                )
    # Only reachable if the regexes and this function disagree, which the tests rule out.
    return f"{kind} {text!r} is not valid"


def _dot_segment(text: str) -> bool:
    """Whether a ``.`` or ``..`` segment is in ``text`` (cheap when there is no dot)."""
    if "." not in text:
        return False
    return any(segment in (".", "..") for segment in text.split("/"))


def validate_topic(topic: str) -> None:
    """Check that ``topic`` is a concrete topic (no wildcards); raise ``TopicError`` if not."""
    if (
        len(topic) <= MAX_TOPIC_BYTES
        and _TOPIC_RE.fullmatch(topic) is not None
        and not _dot_segment(topic)
    ):
        return  # ASCII only, so characters == bytes
    raise TopicError(_diagnose(topic, "topic", wildcards=False))


def validate_pattern(pattern: str) -> None:
    """Check that ``pattern`` is a topic or a wildcard pattern; raise ``TopicError`` if not."""
    if (
        len(pattern) <= MAX_TOPIC_BYTES
        and _PATTERN_RE.fullmatch(pattern) is not None
        and not _dot_segment(pattern)
    ):
        return
    raise TopicError(_diagnose(pattern, "pattern", wildcards=True))


def is_pattern(pattern: str) -> bool:
    """Whether a valid pattern has a ``*`` or ``>`` segment (as opposed to being a topic).

    In a valid pattern those characters only ever form whole segments, so a character test
    suffices.
    """
    return "*" in pattern or ">" in pattern


def matches(pattern: str, topic: str) -> bool:
    """Whether ``pattern`` matches the concrete ``topic`` (the reference definition).

    ``*`` matches exactly one segment; ``>`` matches one or more trailing segments; any other
    segment matches only itself.
    """
    want = pattern.split("/")
    have = topic.split("/")
    for index, segment in enumerate(want):
        if segment == ">":
            return len(have) > index
        if index >= len(have):
            return False
        if segment != "*" and segment != have[index]:
            return False
    return len(want) == len(have)


def covers(outer: str, inner: str) -> bool:
    """Whether every topic matched by pattern ``inner`` is also matched by pattern ``outer``.

    Exact for valid patterns: segment values are drawn from an unbounded set, so a literal in
    ``outer`` never covers a ``*`` in ``inner``, and only a ``>`` in ``outer`` covers the
    unbounded lengths of a ``>`` in ``inner``.
    """
    big = outer.split("/")
    small = inner.split("/")
    for index, segment in enumerate(big):
        if segment == ">":
            return len(small) > index  # any inner segment (even '>') means 1+ segments
        if index >= len(small):
            return False  # inner topics are shorter than outer ones
        theirs = small[index]
        if theirs == ">":
            return False  # inner reaches lengths that outer, with no '>', cannot
        if segment != "*" and segment != theirs:
            return False  # a different literal, or a literal against inner's '*'
    return len(big) == len(small)


S = TypeVar("S", bound=Hashable)


class _Node(Generic[S]):
    """A trie node for the wildcard patterns; ``subs``/``full`` are None when empty."""

    __slots__ = ("full", "lit", "star", "subs")

    def __init__(self) -> None:
        self.lit: dict[str, _Node[S]] = {}
        self.star: _Node[S] | None = None
        # Subscribers of patterns that end at this node.
        self.subs: dict[S, None] | None = None
        # Subscribers of patterns that end with '>' just below this node.
        self.full: dict[S, None] | None = None

    def is_empty(self) -> bool:
        return not self.lit and self.star is None and self.subs is None and self.full is None


class TopicTrie(Generic[S]):
    """Who is subscribed to what: (pattern, subscriber) pairs, matched against topics.

    Patterns and topics given to the methods are assumed valid (see ``validate_pattern`` and
    ``validate_topic``). Not thread-safe; meant for one event loop.
    """

    __slots__ = ("_cache", "_cache_size", "_exact", "_patterns", "_root", "_subs", "_wild")

    def __init__(self, cache_size: int = 4096) -> None:
        """Make an empty index whose match cache holds at most ``cache_size`` topics (0: off)."""
        if cache_size < 0:
            raise ValueError(f"cache_size must be 0 or more, got {cache_size}")
        self._cache_size = cache_size
        self._cache: dict[str, tuple[S, ...]] = {}
        self._exact: dict[str, dict[S, None]] = {}
        self._root: _Node[S] = _Node()
        self._wild = 0  # (pattern, sub) pairs held in the trie
        self._subs = 0  # (pattern, sub) pairs in all
        self._patterns = 0  # distinct patterns with at least one sub

    @property
    def subscription_count(self) -> int:
        """How many (pattern, subscriber) pairs are held."""
        return self._subs

    @property
    def pattern_count(self) -> int:
        """How many distinct patterns (or exact topics) have at least one subscriber."""
        return self._patterns

    def is_empty(self) -> bool:
        """Whether nothing is held: no subscriptions, no trie nodes but the root, no cache."""
        return self._subs == 0 and not self._exact and self._root.is_empty() and not self._cache

    def insert(self, pattern: str, sub: S) -> bool:
        """Subscribe ``sub`` to ``pattern``; True if the pair is new, False if already held."""
        if "*" in pattern or ">" in pattern:
            return self._insert_wild(pattern, sub)
        subs = self._exact.get(pattern)
        if subs is None:
            subs = self._exact[pattern] = {}
            self._patterns += 1
        elif sub in subs:
            return False
        subs[sub] = None
        self._subs += 1
        self._cache.pop(pattern, None)  # only this topic's result changed
        return True

    def remove(self, pattern: str, sub: S) -> bool:
        """Unsubscribe ``sub`` from ``pattern``; True if the pair was held.

        Empty trie nodes and empty exact entries are removed, so a churn of subscriptions
        leaves nothing behind.
        """
        if "*" in pattern or ">" in pattern:
            removed = self._remove_wild(pattern, sub)
        else:
            subs = self._exact.get(pattern)
            if subs is None or sub not in subs:
                return False
            del subs[sub]
            if not subs:
                del self._exact[pattern]
                self._patterns -= 1
            self._subs -= 1
            self._cache.pop(pattern, None)
            removed = True
        if removed and self._subs == 0:
            # Already empty by the rules above; kept so is_empty() holds whatever they become.
            self._cache.clear()
        return removed

    def match(self, topic: str) -> Collection[S]:
        """Every subscriber with at least one pattern matching ``topic``, each once.

        The result is an immutable snapshot (a tuple): callers must not try to change it, and
        it stays as it was when later subscriptions change the index.
        """
        hit = self._cache.get(topic)
        if hit is not None:
            return hit
        exact = self._exact.get(topic)
        if self._wild:
            found = self._collect(topic)
            if exact is not None:
                found.insert(0, exact)
            if not found:
                result: tuple[S, ...] = ()
            elif len(found) == 1:
                result = tuple(found[0])
            else:
                merged: dict[S, None] = {}
                for subs in found:
                    merged.update(subs)
                result = tuple(merged)
        elif exact is None:
            return ()  # one dict probe to recompute; not worth a cache slot
        else:
            result = tuple(exact)
        if self._cache_size:
            cache = self._cache
            if len(cache) >= self._cache_size:
                # Drop the older half in one sweep: amortised O(1) per stored result.
                for key in list(islice(cache, max(1, len(cache) // 2))):
                    del cache[key]
            cache[topic] = result
        return result

    def subscriber_counts(self, limit: int) -> list[tuple[str, int]]:
        """The ``limit`` patterns (or exact topics) with the most subscribers, most first.

        Ties are listed by name. Read-only, for an operator's overview rather than the hot
        path: it reads the size of each exact entry and walks the wildcard trie once (few
        nodes next to the exact topics), then keeps the top ``limit`` with a heap, so it
        costs O(P log limit) for P distinct patterns and allocates nothing per subscriber.
        """
        if limit <= 0:
            return []
        counts: list[tuple[str, int]] = [(topic, len(subs)) for topic, subs in self._exact.items()]
        if self._wild:
            stack: list[tuple[_Node[S], str]] = [(self._root, "")]
            while stack:
                node, prefix = stack.pop()
                if node.subs is not None:
                    counts.append((prefix, len(node.subs)))
                if node.full is not None:
                    counts.append((f"{prefix}/>" if prefix else ">", len(node.full)))
                for segment, child in node.lit.items():
                    stack.append((child, f"{prefix}/{segment}" if prefix else segment))
                if node.star is not None:
                    stack.append((node.star, f"{prefix}/*" if prefix else "*"))
        return nsmallest(limit, counts, key=lambda item: (-item[1], item[0]))

    def has_interest(self, topic: str) -> bool:
        """Whether at least one subscriber would receive an event on ``topic``."""
        if topic in self._exact:
            return True  # exact entries are never empty
        if not self._wild:
            return False
        hit = self._cache.get(topic)
        if hit is not None:
            return bool(hit)
        return bool(self._collect(topic))

    # -- the wildcard trie -------------------------------------------------------------

    def _collect(self, topic: str) -> list[dict[S, None]]:
        """The subscriber sets of every trie pattern matching ``topic`` (may overlap)."""
        found: list[dict[S, None]] = []
        nodes = [self._root]
        for segment in topic.split("/"):
            following: list[_Node[S]] = []
            for node in nodes:
                if node.full is not None:
                    found.append(node.full)  # '>' takes this segment and the rest
                child = node.lit.get(segment)
                if child is not None:
                    following.append(child)
                if node.star is not None:
                    following.append(node.star)
            if not following:
                return found
            nodes = following
        found.extend(node.subs for node in nodes if node.subs is not None)
        return found

    def _insert_wild(self, pattern: str, sub: S) -> bool:
        segments = pattern.split("/")
        full = segments[-1] == ">"
        if full:
            segments.pop()
        node = self._root
        for segment in segments:
            if segment == "*":
                child = node.star
                if child is None:
                    child = node.star = _Node()
            else:
                child = node.lit.get(segment)
                if child is None:
                    child = node.lit[segment] = _Node()
            node = child
        subs = node.full if full else node.subs
        if subs is None:
            subs = {}
            if full:
                node.full = subs
            else:
                node.subs = subs
            self._patterns += 1
        elif sub in subs:
            return False
        subs[sub] = None
        self._wild += 1
        self._subs += 1
        self._cache.clear()  # any cached topic may match the new pattern
        return True

    def _remove_wild(self, pattern: str, sub: S) -> bool:
        segments = pattern.split("/")
        full = segments[-1] == ">"
        if full:
            segments.pop()
        path: list[tuple[_Node[S], str]] = []  # (parent, edge) down to ``node``
        node = self._root
        for segment in segments:
            child = node.star if segment == "*" else node.lit.get(segment)
            if child is None:
                return False
            path.append((node, segment))
            node = child
        subs = node.full if full else node.subs
        if subs is None or sub not in subs:
            return False
        del subs[sub]
        if not subs:
            if full:
                node.full = None
            else:
                node.subs = None
            self._patterns -= 1
            while path and node.is_empty():
                parent, segment = path.pop()
                if segment == "*":
                    parent.star = None
                else:
                    del parent.lit[segment]
                node = parent
        self._wild -= 1
        self._subs -= 1
        self._cache.clear()
        return True
