"""What a handler answers: a whole ``Response``, a ``Stream`` (Server-Sent Events) or an
``Upgrade`` (WebSocket hand-off); how a response is serialised; and the HTTP status of
each refusal code.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from email.utils import formatdate
from typing import Final

from etherd.core.errors import CODES, Refusal
from etherd.core.wire import error_body
from etherd.edge.http.request import Request

__all__ = [
    "JSON",
    "STATUS",
    "Headers",
    "Response",
    "Result",
    "Stream",
    "Upgrade",
    "error_response",
    "http_date",
    "render",
]

JSON: Final = b"application/json"
Headers = tuple[tuple[bytes, bytes], ...]

# Refusal code -> HTTP status (contract section 8).
STATUS: Final[dict[str, int]] = {
    "bad_request": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "method_not_allowed": 405,
    "request_timeout": 408,
    "conflict": 409,
    "run_mismatch": 409,
    "lease_expired": 409,
    "cancelled": 409,
    "invalid_transition": 409,
    "already_claimed": 409,
    "idempotency_conflict": 409,
    "payload_too_large": 413,
    "unsupported_media_type": 415,
    "unprocessable": 422,
    "upgrade_required": 426,
    "headers_too_large": 431,
    "http_version_not_supported": 505,
    "rate_limited": 429,
    "internal": 500,
    "not_ready": 503,
    "overloaded": 503,
}
assert STATUS.keys() == CODES.keys(), "every refusal code needs an HTTP status"

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
    505: b"HTTP Version Not Supported",
}


class Response:
    """A complete response with a body."""

    __slots__ = ("body", "content_type", "headers", "status")

    def __init__(
        self,
        status: int,
        body: bytes = b"",
        content_type: bytes = JSON,
        headers: Headers = (),
    ) -> None:
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers


class Stream:
    """A streaming response (Server-Sent Events): the connection is handed to ``start``.

    ``start(transport, headers)`` takes the transport over: it writes the response head
    (with ``headers``, e.g. CORS) and becomes the transport's protocol.
    """

    __slots__ = ("start",)

    def __init__(self, start: Callable[[asyncio.Transport, Headers], None]) -> None:
        self.start = start


class Upgrade:
    """An authorised WebSocket upgrade: ``handoff(transport, request, tail)`` takes over."""

    __slots__ = ("handoff",)

    def __init__(self, handoff: Callable[[asyncio.Transport, Request, bytes], None]) -> None:
        self.handoff = handoff


Result = Response | Stream | Upgrade

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


def error_response(exc: Refusal, headers: Headers = ()) -> Response:
    """The JSON error body of contract section 8 for a refusal."""
    return Response(STATUS[exc.code], error_body(exc.code, exc.message), headers=headers)
