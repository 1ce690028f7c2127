"""``GET /``: the built-in live viewer, a small page that subscribes to a topic and lists its
events as they arrive. Its one inline script and style are allowed by hash; it may connect
to this server only.
"""

from __future__ import annotations

import base64
import hashlib
import re
from importlib import resources
from typing import Final

from etherd.edge.api.common import Body, Route
from etherd.edge.http.request import Request
from etherd.edge.http.response import Response

__all__ = ["ViewerRoutes"]


def _inline_hash(html: bytes, tag: bytes) -> bytes:
    """The CSP source expression allowing the one inline ``<tag>`` block of the page."""
    start = html.index(b"<" + tag + b">") + len(tag) + 2
    end = html.index(b"</" + tag + b">", start)
    return b"'sha256-" + base64.b64encode(hashlib.sha256(html[start:end]).digest()) + b"'"


VIEWER: Final = resources.files("etherd").joinpath("viewer.html").read_bytes()
_VIEWER_CSP: Final = (
    b"default-src 'none'; script-src "
    + _inline_hash(VIEWER, b"script")
    + b"; style-src "
    + _inline_hash(VIEWER, b"style")
    + b"; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'; "
    b"connect-src 'self'"
)
_HOST: Final = re.compile(r"[A-Za-z0-9.\-]+(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?")


class ViewerRoutes:
    """The live viewer page."""

    def routes(self) -> list[Route]:
        """The route table entries."""
        return [
            Route(
                "GET",
                "/",
                lambda req, p: self.viewer(req),
                summary="The built-in live viewer page",
                responses={200: Body("text/html", {"type": "string"})},
                auth=False,
                tag="operations",
            )
        ]

    async def viewer(self, request: Request) -> Response:
        """``GET /``: the page, with a CSP that lets it connect back to this host only."""
        csp = _VIEWER_CSP
        host = request.headers.get("host", "")
        if _HOST.fullmatch(host):
            # 'self' covers ws: and wss: in CSP Level 3; older browsers need them spelled out.
            csp += b" ws://" + host.encode() + b" wss://" + host.encode()
        return Response(
            200,
            VIEWER,
            b"text/html; charset=utf-8",
            headers=(
                (b"Content-Security-Policy", csp),
                (b"X-Content-Type-Options", b"nosniff"),
                (b"Referrer-Policy", b"no-referrer"),
                (b"Cache-Control", b"no-cache"),
            ),
        )
