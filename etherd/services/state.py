"""What every part of a running etherd shares: the configuration in force, whether it is
draining, and the registry of open connections. Nothing else is global.

The server builds one ``ServerState`` and hands it to the edges and services that need it.
A reload replaces ``config``; everything that reads a limit at use time reads it from here,
so a new limit applies without a restart. The registry holds connections through the narrow
protocols below, which is all the services (keepalive, drain, metrics) may use of them.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Protocol

from etherd.core.config import Config
from etherd.core.errors import Disconnect

__all__ = ["Connections", "HttpConnection", "ServerState", "Session", "Stream"]


class Session(Protocol):
    """A WebSocket session, as the registry, the keepalive policy and the drain see it."""

    @property
    def subject(self) -> str:
        """The ``sub`` of the session's token."""
        ...

    @property
    def expires_at(self) -> float | None:
        """When the session's token expires (unix seconds), if it does."""
        ...

    @property
    def pinged_at(self) -> float | None:
        """When the unanswered ping was sent (monotonic seconds), if one is out."""
        ...

    def took_input(self) -> bool:
        """Whether any frame arrived since the last call (the call resets it)."""
        ...

    def ping(self, now: float) -> None:
        """Send a ping and remember when (``now``, monotonic seconds)."""
        ...

    def close(self, disconnect: Disconnect) -> None:
        """End the session with a close code and reason."""
        ...

    def __hash__(self) -> int: ...


class Stream(Protocol):
    """A Server-Sent Events stream, as the keepalive policy and the drain see it."""

    @property
    def expires_at(self) -> float | None:
        """When the stream's token expires (unix seconds), if it does."""
        ...

    def heartbeat(self) -> None:
        """Send a comment line so proxies keep the stream open."""
        ...

    def expire(self) -> None:
        """The token expired: say so on the stream and end it."""
        ...

    def end(self) -> None:
        """Finish the response and close the connection."""
        ...

    def __hash__(self) -> int: ...


class HttpConnection(Protocol):
    """A plain HTTP connection, as the drain sees it."""

    @property
    def busy(self) -> bool:
        """Whether a request is being answered or waiting to be."""
        ...

    def close_if_idle(self) -> bool:
        """Close the connection if nothing is in progress; True when it was closed."""
        ...

    def __hash__(self) -> int: ...


class Connections:
    """Open connections by kind, and the counters about them the metrics read."""

    def __init__(self) -> None:
        # Insertion-ordered, so a drain closes the oldest sessions first.
        self.sessions: dict[Session, None] = {}
        # WebSocket sessions per token subject (``ws.max_connections_per_subject``).
        self.subjects: Counter[str] = Counter()
        self.streams: set[Stream] = set()
        self.http: set[HttpConnection] = set()
        self.sessions_accepted = 0
        # Connections closed because their unsent bytes passed the cap, by kind.
        self.slow_consumer_closes: Counter[str] = Counter()
        # Refusals and closes because a configured limit was hit, by its key.
        self.limit_hits: Counter[str] = Counter()
        # Resumes refused because the server-wide replay budget was spent, by kind.
        self.replays_refused: Counter[str] = Counter()
        # Replay bytes read from the store and not yet taken by their clients.
        self.replay_bytes = 0

    def session_opened(self, session: Session) -> None:
        """Track an accepted WebSocket session."""
        self.sessions[session] = None
        self.subjects[session.subject] += 1
        self.sessions_accepted += 1

    def session_closed(self, session: Session) -> None:
        """Forget a session (idempotent)."""
        if session in self.sessions:
            del self.sessions[session]
            subject = session.subject
            self.subjects[subject] -= 1
            if self.subjects[subject] <= 0:
                del self.subjects[subject]


class ServerState:
    """The running configuration, the draining flag and the connection registry."""

    def __init__(self, config: Config, node_id: str = "local") -> None:
        self.config = config
        # This process's name among the nodes of a cluster (``cluster.node_id``).
        self.node_id = node_id
        self.draining = False
        self.connections = Connections()
        # Requests being handled across the server (``http.max_inflight``).
        self.inflight = 0
        self.started_at = time.time()
