"""What a realtime connection (WebSocket session or SSE stream) needs from the server.

``Realtime`` is the narrow interface the WebSocket session and the SSE routes are built on:
the hub they subscribe to and queue on, topic authorisation (which needs the task's owner
and holder from the log), where a topic stands, the resume read, presence, the publisher
(for the WebSocket ``publish`` action), token verification (``refresh``), the registry they
are tracked in and the configuration in force. The session knows nothing else of the server.
"""

from __future__ import annotations

from etherd.core.auth import Authenticator, Principal, may_subscribe
from etherd.core.config import Config
from etherd.core.hub import Hub
from etherd.services.broker import Broker
from etherd.services.eventlog import EventLog, Resumed
from etherd.services.publisher import Publisher
from etherd.services.state import Connections, ServerState

__all__ = ["Realtime"]


class Realtime:
    """Subscriptions, positions and resumes for realtime connections."""

    def __init__(
        self,
        hub: Hub,
        eventlog: EventLog,
        broker: Broker,
        publisher: Publisher,
        auth: Authenticator,
        state: ServerState,
    ) -> None:
        self.hub = hub
        self.eventlog = eventlog
        self.broker = broker
        self.publisher = publisher
        self.auth = auth
        self.state = state

    @property
    def config(self) -> Config:
        """The configuration in force (re-read at use: reloads apply)."""
        return self.state.config

    @property
    def connections(self) -> Connections:
        """The registry sessions and streams are tracked in."""
        return self.state.connections

    @property
    def epoch(self) -> str:
        """The log's epoch."""
        return self.eventlog.epoch

    async def authorize(self, principal: Principal, topic: str) -> str | None:
        """None if ``principal`` may subscribe to ``topic`` (validated), else why not."""
        facts = await self.eventlog.task_facts(topic)
        return may_subscribe(principal, topic, facts)

    async def follow(self, topic: str) -> int:
        """Make sure the topic's events reach this process (over the bus, in a cluster);
        the offset after which all of them will: where a new subscriber stands."""
        return await self.broker.follow(topic)

    async def follow_pattern(self, pattern: str) -> None:
        """Make sure the events of every topic ``pattern`` matches reach this process."""
        await self.broker.follow_pattern(pattern)

    async def resume(self, topic: str, after: int, epoch: str | None) -> Resumed:
        """What a client that has ``after`` of ``topic`` missed, within the replay cap."""
        return await self.eventlog.resume(
            topic, after, epoch, self.state.config.realtime.replay_max_events
        )

    def subjects(self, topic: str) -> list[str]:
        """The bus subjects that carry ``topic``'s events to this node (none without a bus)."""
        return self.broker.subjects(topic)

    async def presence(self, topic: str) -> dict[str, int]:
        """Subscribers an event published to ``topic`` would reach, per node."""
        return await self.broker.presence(topic)
