"""The running numbers of one etherd process, read when asked.

The hot paths count in plain ``int`` attributes of the hub, the batcher and the connection
registry (no locks, no allocations). ``RuntimeStats`` reads them when asked, so the metrics
exposition (``edge.ops.metrics``), the operator's stats (``GET /api/admin/stats``) and any
other report depend on this one narrow view, never on the objects that keep the counters.
``RateSampler`` turns the counters that only grow into rates over the last few seconds.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Final, NamedTuple

from etherd.core.hub import Hub
from etherd.services.broker import Broker, BusStatus
from etherd.services.cluster import ClusterBroker, ClusterStats
from etherd.services.eventlog import EventLog
from etherd.services.leadership import Leadership
from etherd.services.state import ServerState
from etherd.services.taskservice import TaskService

__all__ = ["Counters", "RateSampler", "Rates", "RuntimeStats"]

SAMPLE_INTERVAL_S: Final = 1.0
RATE_WINDOW_S: Final = 5.0


class RuntimeStats:
    """Counters and gauges of the process, as properties read at use time."""

    def __init__(
        self,
        state: ServerState,
        hub: Hub,
        eventlog: EventLog,
        tasks: TaskService,
        broker: Broker,
        leadership: Leadership,
    ) -> None:
        self._state = state
        self._hub = hub
        self._eventlog = eventlog
        self._batcher = eventlog.batcher
        self._tasks = tasks
        self._broker = broker
        self._leadership = leadership

    # -- process ---------------------------------------------------------------------------

    @property
    def started_at(self) -> float:
        """Unix time the process started serving."""
        return self._state.started_at

    @property
    def draining(self) -> bool:
        """A graceful stop is under way."""
        return self._state.draining

    @property
    def node_id(self) -> str:
        """This process's name among the nodes of a cluster."""
        return self._state.node_id

    # -- connections -----------------------------------------------------------------------

    @property
    def sessions_open(self) -> int:
        """Open WebSocket sessions."""
        return len(self._state.connections.sessions)

    @property
    def sessions_accepted(self) -> int:
        """WebSocket sessions accepted since start."""
        return self._state.connections.sessions_accepted

    @property
    def http_connections(self) -> int:
        """Open HTTP connections (not upgraded, not streaming)."""
        return len(self._state.connections.http)

    @property
    def sse_streams(self) -> int:
        """Open Server-Sent Events streams."""
        return len(self._state.connections.streams)

    @property
    def slow_consumer_closes(self) -> Mapping[str, int]:
        """Connections closed as slow consumers, by kind (``ws``, ``sse``)."""
        return self._state.connections.slow_consumer_closes

    @property
    def limit_hits(self) -> Mapping[str, int]:
        """Refusals and closes because a configured limit was hit, by the limit's key."""
        return self._state.connections.limit_hits

    @property
    def replays_refused(self) -> Mapping[str, int]:
        """Resumes refused because the server-wide replay budget was spent, by kind."""
        return self._state.connections.replays_refused

    @property
    def replay_bytes(self) -> int:
        """Replay bytes read from the store and not yet taken by their clients."""
        return self._state.connections.replay_bytes

    @property
    def inflight(self) -> int:
        """HTTP requests being handled."""
        return self._state.inflight

    # -- fan-out ---------------------------------------------------------------------------

    @property
    def subscriptions(self) -> int:
        """(topic or pattern, subscriber) pairs held."""
        return self._hub.subscription_count

    @property
    def topics(self) -> int:
        """Distinct topics and patterns with a subscriber."""
        return self._hub.topic_count

    def busiest_topics(self, limit: int) -> list[tuple[str, int]]:
        """``(topic or pattern, subscribers)`` of the ``limit`` busiest, most first."""
        return self._hub.topic_subscribers(limit)

    @property
    def published(self) -> int:
        """Events handed to the hub."""
        return self._hub.published

    @property
    def delivered(self) -> int:
        """Event frames queued for subscribers (one per event per subscriber)."""
        return self._hub.frames_queued

    @property
    def writes(self) -> int:
        """Socket writes by the fan-out."""
        return self._hub.writes

    @property
    def bytes_written(self) -> int:
        """Bytes written by the fan-out."""
        return self._hub.bytes_written

    # -- store -----------------------------------------------------------------------------

    @property
    def store_up(self) -> bool:
        """The store answers."""
        return self._batcher.is_up

    @property
    def store_kind(self) -> str:
        """``sqlite`` or ``postgresql``."""
        url = self._state.config.store_url
        return "postgresql" if url.startswith(("postgresql://", "postgres://")) else "sqlite"

    @property
    def epoch(self) -> str:
        """The event log's epoch."""
        return self._eventlog.epoch

    @property
    def commits(self) -> int:
        """Group commits that succeeded."""
        return self._batcher.batches

    @property
    def rows(self) -> int:
        """Events stored by group commits."""
        return self._batcher.rows

    @property
    def store_errors(self) -> int:
        """Group commits that failed."""
        return self._batcher.errors

    @property
    def queue_rows(self) -> int:
        """Events waiting for a commit."""
        return self._batcher.queued_rows

    # -- cluster ---------------------------------------------------------------------------

    @property
    def bus(self) -> BusStatus | None:
        """This node on the bus; None without a cluster."""
        return self._broker.status()

    @property
    def cluster(self) -> ClusterStats | None:
        """The bus counters; None without a cluster."""
        broker = self._broker
        return broker.stats if isinstance(broker, ClusterBroker) else None

    @property
    def leading(self) -> bool:
        """Whether this node runs the cluster-wide duties."""
        return self._leadership.leading

    @property
    def task_counts(self) -> Mapping[str, int] | None:
        """Tasks by status, as last counted (None before the first count)."""
        return self._tasks.counts


class Rates(NamedTuple):
    """Per-second rates over the last few seconds."""

    published_per_s: float
    delivered_per_s: float
    commits_per_s: float
    stored_per_s: float


# published, delivered (frames queued), commits, stored rows: all only ever grow.
Counters = tuple[int, int, int, int]


class RateSampler:
    """Samples growing counters once a second and answers their rates over ~5 s."""

    def __init__(
        self,
        read: Callable[[], Counters],
        clock: Callable[[], float] = time.monotonic,
        window_s: float = RATE_WINDOW_S,
    ) -> None:
        self._read = read
        self._clock = clock
        self._window_s = window_s
        # One sample per interval over the window, plus one older to span it whole.
        self._samples: deque[tuple[float, Counters]] = deque(
            maxlen=int(window_s / SAMPLE_INTERVAL_S) + 2
        )
        self.sample()

    @classmethod
    def of(cls, stats: RuntimeStats) -> RateSampler:
        """A sampler of the process's publish, delivery, commit and row counters."""
        return cls(lambda: (stats.published, stats.delivered, stats.commits, stats.rows))

    def sample(self) -> None:
        """Record the counters now."""
        self._samples.append((self._clock(), self._read()))

    def rates(self) -> Rates:
        """Per-second rates from the oldest sample within the window (or the oldest held,
        when none is that recent) up to the counters now."""
        now = self._clock()
        current = self._read()
        since, then = self._samples[0]
        for at, values in self._samples:
            if now - at <= self._window_s + SAMPLE_INTERVAL_S / 2:
                since, then = at, values
                break
        elapsed = now - since
        if elapsed <= 0:
            return Rates(0.0, 0.0, 0.0, 0.0)
        per_s = [round((c - t) / elapsed, 2) for c, t in zip(current, then, strict=True)]
        return Rates(per_s[0], per_s[1], per_s[2], per_s[3])

    async def run_forever(self) -> None:
        """Sample every second."""
        while True:
            await asyncio.sleep(SAMPLE_INTERVAL_S)
            self.sample()
