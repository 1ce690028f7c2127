"""Realtime routes: the WebSocket upgrade at ``/api/realtime``, Server-Sent Events at
``/api/events``, ``/api/realtime/config``, and the conformance echo endpoint.

An upgrade is authenticated here, before any WebSocket byte is exchanged, so a refused
client gets the same JSON error as any HTTP route (401, 403, 429, 503); a malformed
handshake gets 400 or 426 before the framing layer ever sees it.
"""

from __future__ import annotations

import base64
import binascii

import msgspec

from etherd.core.auth import DEV_TOKEN, Authenticator, Role
from etherd.core.errors import Refusal
from etherd.core.topics import TopicError, is_pattern, validate_pattern, validate_topic
from etherd.edge.api.common import (
    TOKEN_QUERY,
    Body,
    Param,
    Route,
    authenticate,
    int_query,
    json_response,
    parse_int,
)
from etherd.edge.api.shapes import RealtimeClientConfig
from etherd.edge.http.request import Request
from etherd.edge.http.response import Response, Stream, Upgrade
from etherd.edge.http.sse import SseStream
from etherd.edge.ws.framing import Echo
from etherd.edge.ws.session import Session
from etherd.services.realtime import Realtime

__all__ = ["RealtimeRoutes", "check_handshake"]


class RealtimeRoutes:
    """WebSocket, SSE and the realtime configuration."""

    def __init__(self, auth: Authenticator, realtime: Realtime) -> None:
        self.auth = auth
        self.realtime = realtime

    def routes(self) -> list[Route]:
        """The route table entries (the echo endpoint only when ``ws.echo_path`` is set)."""
        table = [
            Route(
                "GET",
                "/api/realtime",
                lambda req, p: self.upgrade(req),
                streams=True,
                summary="The WebSocket upgrade (see docs/protocol.md for the messages)",
                responses={101: None},
                errors=(426, 429),
                params=(TOKEN_QUERY,),
                tag="realtime",
            ),
            Route(
                "GET",
                "/api/realtime/config",
                lambda req, p: self.client_config(req),
                summary="How clients should connect",
                responses={200: RealtimeClientConfig},
                auth=False,
                tag="realtime",
            ),
            Route(
                "GET",
                "/api/topics/{topic}/presence",
                lambda req, p: self.presence(req, p["topic"]),
                summary="Subscribers of a topic, per node (its slashes percent-encoded)",
                responses={200: PresenceView},
                tag="realtime",
            ),
            Route(
                "GET",
                "/api/events",
                lambda req, p: self.events(req, req.param("topic")),
                streams=True,
                summary="Server-Sent Events of one topic or pattern",
                responses={200: Body("text/event-stream", {"type": "string"})},
                errors=(422,),
                params=(
                    Param("topic", "query", {"type": "string", "minLength": 1}, required=True),
                    int_query("since", "Replay events after this offset first"),
                    Param("Last-Event-ID", "header", {"type": "string"}),
                    TOKEN_QUERY,
                ),
                tag="realtime",
            ),
        ]
        echo_path = self.realtime.config.ws.echo_path
        if echo_path:
            table.append(
                Route(
                    "GET",
                    echo_path,
                    lambda req, p: self.echo(req),
                    streams=True,
                    summary="WebSocket echo peer for the conformance suite",
                    responses={101: None},
                    errors=(426,),
                    auth=False,
                    tag="realtime",
                )
            )
        return table

    async def upgrade(self, request: Request) -> Upgrade:
        """``GET /api/realtime``: authenticate, then hand the connection to the framing."""
        if not request.upgrade or request.headers.get("upgrade", "").lower() != "websocket":
            raise Refusal("upgrade_required", "this endpoint speaks WebSocket; send an upgrade")
        check_handshake(request)
        realtime = self.realtime
        if realtime.state.draining:
            raise Refusal("not_ready", "draining: the server is stopping")
        principal = authenticate(self.auth, request, query_token=True)
        config = realtime.config
        limit = config.ws.max_connections_per_subject
        connections = realtime.connections
        if connections.subjects[principal.sub] >= limit:
            raise Refusal(
                "rate_limited",
                f"{principal.sub} already has {limit} connections (ws.max_connections_per_subject)",
                limit="ws.max_connections_per_subject",
            )
        if len(connections.sessions) >= config.server.max_connections:
            raise Refusal(
                "overloaded",
                "too many connections (server.max_connections); retry shortly",
                limit="server.max_connections",
            )
        session = Session(realtime, principal, request.peer)
        key = request.headers["sec-websocket-key"]
        return Upgrade(lambda transport, req, tail: session.accept(transport, key, tail))

    async def echo(self, request: Request) -> Upgrade:
        """The conformance-suite echo peer (only when ``ws.echo_path`` is set)."""
        if not request.upgrade:
            raise Refusal("upgrade_required", "this endpoint speaks WebSocket; send an upgrade")
        check_handshake(request)
        cfg = self.realtime.config.ws
        echo = Echo(cfg.max_message_bytes, cfg.close_grace_s)
        key = request.headers["sec-websocket-key"]
        return Upgrade(lambda transport, req, tail: echo.accept(transport, key, tail))

    async def client_config(self, request: Request) -> Response:
        """``GET /api/realtime/config``: how clients should connect."""
        config = self.realtime.config
        base = config.public_url
        ws_base = "ws" + base[4:] if base.startswith("http") else base
        return json_response(
            200,
            RealtimeClientConfig(
                prefer_websocket=config.realtime.prefer_websocket,
                websocket_url=ws_base + "/api/realtime",
                sse_url=base + "/api/events",
                replay_max_events=config.realtime.replay_max_events,
                # Only ever on a loopback listener: lets the browser UI work at once.
                dev_token=DEV_TOKEN if config.dev_auth else None,
            ),
        )

    async def presence(self, request: Request, topic: str) -> Response:
        """Subscribers of a topic across the cluster, per node (service and admin tokens).

        The topic is one path segment, its slashes percent-encoded (``tasks%2Ft1``).
        """
        principal = authenticate(self.auth, request)
        if principal.role is not Role.SERVICE and principal.role is not Role.ADMIN:
            raise Refusal("forbidden", "presence needs a service or admin token")
        try:
            validate_topic(topic)
        except TopicError as exc:
            raise Refusal(
                "bad_request", f"{exc} (percent-encode the slashes: tasks%2Ft1)"
            ) from None
        nodes = await self.realtime.presence(topic)
        return json_response(
            200,
            PresenceView(
                topic=topic,
                subscribers=sum(nodes.values()),
                nodes=nodes,
                subjects=self.realtime.subjects(topic),
            ),
        )

    async def events(self, request: Request, topic: str | None) -> Stream:
        """Server-Sent Events for one topic, resuming from ``Last-Event-ID`` or ``?since=``."""
        principal = authenticate(self.auth, request, query_token=True)
        if not topic:
            raise Refusal("bad_request", "missing ?topic= (the topic to stream)")
        try:
            validate_pattern(topic)
        except TopicError as exc:
            raise Refusal("unprocessable", str(exc)) from None
        reason = await self.realtime.authorize(principal, topic)
        if reason is not None:
            raise Refusal("forbidden", reason)
        since_text = request.headers.get("last-event-id") or request.param("since")
        since: int | None = None
        if since_text is not None and since_text != "":
            since = parse_int(since_text, "since / Last-Event-ID")
            if is_pattern(topic):
                raise Refusal("bad_request", "resume applies to concrete topics, not to patterns")
            spent = self.realtime.replay_refused("sse")
            if spent is not None:
                raise spent
        stream = SseStream(self.realtime, principal, topic, since)
        return Stream(stream.start)


class PresenceView(msgspec.Struct, kw_only=True):
    """``GET /api/topics/{topic}/presence``."""

    topic: str
    # Subscribers an event published to the topic reaches, over every node that answered.
    subscribers: int
    nodes: dict[str, int]
    # The bus subjects the topic's events travel on (empty without a cluster).
    subjects: list[str]


def check_handshake(request: Request) -> None:
    """Refuse a malformed handshake with a JSON error before the framing sees it
    (RFC 6455 section 4.2.1)."""
    version = request.headers.get("sec-websocket-version", "")
    if version.strip() != "13":
        raise Refusal("upgrade_required", f"Sec-WebSocket-Version must be 13, got {version[:20]!r}")
    key = request.headers.get("sec-websocket-key", "").strip()
    try:
        raw = base64.b64decode(key, validate=True)
    except (ValueError, binascii.Error):
        raw = b""
    if len(raw) != 16:
        raise Refusal(
            "bad_request", "Sec-WebSocket-Key must be 16 random bytes in base64 (RFC 6455 4.1)"
        )
