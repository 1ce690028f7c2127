"""Route handlers: health, the realtime upgrade and SSE streams, and the publish API.

Handlers take a parsed ``Request`` and return a ``Response`` (or a ``Stream`` or an
``Upgrade``); refusals are raised as ``ApiError`` and rendered by ``App.dispatch``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import time
from typing import Final, TypeVar

import msgspec

from etherd.app import App
from etherd.auth import DEV_TOKEN, AuthError, Principal, may_publish, may_subscribe
from etherd.errors import ApiError
from etherd.eventlog import Idempotency, IdempotentAnswer, NewEvent, StoredEvent, Write
from etherd.http import HttpConnection, Request, Response, Stream, Upgrade
from etherd.hub import Prepared, sse_chunk
from etherd.messages import (
    ENCODER,
    RESERVED_FIELDS,
    PublishAnswer,
    PublishBody,
    PublishedItem,
    PublishEvent,
    event_json,
)
from etherd.metrics import metrics_endpoint
from etherd.realtime import Session, replay_to, resume
from etherd.store import IdempotencyConflict, StoreUnavailable
from etherd.topics import TopicError, is_pattern, validate_pattern, validate_topic
from etherd.ws import Echo, handoff

__all__ = ["install"]

T = TypeVar("T")
MAX_IDEMPOTENCY_KEY: Final = 255


def install(app: App) -> None:
    """Register every route on the app's router."""
    r = app.router
    r.add("GET", "/healthz", lambda req, p: healthz(app, req))
    r.add("GET", "/readyz", lambda req, p: readyz(app, req))
    r.add("GET", "/metrics", lambda req, p: metrics_endpoint(app, req))
    r.add("GET", "/api/realtime", lambda req, p: realtime(app, req))
    r.add("GET", "/api/realtime/config", lambda req, p: realtime_config(app, req))
    r.add("GET", "/api/events", lambda req, p: events(app, req, req.param("topic")))
    r.add("POST", "/api/publish", lambda req, p: publish(app, req))
    if app.config.ws.echo_path:
        r.add("GET", app.config.ws.echo_path, lambda req, p: echo(app, req))


def json_response(status: int, body: object) -> Response:
    """A JSON response from a Struct or plain data."""
    return Response(status, ENCODER.encode(body))


def authenticate(app: App, request: Request, *, query_token: bool = False) -> Principal:
    """The caller's principal from ``Authorization: Bearer`` (or ``?token=`` when allowed)."""
    try:
        header = request.headers.get("authorization")
        if header is None and query_token:
            token = request.param("token")
            if token is not None:
                return app.auth.verify(token)
        return app.auth.bearer(header)
    except AuthError as exc:
        raise ApiError(exc.code, exc.message) from None


def decode_json(request: Request, typ: type[T]) -> T:
    """Decode a JSON body into a Struct: 415 if not JSON, 400 if malformed, 422 if invalid."""
    ctype = request.headers.get("content-type", "")
    if ctype.split(";", 1)[0].strip().lower() != "application/json":
        raise ApiError(
            "unsupported_media_type",
            f"expected Content-Type: application/json, got {ctype or 'none'!r}",
        )
    try:
        return msgspec.json.decode(request.body, type=typ)
    except msgspec.ValidationError as exc:
        raise ApiError("unprocessable", f"invalid body: {exc}") from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise ApiError("bad_request", f"body is not valid JSON: {exc}") from None


def idempotency(request: Request, principal: Principal) -> Idempotency | None:
    """The request's ``Idempotency-Key``, scoped to the caller and route, if any."""
    key = request.headers.get("idempotency-key")
    if key is None:
        return None
    if not key or len(key) > MAX_IDEMPOTENCY_KEY:
        raise ApiError("bad_request", f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} chars")
    fingerprint = hashlib.sha256(request.body).hexdigest()
    return Idempotency(key, f"{principal.sub}:{request.method}:{request.path}", fingerprint)


async def replayed(app: App, idem: Idempotency) -> Response | None:
    """The first answer to an earlier request with this key, or None if it is new."""
    try:
        answer = await app.store.idempotent(idem.scope, idem.key)
    except StoreUnavailable as exc:
        raise ApiError("not_ready", f"the event log is unavailable: {exc}") from None
    return None if answer is None else _first_answer(answer, idem.fingerprint)


def answer_of_conflict(exc: IdempotencyConflict, write: Write) -> Response:
    """A concurrent request with the same key committed first: answer as it was answered."""
    assert write.idempotency is not None
    return _first_answer(exc.existing, write.idempotency.fingerprint)


def _first_answer(answer: IdempotentAnswer, fingerprint: str) -> Response:
    """The stored answer for a retry of the same request; 409 for another body."""
    if answer.fingerprint != fingerprint:
        raise ApiError(
            "idempotency_conflict",
            "this Idempotency-Key was used with a different body; use a new key",
        )
    return Response(answer.status, answer.body, headers=((b"Idempotent-Replayed", b"true"),))


# -- health --------------------------------------------------------------------------------


async def healthz(app: App, request: Request) -> Response:
    """Alive: the loop turns and answers."""
    return json_response(200, {"status": "ok"})


async def readyz(app: App, request: Request) -> Response:
    """Ready: the store answers and the server is not draining."""
    if app.draining:
        raise ApiError("not_ready", "draining: the server is stopping")
    if not app.batcher.is_up:
        raise ApiError("not_ready", "the event log is unavailable")
    try:
        await app.store.ping()
    except Exception as exc:
        raise ApiError("not_ready", f"the event log is unavailable: {exc}") from None
    return json_response(200, {"status": "ready", "epoch": app.epoch})


# -- realtime ------------------------------------------------------------------------------


async def realtime(app: App, request: Request) -> Upgrade:
    """``GET /api/realtime``: authenticate, then hand the connection to picows."""
    if not request.upgrade or request.headers.get("upgrade", "").lower() != "websocket":
        raise ApiError("upgrade_required", "this endpoint speaks WebSocket; send an upgrade")
    check_handshake(request)
    if app.draining:
        raise ApiError("not_ready", "draining: the server is stopping")
    principal = authenticate(app, request, query_token=True)
    limit = app.config.ws.max_connections_per_subject
    if app.subjects[principal.sub] >= limit:
        raise ApiError(
            "rate_limited",
            f"{principal.sub} already has {limit} connections (ws.max_connections_per_subject)",
        )
    if len(app.sessions) >= app.config.server.max_connections:
        raise ApiError("overloaded", "too many connections; retry shortly")
    session = Session(app, principal, request.peer)
    cfg = app.config.ws
    return Upgrade(
        lambda transport, req, tail: handoff(
            transport,
            req,
            tail,
            session,
            max_frame_bytes=cfg.max_message_bytes,
        )
    )


def check_handshake(request: Request) -> None:
    """Refuse a malformed handshake with a JSON error before picows sees it (RFC 6455 4.2.1)."""
    version = request.headers.get("sec-websocket-version", "")
    if version.strip() != "13":
        raise ApiError(
            "upgrade_required", f"Sec-WebSocket-Version must be 13, got {version[:20]!r}"
        )
    key = request.headers.get("sec-websocket-key", "").strip()
    try:
        raw = base64.b64decode(key, validate=True)
    except (ValueError, binascii.Error):
        raw = b""
    if len(raw) != 16:
        raise ApiError(
            "bad_request", "Sec-WebSocket-Key must be 16 random bytes in base64 (RFC 6455 4.1)"
        )


async def echo(app: App, request: Request) -> Upgrade:
    """The conformance-suite echo peer (only when ``ws.echo_path`` is set)."""
    if not request.upgrade:
        raise ApiError("upgrade_required", "this endpoint speaks WebSocket; send an upgrade")
    check_handshake(request)
    cfg = app.config.ws
    return Upgrade(
        lambda transport, req, tail: handoff(
            transport,
            req,
            tail,
            Echo(cfg.max_message_bytes),
            max_frame_bytes=cfg.max_message_bytes,
        )
    )


async def realtime_config(app: App, request: Request) -> Response:
    """``GET /api/realtime/config``: how clients should connect."""
    base = app.config.public_url
    ws_base = "ws" + base[4:] if base.startswith("http") else base
    body: dict[str, object] = {
        "prefer_websocket": app.config.realtime.prefer_websocket,
        "websocket_url": ws_base + "/api/realtime",
        "sse_url": base + "/api/events",
        "replay_max_events": app.config.realtime.replay_max_events,
    }
    if app.config.dev_auth:
        # Only on a loopback listener: lets the browser UI work at once in development.
        body["dev_token"] = DEV_TOKEN
    return json_response(200, body)


async def events(app: App, request: Request, topic: str | None) -> Stream:
    """Server-Sent Events for one topic, resuming from ``Last-Event-ID`` or ``?since=``."""
    principal = authenticate(app, request, query_token=True)
    if not topic:
        raise ApiError("bad_request", "missing ?topic= (the topic to stream)")
    try:
        validate_pattern(topic)
    except TopicError as exc:
        raise ApiError("unprocessable", str(exc)) from None
    reason = may_subscribe(principal, topic, await app.task_facts(topic))
    if reason is not None:
        raise ApiError("forbidden", reason)
    since_text = request.headers.get("last-event-id") or request.param("since")
    since: int | None = None
    if since_text is not None and since_text != "":
        if not since_text.isdigit():
            raise ApiError(
                "bad_request", f"since / Last-Event-ID must be an offset, got {since_text[:40]!r}"
            )
        if is_pattern(topic):
            raise ApiError("bad_request", "resume applies to concrete topics, not to patterns")
        since = int(since_text)
    return Stream(lambda conn: start_stream(app, conn, topic, since))


def start_stream(app: App, conn: HttpConnection, topic: str, since: int | None) -> None:
    """Subscribe an SSE connection, replaying from ``since`` first when given."""
    hub = app.hub
    conn.stream_topics = [topic]

    def closed() -> None:
        hub.unsubscribe(topic, conn)
        app.sse_streams.discard(conn)

    conn.on_stream_closed = closed
    app.sse_streams.add(conn)
    if since is not None:
        hub.hold(conn, topic, since)
    hub.subscribe(topic, conn)
    hub.queue(conn, _sse_comment(b"etherd stream " + topic.encode()))
    if since is not None:
        app.loop.create_task(_replay_stream(app, conn, topic, since))


async def _replay_stream(app: App, conn: HttpConnection, topic: str, since: int) -> None:
    ack, stored = await resume(app, topic, since, None)
    if not conn.alive:
        return
    if not ack.recovered:
        # The client must reload state: say so with a named event, then go live.
        body = ENCODER.encode({"topic": topic, "offset": ack.offset, "epoch": ack.epoch})
        app.hub.queue(conn, sse_chunk(b"event: reset\ndata: " + body + b"\n\n"))
        replay_to(app, conn, topic, ack.offset, [])
        return
    replay_to(app, conn, topic, since, stored)


def _sse_comment(text: bytes) -> bytes:
    return sse_chunk(b": " + text + b"\n\n")


# -- publish -------------------------------------------------------------------------------


async def publish(app: App, request: Request) -> Response:
    """``POST /api/publish``: one event or a batch; durable ones answer after the commit."""
    principal = authenticate(app, request)
    body = decode_json(request, PublishBody)
    items = _publish_items(app, body)
    checked: set[str] = set()
    for item in items:
        if item.topic not in checked:
            # A batch usually repeats a few topics: check each one once.
            try:
                validate_topic(item.topic)
            except TopicError as exc:
                raise ApiError("unprocessable", f"invalid topic: {exc}") from None
            reason = may_publish(principal, item.topic)
            if reason is not None:
                raise ApiError("forbidden", reason)
            checked.add(item.topic)
        reserved = RESERVED_FIELDS.intersection(item.data)
        if reserved:
            raise ApiError(
                "unprocessable",
                f"data may not contain envelope fields {sorted(reserved)} "
                f"(topic {item.topic!r}); rename them",
            )
    idem = idempotency(request, principal)
    if idem is not None:
        earlier = await replayed(app, idem)
        if earlier is not None:
            return earlier
    now_ms = int(time.time() * 1000)
    durable = [NewEvent(i.topic, i.event, ENCODER.encode(i.data)) for i in items if i.durable]
    for item in items:
        if not item.durable:
            json = event_json(item.topic, item.event, None, now_ms, ENCODER.encode(item.data))
            app.hub.publish(Prepared(item.topic, item.event, None, json))
    if not durable:
        return Response(200, _answer_body(items, [], app.epoch))

    def respond(stored: list[StoredEvent]) -> tuple[int, bytes]:
        return 200, _answer_body(items, stored, app.epoch)

    write = Write(durable, idem, respond if idem is not None else None)
    try:
        stored = await app.commit(write)
    except IdempotencyConflict as exc:
        return answer_of_conflict(exc, write)
    return Response(200, _answer_body(items, stored, app.epoch))


def _publish_items(app: App, body: PublishBody) -> list[PublishEvent]:
    if body.events is not None:
        if body.topic is not None or body.event is not None:
            raise ApiError("unprocessable", "send either topic/event/data or events, not both")
        if not body.events:
            raise ApiError("unprocessable", "events is empty; send at least one event")
        limit = app.config.realtime.max_publish_batch
        if len(body.events) > limit:
            raise ApiError(
                "payload_too_large",
                f"{len(body.events)} events in one publish, at most {limit} "
                f"(realtime.max_publish_batch)",
            )
        return body.events
    if body.topic is None or body.event is None:
        raise ApiError("unprocessable", "missing topic and event (or an events list)")
    return [PublishEvent(body.topic, body.event, body.data, body.durable)]


def _answer_body(items: list[PublishEvent], stored: list[StoredEvent], epoch: str) -> bytes:
    offsets = iter(stored)
    published = []
    for item in items:
        if item.durable:
            ev = next(offsets)
            published.append(PublishedItem(item.topic, item.event, ev.offset))
        else:
            published.append(PublishedItem(item.topic, item.event))
    return ENCODER.encode(PublishAnswer(published, epoch))
