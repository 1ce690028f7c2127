"""What a realtime connection (WebSocket session or SSE stream) needs from the server.

``Realtime`` is the narrow interface the WebSocket session and the SSE routes are built on:
the hub they subscribe to and queue on, topic authorisation (which needs the task's owner
and holder from the log), where a topic stands, the resume read, presence, the publisher
(for the WebSocket ``publish`` action), token verification (``refresh``), the registry they
are tracked in and the configuration in force. The session knows nothing else of the server.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from etherd.core.auth import Authenticator, Principal, may_subscribe
from etherd.core.config import Config
from etherd.core.errors import Refusal
from etherd.core.events import StoredEvent
from etherd.core.hub import Hub, Sink
from etherd.services.broker import Broker
from etherd.services.eventlog import EventLog, Resumed
from etherd.services.publisher import Publisher
from etherd.services.state import Connections, ServerState

__all__ = ["Realtime", "Replaying", "Taking", "taken", "wake"]


class Taking(Protocol):
    """What ``taken`` and ``wake`` need of a sink: the future a waiting replay parks on
    (None unless one waits, so an idle connection pays one empty slot for it)."""

    waiter: asyncio.Future[None] | None

    def writing(self) -> bool:
        """Whether bytes wait for the client: queued, or above the high-water mark (and
        the sink is still open)."""
        ...

    def is_open(self) -> bool:
        """Whether the sink still serves its client."""
        ...


def wake(sink: Taking) -> None:
    """Let a replay waiting in ``taken`` look again (a write below the high-water mark,
    ``resume_writing``, close)."""
    waiter = sink.waiter
    if waiter is not None:
        sink.waiter = None
        if not waiter.done():
            waiter.set_result(None)


async def taken(sink: Taking) -> bool:
    """Wait until what is queued for the client is written and the transport is below its
    high-water mark; False if the sink closed meanwhile."""
    while sink.writing():
        waiter = asyncio.get_running_loop().create_future()
        sink.waiter = waiter
        await waiter
    return sink.is_open()


class Replaying(Sink, Protocol):
    """A sink a replay can be written to in pieces."""

    async def taken(self) -> bool:
        """Wait until what is queued for the client has been written and its transport is
        below the high-water mark; False if the sink closed meanwhile."""
        ...

    def replay_failed(self) -> None:
        """The replay cannot be finished: close, so the client resumes elsewhere or later."""
        ...


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
        """Whether a client that has ``after`` of ``topic`` can resume (within the replay
        cap), and the first piece of what it missed."""
        cfg = self.state.config.realtime
        return await self.eventlog.resume(
            topic, after, epoch, cfg.replay_max_events, cfg.replay_page_bytes
        )

    def replay_refused(self, kind: str) -> Refusal | None:
        """Why a resume may not start now (the server-wide replay budget is spent), else
        None; a refusal is counted."""
        limit = self.state.config.realtime.max_replay_bytes
        connections = self.state.connections
        if connections.replay_bytes < limit:
            return None
        connections.replays_refused[kind] += 1
        connections.limit_hits["realtime.max_replay_bytes"] += 1
        # Counted here for both kinds: no ``limit`` on the refusal, or the HTTP dispatcher
        # would count an SSE refusal a second time.
        return Refusal(
            "overloaded",
            f"{limit} bytes of replays are already in flight (realtime.max_replay_bytes); "
            f"retry shortly",
        )

    async def replay(
        self, sink: Replaying, topic: str, after: int, head: int, first: list[StoredEvent]
    ) -> None:
        """Write a recovered topic's missed events (``after`` up to ``head``) to ``sink``,
        piece by piece, each once the client has taken the one before, then let the live
        events held meanwhile through (``Hub.release``).

        So a replay costs at most about ``realtime.replay_page_bytes`` plus the transport's
        high-water mark per client, however large the backlog, and a client that reads as
        fast as it is written gets all of it. Bytes read and not yet taken count toward
        ``realtime.max_replay_bytes``.
        """
        hub = self.hub
        connections = self.state.connections
        cfg = self.state.config.realtime
        events = first
        last = after
        while True:
            size = sum(len(ev.data) for ev in events)
            connections.replay_bytes += size
            try:
                last = hub.replay_page(sink, last, events)
                taken = await sink.taken()
            finally:
                connections.replay_bytes -= size
            if not taken:
                return
            if last >= head:
                break
            try:
                page = await self.eventlog.read(
                    topic, last, cfg.replay_max_events, cfg.replay_page_bytes
                )
            except Refusal:
                page = None
            if page is None or not page.events or page.events[0].offset != last + 1:
                # The store failed, or retention took what was still to come: the client
                # reconnects and resumes (and learns then if it must reload).
                sink.replay_failed()
                return
            events = page.events
        hub.release(sink, topic, last)

    def subjects(self, topic: str) -> list[str]:
        """The bus subjects that carry ``topic``'s events to this node (none without a bus)."""
        return self.broker.subjects(topic)

    async def presence(self, topic: str) -> dict[str, int]:
        """Subscribers an event published to ``topic`` would reach, per node."""
        return await self.broker.presence(topic)
