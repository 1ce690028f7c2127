"""The wire schema: WebSocket commands and replies, API bodies, and the event envelope.

Commands are decoded straight into Structs (a tagged union on ``action``), so a malformed
command is answered with msgspec's own precise message (``Expected `array`, got `str` - at
`$.topics```). Events are encoded once per publish: the envelope is written as bytes in
front of the event's own JSON object, so user data passes through without a decode.
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal

import msgspec

from etherd.core.rfc3339 import rfc3339_ms

__all__ = [
    "COMMAND_DECODER",
    "ENCODER",
    "MAX_INT",
    "Command",
    "ErrorBody",
    "ErrorReply",
    "Offset",
    "Ping",
    "Pong",
    "Presence",
    "PresenceReply",
    "Publish",
    "PublishBody",
    "PublishEvent",
    "Published",
    "Refresh",
    "Refreshed",
    "Subscribe",
    "Subscribed",
    "TopicAck",
    "TopicRefusal",
    "Unsubscribe",
    "Unsubscribed",
    "event_json",
]

# Event names are printed into the envelope without escaping, so they are restricted to a
# charset that never needs it.
EVENT_NAME_RE: Final = r"^[A-Za-z0-9_.:\-]{1,128}$"
RESERVED_FIELDS: Final = frozenset({"type", "event", "topic", "offset", "ts"})

# Offsets, counts and other numbers a client sends are 63-bit: the stores keep 64-bit signed
# integers, and a larger number must be refused at the edge, never reach the store.
MAX_INT: Final = 2**63 - 1
Offset = Annotated[int, msgspec.Meta(ge=0, le=MAX_INT)]

RequestId = str | int | None
EventName = Annotated[str, msgspec.Meta(pattern=EVENT_NAME_RE)]
TopicList = Annotated[list[str], msgspec.Meta(min_length=1)]


# --- client -> server -------------------------------------------------------------------


class Subscribe(msgspec.Struct, tag_field="action", tag="subscribe", gc=False):
    topics: TopicList
    id: RequestId = None
    # Resume positions: replay retained events with offset > since[topic], then go live.
    since: dict[str, Offset] | None = None
    # The epoch the positions belong to (from an earlier ack); another epoch cannot resume.
    epoch: str | None = None


class Unsubscribe(msgspec.Struct, tag_field="action", tag="unsubscribe", gc=False):
    topics: TopicList
    id: RequestId = None


class Ping(msgspec.Struct, tag_field="action", tag="ping", gc=False):
    id: RequestId = None


class Publish(msgspec.Struct, tag_field="action", tag="publish", gc=False):
    """Publish one event over the socket (contract section 4); same rules as the HTTP API."""

    topic: str
    event: EventName
    data: dict[str, msgspec.Raw] = msgspec.field(default_factory=dict)
    durable: bool = True
    id: RequestId = None


class Refresh(msgspec.Struct, tag_field="action", tag="refresh", gc=False):
    """Replace the connection's token without reconnecting."""

    token: str
    id: RequestId = None


class Presence(msgspec.Struct, tag_field="action", tag="presence", gc=False):
    """How many subscribers a topic has (across every node of a cluster)."""

    topic: str
    id: RequestId = None


Command = Subscribe | Unsubscribe | Ping | Publish | Refresh | Presence
COMMAND_DECODER: Final = msgspec.json.Decoder(Command)


# --- server -> client -------------------------------------------------------------------


class TopicAck(msgspec.Struct, gc=False):
    topic: str
    # Newest offset of the topic at subscribe time (0 when nothing was ever stored).
    offset: int
    epoch: str
    # False when a requested resume position could not be honoured in full.
    recovered: bool


class TopicRefusal(msgspec.Struct, gc=False):
    topic: str
    code: str
    message: str


class Subscribed(msgspec.Struct, tag_field="type", tag="subscribed", gc=False):
    id: RequestId
    topics: list[TopicAck]
    errors: list[TopicRefusal]


class Unsubscribed(msgspec.Struct, tag_field="type", tag="unsubscribed", gc=False):
    id: RequestId
    topics: list[str]


class Pong(msgspec.Struct, tag_field="type", tag="pong", gc=False):
    id: RequestId = None


class Published(msgspec.Struct, tag_field="type", tag="published", gc=False, omit_defaults=True):
    id: RequestId
    topic: str
    # None (left out) for a non-durable event.
    offset: int | None = None


class Refreshed(msgspec.Struct, tag_field="type", tag="refreshed", gc=False):
    id: RequestId
    # The new token's expiry (unix seconds), or None when it has none.
    exp: float | None


class PresenceReply(msgspec.Struct, tag_field="type", tag="presence", gc=False):
    id: RequestId
    topic: str
    subscribers: int


class ErrorReply(msgspec.Struct, tag_field="type", tag="error", gc=False):
    id: RequestId
    code: str
    message: str


# --- HTTP bodies ------------------------------------------------------------------------


class ErrorDetail(msgspec.Struct, gc=False):
    code: str
    message: str


class ErrorBody(msgspec.Struct, gc=False):
    error: ErrorDetail


class PublishEvent(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    topic: str
    event: EventName
    # The event's own fields; kept as raw JSON and passed through untouched.
    data: dict[str, msgspec.Raw] = msgspec.field(default_factory=dict)
    durable: bool = True


class PublishBody(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """``POST /api/publish``: one event, or ``{"events": [...]}`` for a batch."""

    topic: str | None = None
    event: EventName | None = None
    data: dict[str, msgspec.Raw] = msgspec.field(default_factory=dict)
    durable: bool = True
    events: list[PublishEvent] | None = None


class PublishedItem(msgspec.Struct, gc=False, omit_defaults=True):
    topic: str
    event: str
    offset: int | None = None


class PublishAnswer(msgspec.Struct, gc=False):
    published: list[PublishedItem]
    epoch: str


ENCODER: Final = msgspec.json.Encoder()


def event_json(topic: str, event: str, offset: int | None, ts_ms: int, data: bytes) -> bytes:
    """The JSON object a subscriber receives: the envelope, then the event's own fields.

    ``data`` is the event's fields as one JSON object; ``topic`` and ``event`` are already
    validated against charsets that need no escaping, so the envelope is plain bytes.
    """
    head = b'{"type":"%s","event":"%s","topic":"%s",' % (
        event.encode(),
        event.encode(),
        topic.encode(),
    )
    if offset is not None:
        head += b'"offset":%d,' % offset
    head += b'"ts":"%s"' % rfc3339_ms(ts_ms).encode()
    body = data.strip()
    if body == b"{}" or not body:
        return head + b"}"
    return head + b"," + body[1:].lstrip()


def error_body(code: str, message: str) -> bytes:
    """The HTTP error body of contract section 8."""
    return ENCODER.encode(ErrorBody(ErrorDetail(code, message)))


# --- task API bodies (contract section 7) -------------------------------------------------


class CreateTaskBody(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    prompt: str
    title: str | None = None
    definition_of_done: str | None = None
    scope: dict[str, Any] = msgspec.field(default_factory=dict)
    context_refs: list[Any] = msgspec.field(default_factory=list)
    # Only service and admin tokens may create a task for someone else.
    owner: str | None = None


class ClaimBody(msgspec.Struct, gc=False):
    # Defaults to the X-Ether-Harness-App header.
    app_id: str | None = None


class RunBody(msgspec.Struct, gc=False):
    run_id: str


class HeartbeatBody(msgspec.Struct, gc=False):
    run_id: str
    # True once the harness heard the answer an earlier heartbeat told: stop repeating it.
    answer_seen: bool = False


class StepBody(msgspec.Struct, gc=False):
    run_id: str
    phase: str
    user_message: str
    internal_label: str = ""


class InterruptBody(msgspec.Struct, gc=False):
    run_id: str
    question: str
    options: list[str] = msgspec.field(default_factory=list)


class ResultBody(msgspec.Struct, gc=False):
    run_id: str
    status: Literal["submitted", "no_changes", "blocked", "failed"]
    agent_status: str = ""
    artifact: dict[str, Any] | None = None
    working_summary: str | None = None
    question: str | None = None
    options: list[str] = msgspec.field(default_factory=list)
    error: str | None = None


class AnswerBody(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    answer: str = ""
    option: str | None = None
