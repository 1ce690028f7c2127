"""Per-topic offset order for events that reach a node from several committing nodes.

In a cluster, the events of one topic are committed by whichever nodes their publishers
talk to, and reach each node over the bus (or, its own, from its own commits) in whatever
order the network delivers them, with nothing promised about loss. ``Ordering`` turns that
into what a subscriber is promised: each topic's events in offset order, every offset once.

For each followed topic it keeps the next offset to deliver. An event at that offset goes
out at once, with every held event that now follows it; an older one is a duplicate and is
dropped; a newer one is held, and the topic is marked as having a gap since that moment.
``gaps(now, wait)`` names the gaps that are older than ``wait``: the caller reads those
offsets from the shared log and hands them to ``fill``. A topic holding more than
``max_held`` events is reported at once, whatever its age. Events of a topic nobody
follows are not ordered: a pattern subscriber starts from the first event it sees.

Pure: no clock (``now`` is passed in), no I/O; ``T`` is whatever the caller delivers.
"""

from __future__ import annotations

from typing import Generic, NamedTuple, TypeVar

__all__ = ["Gap", "Ordering"]

T = TypeVar("T")


class Gap(NamedTuple):
    """Offsets missing from a topic: after ``after``, up to and including ``upto``."""

    topic: str
    after: int
    upto: int


class _Topic(Generic[T]):
    __slots__ = ("held", "next", "since")

    def __init__(self, after: int) -> None:
        self.next = after + 1
        self.held: dict[int, T] = {}
        # When the oldest unfilled gap appeared (None: no gap).
        self.since: float | None = None


class Ordering(Generic[T]):
    """Offset order per followed topic (see the module docstring)."""

    __slots__ = ("_max_held", "_topics")

    def __init__(self, max_held: int) -> None:
        self._max_held = max_held
        self._topics: dict[str, _Topic[T]] = {}

    def follow(self, topic: str, after: int) -> None:
        """Deliver ``topic`` from offset ``after + 1`` on (kept if already followed)."""
        if topic not in self._topics:
            self._topics[topic] = _Topic(after)

    def unfollow(self, topic: str) -> None:
        """Forget a topic and whatever it holds."""
        self._topics.pop(topic, None)

    def is_followed(self, topic: str) -> bool:
        """Whether events of ``topic`` are ordered."""
        return topic in self._topics

    def delivered(self, topic: str) -> int | None:
        """The last offset delivered of a followed topic."""
        state = self._topics.get(topic)
        return None if state is None else state.next - 1

    def positions(self) -> dict[str, int]:
        """Every followed topic and its last delivered offset (for catching up)."""
        return {topic: state.next - 1 for topic, state in self._topics.items()}

    @property
    def held(self) -> int:
        """Events held for later offsets, over all topics."""
        return sum(len(state.held) for state in self._topics.values())

    def offer(self, topic: str, offset: int, item: T, now: float) -> list[T]:
        """An event arrived; what may be delivered now, in order (often just it)."""
        state = self._topics.get(topic)
        if state is None:
            return [item]
        nxt = state.next
        if offset < nxt:
            return []
        if offset > nxt:
            if offset not in state.held:
                state.held[offset] = item
                if state.since is None:
                    state.since = now
            return []
        out = [item]
        nxt += 1
        held = state.held
        while held:
            ready = held.pop(nxt, None)
            if ready is None:
                break
            out.append(ready)
            nxt += 1
        state.next = nxt
        if not held:
            state.since = None
        elif state.since is not None:
            # Still a gap further on: it counts from now.
            state.since = now
        return out

    def gaps(self, now: float, wait: float) -> list[Gap]:
        """Gaps that waited ``wait`` seconds or more, or whose topic holds too much."""
        out = []
        for topic, state in self._topics.items():
            since = state.since
            if since is None:
                continue
            if now - since >= wait or len(state.held) > self._max_held:
                out.append(Gap(topic, state.next - 1, min(state.held) - 1))
        return out

    def skip_to(self, topic: str, offset: int) -> list[T]:
        """Give up on what is missing before ``offset`` (it is not in the log any more:
        retention trimmed it), and deliver what is held from there on."""
        state = self._topics.get(topic)
        if state is None or offset <= state.next:
            return []
        state.next = offset
        for old in [o for o in state.held if o < offset]:
            del state.held[old]
        first = state.held.pop(offset, None)
        if first is None:
            state.since = None if not state.held else state.since
            return []
        return self.offer(topic, offset, first, state.since or 0.0)
