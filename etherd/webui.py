"""The browser UI: its static files, the operator's stats and who the caller is.

``install(app)`` registers:

- ``GET /`` (the page), ``GET /client.js`` (the realtime client module, for integrators
  too) and ``GET /web/{name}`` (the page's other modules, styles and images), all read
  once from the package directory ``etherd/web`` at import. Only those names exist, so a
  path cannot reach anything else. Every answer says ``nosniff`` and ``no-cache`` and
  carries a Content-Security-Policy that allows scripts, styles and images from this
  origin only and connections to this server only: the page has no inline script or style.
- ``GET /api/admin/stats`` (admin tokens): connections, subscriptions, the busiest topics,
  publish, delivery and commit rates over the last few seconds, and the store's status.
- ``GET /api/whoami``: the caller's subject, role and token expiry, so the page can name
  the signed-in user, pick the ``activity/{sub}`` topic and check a pasted token.

Rates come from the counters the hub and the batcher already keep, sampled once a second;
nothing on the hot path changes.
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections import deque
from collections.abc import Callable
from importlib import resources
from typing import Final, Literal, NamedTuple

import msgspec

from etherd.api import authenticate, json_response
from etherd.app import App
from etherd.clock import rfc3339_ms
from etherd.errors import ApiError
from etherd.http import Request, Response

__all__ = ["FILES", "RateSampler", "Stats", "install"]

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
TOP_TOPICS: Final = 100
SAMPLE_INTERVAL_S: Final = 1.0
RATE_WINDOW_S: Final = 5.0


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


def install(app: App) -> None:
    """Register the browser UI's routes and start sampling the rate counters."""
    sampler = RateSampler(lambda: _counters(app))
    sampler.run(app)
    r = app.router
    r.add("GET", "/", lambda req, p: static(req, "index.html"))
    r.add("GET", "/client.js", lambda req, p: static(req, "client.js"))
    r.add("GET", "/web/{name}", lambda req, p: static(req, p["name"]))
    r.add("GET", "/api/admin/stats", lambda req, p: admin_stats(app, req, sampler))
    r.add("GET", "/api/whoami", lambda req, p: whoami(app, req))


# -- static files --------------------------------------------------------------------------


def csp(host: str) -> bytes:
    """The page's Content-Security-Policy for a request's ``Host`` header.

    ``connect-src 'self'`` covers ws: and wss: to the same host in CSP Level 3; older
    browsers need them spelled out, so a well-formed Host is added as both.
    """
    extra = b""
    if _HOST.fullmatch(host):
        extra = b" ws://" + host.encode() + b" wss://" + host.encode()
    return _CSP % extra


async def static(request: Request, name: str) -> Response:
    """One file of ``etherd/web``; 404 for any other name."""
    found = FILES.get(name)
    if found is None:
        shown = name if len(name) <= 60 else name[:60] + "…"
        raise ApiError("not_found", f"no file {shown!r} in the web UI")
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


# -- who am I ------------------------------------------------------------------------------


class WhoAmI(msgspec.Struct, kw_only=True, frozen=True):
    sub: str
    role: str
    # RFC 3339; None for a token without expiry (the development token).
    expires_at: str | None
    dev: bool


async def whoami(app: App, request: Request) -> Response:
    """``GET /api/whoami``: the caller as its token names it."""
    principal = authenticate(app, request)
    exp = None if principal.exp is None else rfc3339_ms(int(principal.exp * 1000))
    return json_response(
        200,
        WhoAmI(sub=principal.sub, role=str(principal.role), expires_at=exp, dev=principal.dev),
    )


# -- operator stats ------------------------------------------------------------------------


class Connections(msgspec.Struct, kw_only=True, frozen=True):
    websocket: int
    sse: int
    # HTTP connections that are neither upgraded nor streaming.
    http: int


class TopicCount(msgspec.Struct, kw_only=True, frozen=True):
    topic: str
    subscribers: int


class Rates(msgspec.Struct, kw_only=True, frozen=True):
    published_per_s: float
    delivered_per_s: float
    commits_per_s: float
    stored_per_s: float


class StoreStatus(msgspec.Struct, kw_only=True, frozen=True):
    up: bool
    kind: Literal["sqlite", "postgresql"]
    queue_rows: int
    epoch: str


class Stats(msgspec.Struct, kw_only=True, frozen=True):
    """``GET /api/admin/stats``."""

    node: str
    started_at: str
    connections: Connections
    subscriptions: int
    # The busiest topics and patterns (at most ``TOP_TOPICS``), most subscribers first.
    topics: list[TopicCount]
    rates: Rates
    store: StoreStatus


# published, delivered (frames queued), commits, stored rows: all only ever grow.
Counters = tuple[int, int, int, int]


def _counters(app: App) -> Counters:
    hub, batcher = app.hub, app.batcher
    return (hub.published, hub.frames_queued, batcher.batches, batcher.rows)


class RateSampler:
    """Samples growing counters once a second and answers their rates over ~5 s."""

    def __init__(
        self,
        read: Callable[[], Counters],
        clock: Callable[[], float] = time.monotonic,
        window_s: float = RATE_WINDOW_S,
    ) -> None:
        self._read = read
        self._clock = clock
        self._window_s = window_s
        # One sample per interval over the window, plus one older to span it whole.
        self._samples: deque[tuple[float, Counters]] = deque(
            maxlen=int(window_s / SAMPLE_INTERVAL_S) + 2
        )
        self.sample()

    def sample(self) -> None:
        """Record the counters now."""
        self._samples.append((self._clock(), self._read()))

    def rates(self) -> Rates:
        """Per-second rates from the oldest sample within the window (or the oldest held,
        when none is that recent) up to the counters now."""
        now = self._clock()
        current = self._read()
        since, then = self._samples[0]
        for at, values in self._samples:
            if now - at <= self._window_s + SAMPLE_INTERVAL_S / 2:
                since, then = at, values
                break
        elapsed = now - since
        if elapsed <= 0:
            return Rates(
                published_per_s=0.0, delivered_per_s=0.0, commits_per_s=0.0, stored_per_s=0.0
            )
        per_s = [round((c - t) / elapsed, 2) for c, t in zip(current, then, strict=True)]
        return Rates(
            published_per_s=per_s[0],
            delivered_per_s=per_s[1],
            commits_per_s=per_s[2],
            stored_per_s=per_s[3],
        )

    def run(self, app: App) -> None:
        """Sample every second on the app's loop until the app starts draining."""

        def tick() -> None:
            if app.draining:
                return
            self.sample()
            app.loop.call_later(SAMPLE_INTERVAL_S, tick)

        app.loop.call_later(SAMPLE_INTERVAL_S, tick)


def _node_name() -> str:
    # The contract's default node id: host name and process id.
    return f"{socket.gethostname()}-{os.getpid()}"


async def admin_stats(app: App, request: Request, sampler: RateSampler) -> Response:
    """``GET /api/admin/stats``: what an operator watches, for admin tokens only."""
    principal = authenticate(app, request)
    if not principal.is_admin:
        raise ApiError(
            "forbidden", f"stats need an admin token; {principal.sub} is a {principal.role}"
        )
    hub, batcher = app.hub, app.batcher
    sse = len(app.sse_streams)
    url = app.config.store_url
    stats = Stats(
        node=_node_name(),
        started_at=rfc3339_ms(int(app.started_at * 1000)),
        connections=Connections(
            websocket=len(app.sessions),
            sse=sse,
            http=max(0, len(app.http_connections) - sse),
        ),
        subscriptions=hub.subscription_count,
        topics=[TopicCount(topic=t, subscribers=n) for t, n in hub.topic_subscribers(TOP_TOPICS)],
        rates=sampler.rates(),
        store=StoreStatus(
            up=batcher.is_up,
            kind="postgresql" if url.startswith(("postgresql://", "postgres://")) else "sqlite",
            queue_rows=batcher.queued_rows,
            epoch=app.epoch,
        ),
    )
    return json_response(200, stats)
