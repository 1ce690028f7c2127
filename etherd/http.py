"""HTTP/1.1 on httptools: keep-alive, ordered pipelining, limits, timeouts, SSE, and the
hand-off of an authorised WebSocket upgrade to picows.

One ``HttpConnection`` per TCP connection. Requests are parsed as bytes arrive and queued;
one coroutine per busy connection answers them in order (RFC 9112 section 9.3.2), so a
handler may await a commit without reordering responses. Reading pauses when too many
requests are queued. Every refusal is a JSON error body (contract section 8); a parse error
also closes the connection, since the byte stream can no longer be trusted.

Limits: ``http.max_header_bytes`` (request line and headers, 431), ``http.max_headers``
(431), ``http.max_body_bytes`` (413, checked against Content-Length before the body is
read, and while a chunked body arrives), ``http.request_timeout_s`` (a request must arrive
whole in time, else 408), ``http.keepalive_timeout_s`` (idle connections close),
``http.max_pipelined`` and ``http.max_inflight`` (server-wide, 503 past it).

CORS: a request whose ``Origin`` is listed in ``http.cors_origins`` (or any origin, with
"*") gets ``Access-Control-Allow-Origin`` echoing it, on JSON answers and SSE streams alike;
a preflight (``OPTIONS`` with ``Access-Control-Request-Method``) on a known route gets 204
from an allowed origin and 403 from any other. No credentials are ever allowed: etherd
authenticates with bearer tokens, never cookies. Requests without ``Origin`` pay nothing.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from typing import TYPE_CHECKING, Final, cast
from urllib.parse import parse_qs

import httptools

from etherd.errors import ApiError
from etherd.hub import KIND_SSE, Resuming, Segment
from etherd.messages import error_body

if TYPE_CHECKING:
    from etherd.app import App

__all__ = ["Cors", "HttpConnection", "Request", "Response", "Stream", "Upgrade"]

log = logging.getLogger("etherd.http")

JSON: Final = b"application/json"
_REASONS: Final = {
    100: b"Continue",
    101: b"Switching Protocols",
    200: b"OK",
    201: b"Created",
    202: b"Accepted",
    204: b"No Content",
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    409: b"Conflict",
    413: b"Content Too Large",
    415: b"Unsupported Media Type",
    422: b"Unprocessable Content",
    426: b"Upgrade Required",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    503: b"Service Unavailable",
}


class Request:
    """One parsed request."""

    __slots__ = (
        "body",
        "headers",
        "keep_alive",
        "method",
        "path",
        "peer",
        "query",
        "received",
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

    def param(self, name: str) -> str | None:
        """The first value of a query parameter, or None."""
        if not self.query:
            return None
        values = parse_qs(self.query, keep_blank_values=True).get(name)
        return values[0] if values else None


class Response:
    """A complete response with a body."""

    __slots__ = ("body", "content_type", "headers", "status")

    def __init__(
        self,
        status: int,
        body: bytes = b"",
        content_type: bytes = JSON,
        headers: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers


class Stream:
    """A Server-Sent Events response: headers now, then chunks through the hub."""

    __slots__ = ("start",)

    def __init__(self, start: Callable[[HttpConnection], None]) -> None:
        # Called once the response head is written; registers the connection as a sink.
        self.start = start


class Upgrade:
    """An authorised WebSocket upgrade: the connection is handed to picows."""

    __slots__ = ("handoff",)

    def __init__(self, handoff: Callable[[asyncio.Transport, Request, bytes], None]) -> None:
        self.handoff = handoff


Handler = Callable[[Request, dict[str, str]], Awaitable[Response | Stream | Upgrade]]


_date_cache: list[object] = [0, b""]


def http_date() -> bytes:
    """The ``Date`` header value, recomputed at most once a second."""
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[0] = now
        _date_cache[1] = formatdate(now, usegmt=True).encode()
    value = _date_cache[1]
    assert isinstance(value, bytes)
    return value


def render(response: Response, keep_alive: bool, head_only: bool = False) -> bytes:
    """Serialize a response; status lines are looked up, never formatted from scratch."""
    reason = _REASONS.get(response.status, b"Unknown")
    if response.status == 204:
        # RFC 9110 section 8.6: no Content-Length on a 204.
        parts = [b"HTTP/1.1 204 %s\r\nDate: %s\r\nServer: etherd\r\n" % (reason, http_date())]
    else:
        parts = [
            b"HTTP/1.1 %d %s\r\nDate: %s\r\nServer: etherd\r\nContent-Length: %d\r\n"
            % (response.status, reason, http_date(), len(response.body))
        ]
    if response.body or response.status >= 400:
        parts.append(b"Content-Type: " + response.content_type + b"\r\n")
    for name, value in response.headers:
        parts.append(name + b": " + value + b"\r\n")
    parts.append(b"Connection: keep-alive\r\n\r\n" if keep_alive else b"Connection: close\r\n\r\n")
    if not head_only:
        parts.append(response.body)
    return b"".join(parts)


# CORS: request headers a browser may send cross-origin, response headers its scripts may
# read, and how long (seconds) it may cache a preflight answer.
CORS_ALLOW_HEADERS: Final = (
    b"Authorization, Content-Type, Idempotency-Key, X-Ether-Harness-App, Last-Event-ID"
)
CORS_EXPOSE_HEADERS: Final = b"Idempotent-Replayed, WWW-Authenticate"
CORS_MAX_AGE: Final = b"600"
_CORS_METHODS: Final = ("GET", "POST", "PUT", "PATCH", "DELETE")


class Cors:
    """The cross-origin policy of ``http.cors_origins``."""

    __slots__ = ("_any", "_origins")

    def __init__(self, origins: list[str]) -> None:
        self._any = "*" in origins
        self._origins = frozenset(origins)

    def allows(self, origin: str) -> bool:
        """Whether scripts from this origin may read etherd's answers."""
        return self._any or origin in self._origins

    @staticmethod
    def headers(origin: str) -> tuple[tuple[bytes, bytes], ...]:
        """Headers for an answer to an allowed origin (echoed, never "*" with credentials)."""
        return (
            (b"Access-Control-Allow-Origin", origin.encode("latin-1")),
            (b"Access-Control-Expose-Headers", CORS_EXPOSE_HEADERS),
            (b"Vary", b"Origin"),
        )

    def preflight(self, request: Request, app: App) -> Response:
        """Answer ``OPTIONS`` with ``Access-Control-Request-Method`` (the CORS preflight)."""
        origin = request.headers["origin"]
        if not self.allows(origin):
            return error_response(
                ApiError(
                    "forbidden",
                    f"origin {origin[:100]!r} may not call this server from a browser; "
                    f"list it in http.cors_origins",
                )
            )
        methods = []
        for method in _CORS_METHODS:
            try:
                app.router.resolve(method, request.path)
            except ApiError:
                continue
            methods.append(method)
        if not methods:
            return error_response(ApiError("not_found", f"no route for {request.path}"))
        return Response(
            204,
            headers=(
                (b"Access-Control-Allow-Methods", ", ".join(methods).encode()),
                (b"Access-Control-Allow-Headers", CORS_ALLOW_HEADERS),
                (b"Access-Control-Max-Age", CORS_MAX_AGE),
            ),
        )


_NO_CORS: Final = Cors([])


def error_response(exc: ApiError, headers: tuple[tuple[bytes, bytes], ...] = ()) -> Response:
    """The JSON error body for a refusal."""
    return Response(exc.status, error_body(exc.code, exc.message), headers=headers)


@functools.lru_cache(maxsize=8)
def _cors_policy(origins: tuple[str, ...]) -> Cors:
    """One policy object per configuration, shared by its connections."""
    return Cors(list(origins))


class _Incoming:
    """A request being parsed."""

    __slots__ = ("body", "head_bytes", "header_count", "headers", "url")

    def __init__(self) -> None:
        self.head_bytes = 0
        self.url = b""
        self.headers: dict[str, str] = {}
        self.header_count = 0
        self.body = bytearray()


class HttpConnection(asyncio.Protocol):
    """One client connection: parse, queue, answer in order; maybe stream or upgrade."""

    # Sink attributes, used once the connection turns into an SSE stream.
    kind = KIND_SSE

    def __init__(self, app: App) -> None:
        self.app = app
        cfg = app.config.http
        self._max_head = cfg.max_header_bytes
        self._max_headers = cfg.max_headers
        self._max_body = cfg.max_body_bytes
        self._max_pipelined = cfg.max_pipelined
        self._cors = _cors_policy(tuple(cfg.cors_origins)) if cfg.cors_origins else None
        self._parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.peer = "-"
        self._incoming: _Incoming | None = None
        self._in_head = True
        self._head_bytes = 0
        self._completed = 0
        self._queue: deque[Request] = deque()
        self._busy = False
        self._reading_paused = False
        self._closing = False
        self._timer: asyncio.TimerHandle | None = None
        self._upgrade_tail: bytearray | None = None
        # SSE sink state.
        self.streaming = False
        self.alive = False
        self.pending: list[bytes | Segment] = []
        self.resuming: dict[str, Resuming] | None = None
        self.stream_topics: list[str] = []
        self.on_stream_closed: Callable[[], None] | None = None

    def __hash__(self) -> int:
        return id(self)

    # -- connection ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        transport = self.transport
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "-")
        self.app.http_connections.add(self)
        transport.set_write_buffer_limits(high=256 * 1024)
        self._arm(self.app.config.http.keepalive_timeout_s, self._idle_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self.alive = False
        self._disarm()
        self.app.http_connections.discard(self)
        if self.streaming and self.on_stream_closed is not None:
            self.on_stream_closed()
            self.on_stream_closed = None

    def data_received(self, data: bytes) -> None:
        if self._upgrade_tail is not None:
            self._upgrade_tail += data
            return
        if self.streaming or self._closing:
            return
        completed = self._completed
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            offset = exc.args[0] if exc.args else len(data)
            self._upgrade_tail = bytearray(data[offset:])
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, ApiError):
                self._fail(cause)
            else:
                log.exception("HTTP callback failed", exc_info=cause)
                self._fail(ApiError("internal", "the server failed to read the request"))
        except httptools.HttpParserError as exc:
            self._fail(ApiError("bad_request", f"malformed HTTP request: {exc}"))
        else:
            # httptools buffers a header line until it is whole, so a head that never ends
            # is caught here, by the bytes received since the last complete request.
            if self._in_head and completed == self._completed:
                self._head_bytes += len(data)
                if self._head_bytes > self._max_head:
                    self._refuse_head()

    def _refuse_head(self) -> None:
        self._fail(
            ApiError(
                "headers_too_large",
                f"request line and headers exceed {self._max_head} bytes (http.max_header_bytes)",
            )
        )

    # -- httptools callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._incoming = _Incoming()
        self._arm(self.app.config.http.request_timeout_s, self._request_timeout)

    def on_url(self, url: bytes) -> None:
        assert self._incoming is not None
        self._incoming.url += url
        self._count_head(len(url))

    def _count_head(self, n: int) -> None:
        inc = self._incoming
        assert inc is not None
        inc.head_bytes += n
        if inc.head_bytes > self._max_head:
            raise ApiError(
                "headers_too_large",
                f"request line and headers exceed {self._max_head} bytes (http.max_header_bytes)",
            )

    def on_header(self, name: bytes, value: bytes) -> None:
        inc = self._incoming
        assert inc is not None
        inc.header_count += 1
        if inc.header_count > self._max_headers:
            raise ApiError(
                "headers_too_large",
                f"more than {self._max_headers} header fields (http.max_headers)",
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
        length = inc.headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise ApiError("bad_request", f"Content-Length must be digits, got {length!r}")
            if int(length) > self._max_body:
                raise ApiError(
                    "payload_too_large",
                    f"body of {length} bytes exceeds {self._max_body} (http.max_body_bytes)",
                )
        if inc.headers.get("expect", "").lower() == "100-continue" and self.transport:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        inc = self._incoming
        assert inc is not None
        inc.body += body
        if len(inc.body) > self._max_body:
            raise ApiError(
                "payload_too_large",
                f"body exceeds {self._max_body} bytes (http.max_body_bytes)",
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
        self._queue.append(request)
        if len(self._queue) >= self._max_pipelined and self.transport and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()
        if not self._busy:
            self._busy = True
            self.app.loop.create_task(self._serve())

    # -- answering -------------------------------------------------------------------------

    async def _serve(self) -> None:
        app = self.app
        try:
            while self._queue and not self._closing:
                request = self._queue.popleft()
                if self._reading_paused and len(self._queue) < self._max_pipelined // 2:
                    self._reading_paused = False
                    if self.transport:
                        self.transport.resume_reading()
                if app.inflight >= app.config.http.max_inflight:
                    result: Response | Stream | Upgrade = error_response(
                        ApiError("overloaded", "too many requests in flight; retry shortly")
                    )
                else:
                    app.inflight += 1
                    try:
                        if (
                            request.method == "OPTIONS"
                            and "origin" in request.headers
                            and "access-control-request-method" in request.headers
                        ):
                            result = (self._cors or _NO_CORS).preflight(request, app)
                        else:
                            result = await app.dispatch(request)
                    finally:
                        app.inflight -= 1
                if not self._answer(request, result):
                    return
        finally:
            self._busy = False
        if not self._closing and self._incoming is None:
            self._arm(app.config.http.keepalive_timeout_s, self._idle_timeout)

    def _answer(self, request: Request, result: Response | Stream | Upgrade) -> bool:
        """Write one answer; False when the connection stops serving requests."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return False
        if isinstance(result, Upgrade):
            tail = bytes(self._upgrade_tail or b"")
            self._upgrade_tail = None
            self._closing = True
            self._disarm()
            self.app.http_connections.discard(self)
            result.handoff(transport, request, tail)
            return False
        cors: tuple[tuple[bytes, bytes], ...] = ()
        if self._cors is not None:
            origin = request.headers.get("origin")
            if origin is not None and self._cors.allows(origin):
                cors = Cors.headers(origin)
        if isinstance(result, Stream):
            self._start_stream(result, cors)
            return False
        if cors:
            result = Response(
                result.status, result.body, result.content_type, result.headers + cors
            )
        keep_alive = (
            request.keep_alive
            and not request.upgrade
            and not self.app.draining
            and self._upgrade_tail is None
        )
        transport.write(render(result, keep_alive, head_only=request.method == "HEAD"))
        self.app.count_response(request, result.status)
        if not keep_alive:
            self._closing = True
            transport.close()
            return False
        return True

    def _start_stream(self, stream: Stream, headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        assert self.transport is not None
        self._disarm()
        self.streaming = True
        self.alive = True
        extra = b"".join(name + b": " + value + b"\r\n" for name, value in headers)
        self.transport.write(
            b"HTTP/1.1 200 OK\r\nDate: " + http_date() + b"\r\nServer: etherd\r\n"
            b"Content-Type: text/event-stream; charset=utf-8\r\nCache-Control: no-cache\r\n"
            b"X-Accel-Buffering: no\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n"
            + extra
            + b"\r\n"
        )
        stream.start(self)

    # -- SSE sink --------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Write stream bytes; drop the stream when its unsent bytes pass the cap."""
        transport = self.transport
        if transport is None or not self.alive:
            return
        transport.write(data)
        if transport.get_write_buffer_size() > self.app.config.http.max_pending_bytes:
            self.app.slow_consumer_closes += 1
            self.alive = False
            transport.abort()

    def end_stream(self) -> None:
        """Finish an SSE response with the last chunk and close."""
        if self.transport is not None and self.alive:
            self.alive = False
            self.transport.write(b"0\r\n\r\n")
            self.transport.close()

    # -- failure and timers ----------------------------------------------------------------

    def _fail(self, exc: ApiError) -> None:
        """Answer a request that could not be parsed, then close: the stream is lost."""
        self._closing = True
        self._disarm()
        self._incoming = None
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(render(error_response(exc), keep_alive=False))
            transport.close()
        self.app.count_response(None, exc.status)

    def _arm(self, delay: float, callback: Callable[[], None]) -> None:
        if self._timer is not None:
            self._timer.cancel()
        # app.loop, not get_running_loop(): on 3.11 that is a getpid() system call each time.
        self._timer = self.app.loop.call_later(delay, callback)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _request_timeout(self) -> None:
        self._timer = None
        if self._incoming is not None:
            self._fail(
                ApiError(
                    "request_timeout",
                    f"the request did not arrive whole within "
                    f"{self.app.config.http.request_timeout_s:g} s (http.request_timeout_s)",
                )
            )

    def _idle_timeout(self) -> None:
        self._timer = None
        if not self._busy and not self._queue and self._incoming is None and self.transport:
            self._closing = True
            self.transport.close()

    def close_if_idle(self) -> bool:
        """Close a keep-alive connection that has nothing in progress (for shutdown)."""
        if self.streaming:
            self.end_stream()
            return True
        if not self._busy and not self._queue and self._incoming is None and self.transport:
            self._closing = True
            self.transport.close()
            return True
        return False

    @property
    def busy(self) -> bool:
        """Whether a request is being answered or waiting to be."""
        return self._busy or bool(self._queue)
