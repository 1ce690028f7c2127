"""A Server-Sent Events stream: the HTTP connection handed over to one topic's events.

Once an SSE route has authorised a request, the HTTP connection gives its transport to an
``SseStream``, which becomes the transport's protocol (the HTTP parser and its buffers are
freed), writes the response head, subscribes to the topic and, when the client resumes
(``Last-Event-ID`` or ``?since=``), replays what it missed before going live, with no gap
and no duplicate (the hub holds live events meanwhile). An unrecoverable position is told
with a named ``reset`` event, after which the stream goes live from the head.

The stream is a hub sink: each event is one HTTP chunk (``core.frames.sse_event``), and a
stream whose unsent bytes pass ``http.max_pending_bytes`` is dropped as a slow consumer.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Final

from etherd.core.auth import Principal
from etherd.core.frames import sse_chunk
from etherd.core.hub import KIND_SSE, Pending, Resuming
from etherd.core.topics import is_pattern
from etherd.core.wire import ENCODER
from etherd.edge.http.response import Headers, http_date
from etherd.services.realtime import Realtime, taken, wake

__all__ = ["HEARTBEAT", "SseStream"]

log = logging.getLogger("etherd.sse")

HEARTBEAT: Final = sse_chunk(b": heartbeat\n\n")
_LAST_CHUNK: Final = b"0\r\n\r\n"


class SseStream(asyncio.Protocol):
    """One SSE response: a hub sink subscribed to one topic (see the module docstring)."""

    kind = KIND_SSE

    def __init__(
        self, realtime: Realtime, principal: Principal, topic: str, since: int | None
    ) -> None:
        self.realtime = realtime
        self.principal = principal
        self.topic = topic
        self.since = since
        self.transport: asyncio.Transport | None = None
        # Hub sink state.
        self.pending: list[Pending] = []
        self.resuming: dict[str, Resuming] | None = None
        self.alive = False
        # Event-stream chunks differ from the WebSocket bytes a segment hands out directly.
        self.direct = False
        self.send = self.write
        self.max_pending = realtime.config.http.max_pending_bytes
        # Above the transport's high-water mark (``pause_writing``), and a replay waiting
        # for it to drain.
        self.paused = False
        self.waiter: asyncio.Future[None] | None = None
        # The stream's last bytes are queued: it closes once they are written.
        self._ending = False

    def __hash__(self) -> int:
        return id(self)

    @property
    def expires_at(self) -> float | None:
        """When the stream's token expires (unix seconds), if it does."""
        return self.principal.exp

    # -- start -----------------------------------------------------------------------------

    def start(self, transport: asyncio.Transport, headers: Headers) -> None:
        """Take the connection over: write the head, subscribe, replay when resuming."""
        self.transport = transport
        self.alive = True
        transport.set_protocol(self)
        extra = b"".join(name + b": " + value + b"\r\n" for name, value in headers)
        transport.write(
            b"HTTP/1.1 200 OK\r\nDate: " + http_date() + b"\r\nServer: etherd\r\n"
            b"Content-Type: text/event-stream; charset=utf-8\r\nCache-Control: no-cache\r\n"
            b"X-Accel-Buffering: no\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n"
            + extra
            + b"\r\n"
        )
        hub = self.realtime.hub
        topic = self.topic
        self.realtime.connections.streams.add(self)
        if self.since is not None:
            hub.hold(self, topic, self.since)
        hub.subscribe(topic, self)
        hub.queue(self, sse_chunk(b": etherd stream " + topic.encode() + b"\n\n"))
        asyncio.get_running_loop().create_task(self._follow(self.since))

    async def _follow(self, since: int | None) -> None:
        """Follow the topic (over the bus, in a cluster); then replay when resuming."""
        if is_pattern(self.topic):
            await self.realtime.follow_pattern(self.topic)
            return
        await self.realtime.follow(self.topic)
        if since is not None and self.alive:
            await self._replay(since)

    async def _replay(self, since: int) -> None:
        hub = self.realtime.hub
        resumed = await self.realtime.resume(self.topic, since, None)
        if not self.alive:
            return
        if not resumed.recovered:
            # The client must reload state: say so with a named event, then go live.
            body = ENCODER.encode(
                {"topic": self.topic, "offset": resumed.offset, "epoch": self.realtime.epoch}
            )
            hub.queue(self, sse_chunk(b"event: reset\ndata: " + body + b"\n\n"))
            hub.release(self, self.topic, resumed.offset)
            return
        await self.realtime.replay(self, self.topic, since, resumed.offset, resumed.events)

    # -- replay in pieces ------------------------------------------------------------------

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        wake(self)

    def writing(self) -> bool:
        """Whether stream bytes wait for the client (and the stream is still open)."""
        return self.alive and (bool(self.pending) or self.paused)

    async def taken(self) -> bool:
        """Wait until the client has taken what is queued (see ``services.realtime.taken``)."""
        return await taken(self)

    def is_open(self) -> bool:
        """Whether the stream still serves its client."""
        return self.alive

    def replay_failed(self) -> None:
        """The replay cannot be finished: end the stream; the client reconnects with
        ``Last-Event-ID`` and resumes."""
        self.end()
        wake(self)

    # -- protocol --------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        # The client has nothing to say on an event stream; what it sends is dropped.
        return

    def connection_lost(self, exc: Exception | None) -> None:
        self.alive = False
        hub = self.realtime.hub
        hub.unsubscribe(self.topic, self)
        hub.forget(self, self.topic)
        self.pending.clear()
        wake(self)
        self.realtime.connections.streams.discard(self)

    # -- sink ------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Write stream bytes; drop the stream when its unsent bytes pass the cap."""
        transport = self.transport
        if transport is None or not self.alive:
            return
        transport.write(data)
        if self._ending:
            self.alive = False
            transport.close()
            wake(self)
        elif transport.get_write_buffer_size() > self.max_pending:
            self.slow_consumer()
        elif not self.paused and self.waiter is not None:
            wake(self)

    def slow_consumer(self) -> None:
        """Drop a stream whose unsent bytes passed the cap; the client resumes."""
        if not self.alive or self.transport is None:
            return
        connections = self.realtime.connections
        connections.slow_consumer_closes["sse"] += 1
        connections.limit_hits["http.max_pending_bytes"] += 1
        self.alive = False
        self.transport.abort()
        wake(self)

    def heartbeat(self) -> None:
        """A comment line, so proxies keep a quiet stream open."""
        if self.alive:
            self.realtime.hub.queue(self, HEARTBEAT)

    def expire(self) -> None:
        """The token expired: a last ``expired`` event, then the stream ends (the client
        reconnects with a new token and ``Last-Event-ID``)."""
        if not self.alive or self._ending:
            return
        self._ending = True
        hub = self.realtime.hub
        # Nothing is queued after the end: the stream leaves the topic now.
        hub.unsubscribe(self.topic, self)
        hub.forget(self, self.topic)
        body = ENCODER.encode({"topic": self.topic, "exp": self.principal.exp})
        hub.queue(self, sse_chunk(b"event: expired\ndata: " + body + b"\n\n") + _LAST_CHUNK)

    def end(self) -> None:
        """Finish the response with the last chunk and close."""
        transport = self.transport
        if transport is not None and self.alive:
            self.alive = False
            transport.write(_LAST_CHUNK)
            transport.close()
