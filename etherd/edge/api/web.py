"""The browser UI's routes: its static files, and who the caller is.

``GET /`` (the page), ``GET /client.js`` (the realtime client module, for integrators too)
and ``GET /web/{name}`` (the page's other modules, styles and images) are read once from
the package directory ``etherd/web`` when this module is imported. Only those names exist,
so a path cannot reach anything else. Every answer says ``nosniff`` and ``no-cache`` and
carries a Content-Security-Policy that allows scripts, styles and images from this origin
only and connections to this server only: the page has no inline script or style.

``GET /api/whoami`` answers the caller's subject, role and token expiry, so the page can
name the signed-in user, pick the ``activity/{sub}`` topic and check a pasted token.
"""

from __future__ import annotations

import os
import re
from importlib import resources
from typing import Final, NamedTuple

import msgspec

from etherd.core.auth import Authenticator
from etherd.core.errors import Refusal
from etherd.core.rfc3339 import rfc3339_ms
from etherd.edge.api.common import Body, Route, authenticate, json_response
from etherd.edge.http.request import Request
from etherd.edge.http.response import Response

__all__ = ["FILES", "WebRoutes", "WhoAmI", "csp"]

# Content types by file extension; a file with any other extension is not served.
_TYPES: Final = {
    ".html": b"text/html; charset=utf-8",
    ".js": b"text/javascript; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
    ".svg": b"image/svg+xml",
    ".png": b"image/png",
}
_NAME: Final = re.compile(r"[a-z0-9][a-z0-9_-]*\.[a-z]+")
_HOST: Final = re.compile(r"[A-Za-z0-9.\-]+(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?")
_CSP: Final = (
    b"default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'%s; "
    b"img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


class StaticFile(NamedTuple):
    body: bytes
    content_type: bytes


def _load() -> dict[str, StaticFile]:
    """Every servable file of ``etherd/web``, by name."""
    files: dict[str, StaticFile] = {}
    for entry in resources.files("etherd").joinpath("web").iterdir():
        name = entry.name
        ctype = _TYPES.get(os.path.splitext(name)[1])
        if entry.is_file() and ctype is not None and _NAME.fullmatch(name):
            files[name] = StaticFile(entry.read_bytes(), ctype)
    return files


FILES: Final = _load()


def csp(host: str) -> bytes:
    """The page's Content-Security-Policy for a request's ``Host`` header.

    ``connect-src 'self'`` covers ws: and wss: to the same host in CSP Level 3; older
    browsers need them spelled out, so a well-formed Host is added as both.
    """
    extra = b""
    if _HOST.fullmatch(host):
        extra = b" ws://" + host.encode() + b" wss://" + host.encode()
    return _CSP % extra


class WhoAmI(msgspec.Struct, kw_only=True, frozen=True):
    """``GET /api/whoami``: the caller as its token names it."""

    sub: str
    role: str
    # RFC 3339; None for a token without expiry (the development token).
    expires_at: str | None
    dev: bool


class WebRoutes:
    """The browser UI's files and ``/api/whoami``."""

    def __init__(self, auth: Authenticator) -> None:
        self.auth = auth

    def routes(self) -> list[Route]:
        """The route table entries."""
        return [
            Route(
                "GET",
                "/",
                lambda req, p: self.static(req, "index.html"),
                summary="The browser UI: task board, task page and operator view",
                responses={200: Body("text/html", {"type": "string"})},
                auth=False,
                tag="web",
            ),
            Route(
                "GET",
                "/client.js",
                lambda req, p: self.static(req, "client.js"),
                summary="The realtime client module (resume, SSE fallback, backoff)",
                responses={200: Body("text/javascript", {"type": "string"})},
                auth=False,
                tag="web",
            ),
            Route(
                "GET",
                "/web/{name}",
                lambda req, p: self.static(req, p["name"]),
                summary="The browser UI's other modules, styles and images",
                responses={200: Body("application/octet-stream", {"type": "string"})},
                errors=(404,),
                auth=False,
                tag="web",
            ),
            Route(
                "GET",
                "/api/whoami",
                lambda req, p: self.whoami(req),
                summary="The caller's subject, role and token expiry",
                responses={200: WhoAmI},
                tag="web",
            ),
        ]

    async def static(self, request: Request, name: str) -> Response:
        """One file of ``etherd/web``; 404 for any other name."""
        found = FILES.get(name)
        if found is None:
            shown = name if len(name) <= 60 else name[:60] + "…"
            raise Refusal("not_found", f"no file {shown!r} in the web UI")
        return Response(
            200,
            found.body,
            found.content_type,
            headers=(
                (b"Content-Security-Policy", csp(request.headers.get("host", ""))),
                (b"X-Content-Type-Options", b"nosniff"),
                (b"Referrer-Policy", b"no-referrer"),
                (b"Cache-Control", b"no-cache"),
            ),
        )

    async def whoami(self, request: Request) -> Response:
        """``GET /api/whoami``: the caller's subject, role and token expiry."""
        principal = authenticate(self.auth, request)
        exp = None if principal.exp is None else rfc3339_ms(int(principal.exp * 1000))
        return json_response(
            200,
            WhoAmI(sub=principal.sub, role=str(principal.role), expires_at=exp, dev=principal.dev),
        )
