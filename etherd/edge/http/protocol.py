"""HTTP/1.1 on httptools: keep-alive, ordered pipelining, limits, timeouts, and the hand-off
of a connection to a stream (Server-Sent Events) or to WebSocket framing.

One ``HttpConnection`` per TCP connection. Requests are parsed as bytes arrive. Up to
``http.max_pipelined`` requests of a connection are handled at once, so the events of a
pipelining client share one group commit, and they are answered strictly in request order
(RFC 9112 section 9.3.2). Their writes enter the commit in request order too (each request
gets a ``Turn``, see ``services.turns``). A request to a route that may take the
connection over (an SSE stream, a WebSocket upgrade) is a barrier: it is handled only once
everything before it is answered, and nothing after it is started until it has answered.
Reading pauses while ``http.max_pipelined`` requests are waiting or being handled. Every
refusal is a JSON error body (contract section 8); a parse error also closes the
connection, since the byte stream can no longer be trusted.

Limits: ``http.max_header_bytes`` (request line and headers, 431), ``http.max_headers``
(431), ``http.max_body_bytes`` (413, checked against Content-Length before the body is
read, and while a chunked body arrives), ``http.request_timeout_s`` (a request must arrive
whole in time, else 408), ``http.keepalive_timeout_s`` (idle connections close),
``http.max_pipelined`` and ``http.max_inflight`` (server-wide, 503 past it),
``http.write_high_water_bytes`` (the transport's high-water mark).

The connection knows nothing of routes or services: it gets a ``dispatch`` callable that
turns a request into a result, the route table's ``methods`` for CORS preflights and
``streams`` for barriers, an ``on_response`` hook (metrics, access log), an
``after_start`` hook called once requests were started (the hub's ``flush_soon``) and the
shared ``ServerState``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import cast

import httptools

from etherd.core.errors import Refusal
from etherd.edge.http.cors import Cors, is_preflight, policy
from etherd.edge.http.request import Request
from etherd.edge.http.response import (
    STATUS,
    Response,
    Result,
    Stream,
    Upgrade,
    error_response,
    render,
)
from etherd.services.state import HttpConnection as Registered
from etherd.services.state import ServerState
from etherd.services.turns import Turn

__all__ = ["Dispatch", "HttpConnection"]

log = logging.getLogger("etherd.http")

Dispatch = Callable[[Request], Awaitable[Result]]
OnResponse = Callable[[Request | None, int], None]


class _Incoming:
    """A request being parsed."""

    __slots__ = ("body", "framing", "head_bytes", "header_count", "headers", "url")

    def __init__(self) -> None:
        self.head_bytes = 0
        # Bytes of chunked framing received since the last body byte (see data_received).
        self.framing = 0
        self.url = b""
        self.headers: dict[str, str] = {}
        self.header_count = 0
        self.body = bytearray()


class _Handling:
    """A started request; ``result`` is set when its handler returns."""

    __slots__ = ("request", "result", "size", "task")

    def __init__(self, request: Request, size: int) -> None:
        self.request = request
        # The request's bytes, counted against the connection's cap until it is answered.
        self.size = size
        self.result: Result | None = None
        self.task: asyncio.Task[None] | None = None


class HttpConnection(asyncio.Protocol):
    """One client connection: parse, queue, answer in order; maybe stream or upgrade."""

    def __init__(
        self,
        state: ServerState,
        dispatch: Dispatch,
        methods: Callable[[str], list[str]],
        streams: Callable[[str, str], bool],
        on_response: OnResponse,
        loop: asyncio.AbstractEventLoop,
        after_start: Callable[[], None] = lambda: None,
    ) -> None:
        self.state = state
        self._dispatch = dispatch
        self._methods = methods
        self._streams = streams
        self._after_start = after_start
        self._on_response = on_response
        # Kept, not asked for per request: on 3.11 get_running_loop() is a getpid() call.
        self._loop = loop
        cfg = state.config.http
        self._max_head = cfg.max_header_bytes
        self._max_headers = cfg.max_headers
        self._max_body = cfg.max_body_bytes
        self._max_pipelined = cfg.max_pipelined
        self._max_held = cfg.max_pending_bytes
        self._max_chunk_ext = cfg.max_chunk_extension_bytes
        self._cors: Cors | None = policy(tuple(cfg.cors_origins)) if cfg.cors_origins else None
        self._parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.peer = "-"
        self._incoming: _Incoming | None = None
        self._in_head = True
        self._head_bytes = 0
        self._completed = 0
        # Parsed and not yet started (with its size); started and not yet answered.
        self._queue: deque[tuple[Request, int]] = deque()
        self._running: deque[_Handling] = deque()
        # A request that may take the connection over is running: start nothing after it.
        self._barrier = False
        self._last_turn: Turn | None = None
        self._reading_paused = False
        # Bytes this connection holds: requests parsed and not answered, answers not yet
        # handed to the transport. Past ``http.max_pending_bytes`` reading pauses.
        self._held = 0
        # The transport is above its high-water mark: the client does not read its answers,
        # so nothing new is started and nothing more is read until it drains.
        self._write_paused = False
        self._closing = False
        # One timer per connection, moved lazily: ``_deadline`` is when ``_on_deadline``
        # is due; the handle may be set earlier and then re-aims itself when it fires.
        self._timer: asyncio.TimerHandle | None = None
        self._deadline: float | None = None
        self._on_deadline: Callable[[], None] | None = None
        self._upgrade_tail: bytearray | None = None
        # Answers rendered and not yet written: pipelined answers leave in one write.
        self._out: list[bytes] = []
        self._flush_scheduled = False

    def __hash__(self) -> int:
        return id(self)

    # -- connection ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        transport = self.transport
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "-")
        cfg = self.state.config.http
        http = self.state.connections.http
        if len(http) >= cfg.max_connections and not _evict_idle(http):
            self._closing = True
            self.state.connections.limit_hits["http.max_connections"] += 1
            refusal = Refusal(
                "overloaded",
                f"{cfg.max_connections} HTTP connections are open (http.max_connections); "
                f"retry shortly",
                limit="http.max_connections",
            )
            transport.write(render(error_response(refusal), keep_alive=False))
            transport.close()
            return
        http.add(self)
        transport.set_write_buffer_limits(high=cfg.write_high_water_bytes)
        # Until the first request begins: a connection that says nothing is closed sooner
        # than an idle keep-alive one.
        self._arm(cfg.first_byte_timeout_s, self._idle_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._out.clear()
        self._release()

    def pause_writing(self) -> None:
        self._write_paused = True
        self._pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if not self._closing:
            self._pump()

    def _pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        if self._upgrade_tail is not None:
            # Reading was paused at the upgrade request: these are bytes already read.
            self._upgrade_tail += data
            return
        if self._closing:
            return
        completed = self._completed
        inc = self._incoming
        in_body = inc is not None and not self._in_head
        body_before = len(inc.body) if inc is not None else 0
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            offset = exc.args[0] if exc.args else len(data)
            self._upgrade_tail = bytearray(data[offset:])
            # Nothing past the upgrade request is read until its handler has answered: a
            # WebSocket takes the bytes over, any other answer closes the connection.
            self._pause_reading()
            self._pump()
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, Refusal):
                self._fail(cause)
            else:
                log.exception("HTTP callback failed", exc_info=cause)
                self._fail(Refusal("internal", "the server failed to read the request"))
        except httptools.HttpParserError as exc:
            self._fail(Refusal("bad_request", f"malformed HTTP request: {exc}"))
        else:
            # httptools buffers a header line until it is whole, so a head that never ends
            # is caught here, by the bytes received since the last complete request.
            if self._in_head and completed == self._completed:
                self._head_bytes += len(data)
                if self._head_bytes > self._max_head:
                    self._refuse_head()
                    return
            elif in_body and completed == self._completed and inc is self._incoming:
                # A chunk's size line and extensions reach no callback: bytes that brought
                # no body byte are framing, and one chunk header may hold only so many.
                assert inc is not None
                if len(inc.body) != body_before:
                    inc.framing = 0
                else:
                    inc.framing += len(data)
                    if inc.framing > self._max_chunk_ext:
                        self._fail(
                            Refusal(
                                "bad_request",
                                f"a chunk header exceeds {self._max_chunk_ext} bytes "
                                f"(http.max_chunk_extension_bytes)",
                                limit="http.max_chunk_extension_bytes",
                            )
                        )
                        return
            # Requests are started once the parser is done with these bytes, never from
            # inside its callbacks.
            if completed != self._completed:
                self._pump()

    def _refuse_head(self) -> None:
        self._fail(
            Refusal(
                "headers_too_large",
                f"request line and headers exceed {self._max_head} bytes (http.max_header_bytes)",
                limit="http.max_header_bytes",
            )
        )

    # -- httptools callbacks ---------------------------------------------------------------

    def on_chunk_header(self) -> None:
        if self._incoming is not None:
            self._incoming.framing = 0

    def on_message_begin(self) -> None:
        self._incoming = _Incoming()
        self._arm(self.state.config.http.request_timeout_s, self._request_timeout)

    def on_url(self, url: bytes) -> None:
        assert self._incoming is not None
        self._incoming.url += url
        self._count_head(len(url))

    def _count_head(self, n: int) -> None:
        inc = self._incoming
        assert inc is not None
        inc.head_bytes += n
        if inc.head_bytes > self._max_head:
            raise Refusal(
                "headers_too_large",
                f"request line and headers exceed {self._max_head} bytes (http.max_header_bytes)",
                limit="http.max_header_bytes",
            )

    def on_header(self, name: bytes, value: bytes) -> None:
        inc = self._incoming
        assert inc is not None
        inc.header_count += 1
        if inc.header_count > self._max_headers:
            raise Refusal(
                "headers_too_large",
                f"more than {self._max_headers} header fields (http.max_headers)",
                limit="http.max_headers",
            )
        self._count_head(len(name) + len(value) + 4)
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        prev = inc.headers.get(key)
        inc.headers[key] = text if prev is None else prev + ", " + text

    def on_headers_complete(self) -> None:
        inc = self._incoming
        assert inc is not None
        # From here on the head is complete; body bytes are counted in on_body.
        self._in_head = False
        # What the callbacks did not see: the method, " HTTP/1.x\r\n" and the blank line.
        self._count_head(len(self._parser.get_method()) + 1 + 11 + 2)
        version = self._parser.get_http_version()
        if version != "1.1" and version != "1.0":
            raise Refusal(
                "http_version_not_supported",
                f"HTTP/{version} is not served here; send HTTP/1.1 (or HTTP/1.0)",
            )
        length = inc.headers.get("content-length")
        if length is not None:
            if not (length.isascii() and length.isdigit()):
                raise Refusal("bad_request", f"Content-Length must be digits, got {length!r}")
            if int(length) > self._max_body:
                raise Refusal(
                    "payload_too_large",
                    f"body of {length} bytes exceeds {self._max_body} (http.max_body_bytes)",
                    limit="http.max_body_bytes",
                )
        if inc.headers.get("expect", "").lower() == "100-continue" and self.transport:
            # After the answers before it: those may still be waiting in ``_out``.
            self._flush_out()
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        inc = self._incoming
        assert inc is not None
        inc.body += body
        if len(inc.body) > self._max_body:
            raise Refusal(
                "payload_too_large",
                f"body exceeds {self._max_body} bytes (http.max_body_bytes)",
                limit="http.max_body_bytes",
            )

    def on_message_complete(self) -> None:
        inc = self._incoming
        assert inc is not None
        self._incoming = None
        self._in_head = True
        self._head_bytes = 0
        self._completed += 1
        self._disarm()
        url = inc.url.decode("latin-1")
        path, _, query = url.partition("?")
        parser = self._parser
        request = Request(
            parser.get_method().decode("ascii"),
            path,
            query,
            inc.headers,
            bytes(inc.body),
            parser.should_keep_alive(),
            parser.should_upgrade(),
            self.peer,
        )
        size = inc.head_bytes + len(inc.body)
        self._queue.append((request, size))
        self._held += size
        if (
            len(self._queue) + len(self._running) >= self._max_pipelined
            or self._held > self._max_held
        ):
            self._pause_reading()

    # -- answering -------------------------------------------------------------------------

    def _pump(self) -> None:
        """Start what may start and answer what is done, until neither moves.

        Called when requests were parsed and when a running one finishes.
        """
        while True:
            self._start()
            if not self._answer_done() or self._closing:
                break
        if self._closing:
            return
        if (
            self._reading_paused
            and not self._write_paused
            and self._upgrade_tail is None
            and len(self._queue) + len(self._running) < self._max_pipelined // 2
            and self._held <= self._max_held // 2
        ):
            self._reading_paused = False
            if self.transport:
                self.transport.resume_reading()
        if not self._running and not self._queue and self._incoming is None:
            self._arm(self.state.config.http.keepalive_timeout_s, self._idle_timeout)

    def _start(self) -> None:
        """Start waiting requests, as many as the pipeline and any barrier allow."""
        queue = self._queue
        running = self._running
        started = False
        while queue and not self._barrier and not self._closing and not self._write_paused:
            if len(running) >= self._max_pipelined:
                break
            request, size = queue[0]
            barrier = request.upgrade or self._streams(request.method, request.path)
            if barrier and running:
                break  # it waits until everything before it is answered
            queue.popleft()
            self._barrier = barrier
            turn = Turn(self._last_turn, self._loop)
            self._last_turn = turn
            request.turn = turn
            handling = _Handling(request, size)
            running.append(handling)
            handling.task = self._loop.create_task(self._handle(handling, turn))
            started = True
        if started:
            # The handlers run in the next loop iteration; what they publish should leave in
            # that same iteration, not one later (see ``Hub.flush_soon``).
            self._after_start()

    async def _handle(self, handling: _Handling, turn: Turn) -> None:
        """Run one request's handler, then answer whatever is now due, at once: no done
        callback, so a finished request is answered in the loop iteration it finished in."""
        try:
            handling.result = await self._result(handling.request, turn)
        except Exception:
            log.exception("HTTP handler failed")
            handling.result = error_response(Refusal("internal", "the server failed this request"))
        if not self._closing:
            self._pump()

    async def _result(self, request: Request, turn: Turn) -> Result:
        state = self.state
        if state.inflight >= state.config.http.max_inflight:
            turn.done()
            state.connections.limit_hits["http.max_inflight"] += 1
            return error_response(
                Refusal(
                    "overloaded", "too many requests in flight (http.max_inflight); retry shortly"
                )
            )
        state.inflight += 1
        try:
            if is_preflight(request):
                return (self._cors or policy(())).preflight(request, self._methods)
            return await self._dispatch(request)
        finally:
            state.inflight -= 1
            # Whether or not it wrote anything, the next request may now commit.
            turn.done()

    def _answer_done(self) -> bool:
        """Answer, in request order, every request at the head that is done; whether any was."""
        running = self._running
        answered = False
        while running and running[0].result is not None:
            handling = running.popleft()
            self._held -= handling.size
            answered = True
            assert handling.result is not None
            if not self._answer(handling.request, handling.result):
                self._drop_pending()
                return True
            self._barrier = False
        if answered and self._out:
            if running and not self._flush_scheduled:
                # More answers are coming, likely from the same commit: write them together,
                # one loop iteration from now, instead of one send per answer.
                self._flush_scheduled = True
                self._loop.call_soon(self._flush_out)
            elif not running:
                self._flush_out()
        return answered

    def _flush_out(self) -> None:
        """Write the answers rendered so far, in one write."""
        self._flush_scheduled = False
        out = self._out
        if not out:
            return
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(out[0] if len(out) == 1 else b"".join(out))
        out.clear()

    def _drop_pending(self) -> None:
        """The connection stopped serving requests: nothing after this is answered."""
        self._queue.clear()
        self._running.clear()
        self._held = 0

    def _answer(self, request: Request, result: Result) -> bool:
        """Write one answer; False when the connection stops serving requests."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return False
        if isinstance(result, Upgrade):
            self._flush_out()
            tail = bytes(self._upgrade_tail or b"")
            self._upgrade_tail = None
            self._release()
            self._hand_over(transport)
            result.handoff(transport, request, tail)
            return False
        cors = self._cors.headers_for(request) if self._cors is not None else ()
        if isinstance(result, Stream):
            self._flush_out()
            self._release()
            self._hand_over(transport)
            result.start(transport, cors)
            self._on_response(request, 200)
            return False
        if cors:
            result = Response(
                result.status, result.body, result.content_type, result.headers + cors
            )
        keep_alive = (
            request.keep_alive
            and not request.upgrade
            and not self.state.draining
            and self._upgrade_tail is None
        )
        self._out.append(render(result, keep_alive, head_only=request.method == "HEAD"))
        self._on_response(request, result.status)
        if not keep_alive:
            self._flush_out()
            self._closing = True
            transport.close()
            return False
        return True

    # -- failure and timers ----------------------------------------------------------------

    def _hand_over(self, transport: asyncio.Transport) -> None:
        """The connection goes to another protocol, which reads from now on (a stream drops
        what it reads, a WebSocket frames it)."""
        if self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()

    def _fail(self, exc: Refusal) -> None:
        """Answer a request that could not be parsed, then close: the stream is lost."""
        if exc.limit is not None:
            self.state.connections.limit_hits[exc.limit] += 1
        self._closing = True
        self._disarm()
        self._incoming = None
        self._flush_out()
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(render(error_response(exc), keep_alive=False))
            transport.close()
        self._on_response(None, STATUS[exc.code])

    def _arm(self, delay: float, callback: Callable[[], None]) -> None:
        """Call ``callback`` in ``delay`` s unless re-armed or disarmed before.

        Re-arming is the common case (every request arms the request timeout, every
        answer the keep-alive one), so it only moves ``_deadline``; the loop's timer is
        replaced only when it would fire too late.
        """
        deadline = self._loop.time() + delay
        self._deadline = deadline
        self._on_deadline = callback
        timer = self._timer
        if timer is not None:
            if timer.when() <= deadline:
                return
            timer.cancel()
        self._timer = self._loop.call_at(deadline, self._expire)

    def _disarm(self) -> None:
        self._deadline = None
        self._on_deadline = None

    def _release(self) -> None:
        """The connection is no longer HTTP's (closed, upgraded or streaming): stop the
        timer, whose handle would otherwise keep this object alive until it fires."""
        self._closing = True
        self._disarm()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.state.connections.http.discard(self)

    def _expire(self) -> None:
        self._timer = None
        deadline = self._deadline
        if deadline is None:
            return
        if self._loop.time() < deadline:
            self._timer = self._loop.call_at(deadline, self._expire)
            return
        callback = self._on_deadline
        self._deadline = None
        self._on_deadline = None
        if callback is not None:
            callback()

    def _request_timeout(self) -> None:
        if self._incoming is not None:
            self._fail(
                Refusal(
                    "request_timeout",
                    f"the request did not arrive whole within "
                    f"{self.state.config.http.request_timeout_s:g} s (http.request_timeout_s)",
                    limit="http.request_timeout_s",
                )
            )

    def _idle_timeout(self) -> None:
        if not self.busy and self._incoming is None and self.transport:
            if self._completed == 0:
                # Not one request began: closed by http.first_byte_timeout_s.
                self.state.connections.limit_hits["http.first_byte_timeout_s"] += 1
            self._closing = True
            self.transport.close()

    def close_if_idle(self) -> bool:
        """Close a keep-alive connection that has nothing in progress (for shutdown)."""
        if not self.busy and self._incoming is None and self.transport:
            self._closing = True
            self.transport.close()
            return True
        return False

    @property
    def busy(self) -> bool:
        """Whether a request is being answered or waiting to be."""
        return bool(self._running or self._queue)


def _evict_idle(connections: set[Registered], scan: int = 64) -> bool:
    """Close one idle keep-alive connection to make room for a new one; whether one was.

    Only a few are looked at: at the cap most connections are either idle (then the first
    few do) or all busy (then none will).
    """
    for n, conn in enumerate(connections):
        if n >= scan:
            break
        if conn.close_if_idle():
            connections.discard(conn)
            return True
    return False
