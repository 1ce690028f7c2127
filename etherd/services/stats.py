"""The running numbers of one etherd process, read at scrape time.

The hot paths count in plain ``int`` attributes of the hub, the batcher and the connection
registry (no locks, no allocations). ``RuntimeStats`` reads them when asked, so the metrics
exposition (``edge.ops.metrics``) and any other report depend on this one narrow view,
never on the objects that keep the counters.
"""

from __future__ import annotations

from collections.abc import Mapping

from etherd.core.hub import Hub
from etherd.services.state import ServerState
from etherd.services.taskservice import TaskService
from etherd.store import Batcher

__all__ = ["RuntimeStats"]


class RuntimeStats:
    """Counters and gauges of the process, as properties read at use time."""

    def __init__(self, state: ServerState, hub: Hub, batcher: Batcher, tasks: TaskService) -> None:
        self._state = state
        self._hub = hub
        self._batcher = batcher
        self._tasks = tasks

    # -- process ---------------------------------------------------------------------------

    @property
    def started_at(self) -> float:
        """Unix time the process started serving."""
        return self._state.started_at

    @property
    def draining(self) -> bool:
        """A graceful stop is under way."""
        return self._state.draining

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

    @property
    def task_counts(self) -> Mapping[str, int] | None:
        """Tasks by status, as last counted (None before the first count)."""
        return self._tasks.counts
