"""Keeping connections honest: pings for silent WebSocket sessions, token expiry for every
session, and comment heartbeats on Server-Sent Events streams.

One sweep for all sessions instead of a timer per connection (a task each would cost about
1 KB and a wakeup per connection). Every ``min(ping_interval_s, ping_timeout_s)`` seconds,
each session is checked in this order: its token expired (close 4001); a ping is out and
unanswered for ``ws.ping_timeout_s`` (close 4000); it sent nothing since the last sweep
(ping it). Anything the client sends counts as a sign of life, so a busy client is never
pinged. SSE streams get a comment line every ``realtime.sse_heartbeat_s`` seconds, which
keeps proxies from timing out a quiet stream; a stream whose token expired gets a last
``event: expired`` instead and ends, as a WebSocket is closed with 4001.
"""

from __future__ import annotations

import asyncio
import time

from etherd.core.errors import PING_TIMEOUT, TOKEN_EXPIRED
from etherd.services.state import ServerState

__all__ = ["Keepalive"]


class Keepalive:
    """The keepalive policy over the sessions and streams of ``state.connections``."""

    def __init__(self, state: ServerState) -> None:
        self.state = state

    def sweep(self, now: float, wall: float) -> None:
        """One pass over the WebSocket sessions (monotonic ``now``, unix ``wall``)."""
        timeout = self.state.config.ws.ping_timeout_s
        for session in list(self.state.connections.sessions):
            exp = session.expires_at
            if exp is not None and wall >= exp:
                session.close(TOKEN_EXPIRED)
                continue
            pinged = session.pinged_at
            if pinged is not None:
                if now - pinged >= timeout:
                    session.close(PING_TIMEOUT)
                session.took_input()
            elif not session.took_input():
                session.ping(now)

    def heartbeat(self, wall: float) -> None:
        """A comment line on every SSE stream; streams whose token expired end."""
        for stream in list(self.state.connections.streams):
            exp = stream.expires_at
            if exp is not None and wall >= exp:
                stream.expire()
            else:
                stream.heartbeat()

    async def run_sessions(self) -> None:
        """Sweep the sessions forever (interval re-read from the configuration each time)."""
        while True:
            cfg = self.state.config.ws
            await asyncio.sleep(min(cfg.ping_interval_s, cfg.ping_timeout_s))
            self.sweep(time.monotonic(), time.time())

    async def run_streams(self) -> None:
        """Heartbeat the SSE streams forever."""
        while True:
            await asyncio.sleep(self.state.config.realtime.sse_heartbeat_s)
            self.heartbeat(time.time())
