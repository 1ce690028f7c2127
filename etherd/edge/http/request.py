"""One parsed HTTP request, as handlers see it."""

from __future__ import annotations

import time
from urllib.parse import parse_qs

from etherd.services.turns import Turn

__all__ = ["Request"]


class Request:
    """One parsed request: method, path, query, headers (lower-case names), body."""

    __slots__ = (
        "body",
        "headers",
        "keep_alive",
        "method",
        "path",
        "peer",
        "query",
        "received",
        "turn",
        "upgrade",
    )

    def __init__(
        self,
        method: str,
        path: str,
        query: str,
        headers: dict[str, str],
        body: bytes,
        keep_alive: bool,
        upgrade: bool,
        peer: str,
    ) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive
        self.upgrade = upgrade
        self.peer = peer
        # When parsing completed (time.perf_counter()), for the latency metrics.
        self.received = time.perf_counter()
        # The request's place in its connection's commit order (set when it is dispatched).
        self.turn: Turn | None = None

    def param(self, name: str) -> str | None:
        """The first value of a query parameter, or None."""
        if not self.query:
            return None
        values = parse_qs(self.query, keep_blank_values=True).get(name)
        return values[0] if values else None
