"""The fan-out broker: the one way an event reaches subscribers.

Every event goes through a ``Broker``: committed events from the group commit (in commit
order, so each topic's offsets arrive in order) and non-durable events from the publish
paths. The ``LocalBroker`` hands both to this process's hub. A broker between several
processes or machines (``services.cluster.ClusterBroker``, over NATS) sits at the same
seam: it forwards what this process commits to the others and feeds the hub what they
commit, still in offset order per topic.

Before a subscriber is told where a topic stands, the realtime edge asks the broker to
``follow`` the topic: from then on every event of the topic after the offset it answers
reaches this process's hub. For one process that is just the topic's head; between
processes it also means subscribing to the topic on the bus first.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol

from etherd.core.events import StoredEvent
from etherd.core.hub import Hub, Prepared
from etherd.core.wire import event_json
from etherd.services.eventlog import EventLog

__all__ = ["Broker", "BusStatus", "LocalBroker"]


class BusStatus(NamedTuple):
    """How a node stands on the bus (``/readyz`` and metrics)."""

    node: str
    connected: bool
    # Why the bus is not connected ("" when it is).
    reason: str
    # Other nodes heard from lately.
    peers: int


class Broker(Protocol):
    """Where events go once they may be seen (see the module docstring)."""

    def committed(self, events: Sequence[StoredEvent]) -> None:
        """Fan out one write's events, just committed, in offset order per topic."""
        ...

    def transient(self, topic: str, event: str, data: bytes, ts_ms: int) -> None:
        """Fan out a non-durable event (no offset): at most once, in publish order."""
        ...

    async def follow(self, topic: str) -> int:
        """Make sure a concrete topic's events reach the hub; the offset after which all do."""
        ...

    async def follow_pattern(self, pattern: str) -> None:
        """Make sure the events of every topic a pattern matches reach the hub."""
        ...

    async def presence(self, topic: str) -> dict[str, int]:
        """Subscribers of ``topic`` per node (this node's included)."""
        ...

    def status(self) -> BusStatus | None:
        """The node on the bus; None for a single process with no bus."""
        ...

    def subjects(self, topic: str) -> list[str]:
        """The subjects this node follows that carry ``topic`` (none without a bus)."""
        ...

    async def start(self) -> None:
        """Begin (connect to the bus, if any)."""
        ...

    async def stop(self) -> None:
        """End (leave the bus, if any)."""
        ...


class LocalBroker:
    """A broker for one process: everything goes straight to the local hub."""

    def __init__(self, hub: Hub, eventlog: EventLog, node: str) -> None:
        self.hub = hub
        self.eventlog = eventlog
        self.node = node

    def committed(self, events: Sequence[StoredEvent]) -> None:
        """Fan out committed events to this process's subscribers."""
        self.hub.publish_stored(events)

    def transient(self, topic: str, event: str, data: bytes, ts_ms: int) -> None:
        """Fan out a non-durable event to this process's subscribers."""
        self.hub.publish(Prepared(topic, event, None, event_json(topic, event, None, ts_ms, data)))

    async def follow(self, topic: str) -> int:
        """Every commit of this process reaches its hub: the topic's head."""
        return await self.eventlog.head(topic)

    async def follow_pattern(self, pattern: str) -> None:
        """Nothing to do: every commit of this process reaches its hub."""

    async def presence(self, topic: str) -> dict[str, int]:
        """This process's subscribers of ``topic``."""
        return {self.node: self.hub.subscriber_count(topic)}

    def status(self) -> BusStatus | None:
        """No bus."""
        return None

    def subjects(self, topic: str) -> list[str]:
        """No bus, no subjects."""
        return []

    async def start(self) -> None:
        """Nothing to start."""

    async def stop(self) -> None:
        """Nothing to stop."""
