"""The cross-origin policy of ``http.cors_origins`` (CORS).

A request whose ``Origin`` is listed (or any origin, with "*") gets
``Access-Control-Allow-Origin`` echoing it, on JSON answers and SSE streams alike; a
preflight (``OPTIONS`` with ``Access-Control-Request-Method``) on a known route gets 204
from an allowed origin and 403 from any other. No credentials are ever allowed: etherd
authenticates with bearer tokens, never cookies. Requests without ``Origin`` pay nothing.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Final

from etherd.core.errors import Refusal
from etherd.edge.http.request import Request
from etherd.edge.http.response import Headers, Response, error_response

__all__ = ["CORS_ALLOW_HEADERS", "CORS_EXPOSE_HEADERS", "Cors", "is_preflight", "policy"]

# Request headers a browser may send cross-origin, response headers its scripts may read,
# and how long (seconds) it may cache a preflight answer.
CORS_ALLOW_HEADERS: Final = (
    b"Authorization, Content-Type, Idempotency-Key, X-Ether-Harness-App, Last-Event-ID"
)
CORS_EXPOSE_HEADERS: Final = b"Idempotent-Replayed, WWW-Authenticate"
CORS_MAX_AGE: Final = b"600"


class Cors:
    """The cross-origin policy of one configuration."""

    __slots__ = ("_any", "_origins")

    def __init__(self, origins: list[str]) -> None:
        self._any = "*" in origins
        self._origins = frozenset(origins)

    def allows(self, origin: str) -> bool:
        """Whether scripts from this origin may read etherd's answers."""
        return self._any or origin in self._origins

    def headers_for(self, request: Request) -> Headers:
        """The CORS headers of an answer to ``request`` (none without an allowed Origin)."""
        origin = request.headers.get("origin")
        if origin is None or not self.allows(origin):
            return ()
        return (
            (b"Access-Control-Allow-Origin", origin.encode("latin-1")),
            (b"Access-Control-Expose-Headers", CORS_EXPOSE_HEADERS),
            (b"Vary", b"Origin"),
        )

    def preflight(self, request: Request, methods: Callable[[str], list[str]]) -> Response:
        """Answer a CORS preflight; ``methods(path)`` lists the methods a path takes."""
        origin = request.headers["origin"]
        if not self.allows(origin):
            return error_response(
                Refusal(
                    "forbidden",
                    f"origin {origin[:100]!r} may not call this server from a browser; "
                    f"list it in http.cors_origins",
                )
            )
        allowed = methods(request.path)
        if not allowed:
            return error_response(Refusal("not_found", f"no route for {request.path}"))
        return Response(
            204,
            headers=(
                (b"Access-Control-Allow-Methods", ", ".join(allowed).encode()),
                (b"Access-Control-Allow-Headers", CORS_ALLOW_HEADERS),
                (b"Access-Control-Max-Age", CORS_MAX_AGE),
            ),
        )


def is_preflight(request: Request) -> bool:
    """``OPTIONS`` with ``Origin`` and ``Access-Control-Request-Method``."""
    headers = request.headers
    return (
        request.method == "OPTIONS"
        and "origin" in headers
        and "access-control-request-method" in headers
    )


@functools.lru_cache(maxsize=8)
def policy(origins: tuple[str, ...]) -> Cors:
    """One policy object per configured list, shared by every connection."""
    return Cors(list(origins))
