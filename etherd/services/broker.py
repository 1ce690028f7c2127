"""The fan-out broker: the one way an event reaches subscribers.

Every event goes through a ``Broker``: committed events from the group commit (in commit
order, so each topic's offsets arrive in order) and non-durable events from the publish
paths. The ``LocalBroker`` hands both to this process's hub. A broker between several
processes or machines (NATS) sits at the same seam: it forwards what this process commits
to the others and feeds the hub what they commit, still in offset order per topic.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from etherd.core.events import StoredEvent
from etherd.core.hub import Hub, Prepared
from etherd.core.wire import event_json

__all__ = ["Broker", "LocalBroker"]


class Broker(Protocol):
    """Where events go once they may be seen (see the module docstring)."""

    def committed(self, events: Sequence[StoredEvent]) -> None:
        """Fan out one write's events, just committed, in offset order per topic."""
        ...

    def transient(self, topic: str, event: str, data: bytes, ts_ms: int) -> None:
        """Fan out a non-durable event (no offset): at most once, in publish order."""
        ...


class LocalBroker:
    """A broker for one process: everything goes straight to the local hub."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    def committed(self, events: Sequence[StoredEvent]) -> None:
        """Fan out committed events to this process's subscribers."""
        self.hub.publish_stored(events)

    def transient(self, topic: str, event: str, data: bytes, ts_ms: int) -> None:
        """Fan out a non-durable event to this process's subscribers."""
        self.hub.publish(Prepared(topic, event, None, event_json(topic, event, None, ts_ms, data)))
