"""What etherd puts on the NATS bus between nodes: subjects, and the event message.

Subjects
--------
A topic maps to the subject ``{prefix}.t.{segment}.{segment}...`` (contract section 11).
NATS separates tokens with ``.``, which a topic segment may contain, so each segment is
escaped, injectively: ``_`` becomes ``_u`` and ``.`` becomes ``_d``; every other character
a topic may hold (``A-Za-z0-9:-``) is a valid subject character as it is. A pattern maps the
same way with its wildcards kept as NATS wildcards (``*`` one token, ``>`` the rest, which
is what they mean in etherd too), so a node subscribes to exactly the subjects its local
subscribers need and NATS does the matching. ``topic_of`` inverts ``subject_of``.

Event message
-------------
The committing node encodes an event's envelope once (the JSON every subscriber gets) and
sends it as it is, after a small binary head, so a receiving node never decodes or
re-encodes an event it only fans out::

    u8 version (1) | u64 offset (0: not durable) | u64 commit time (ms) | u16 len | topic |
    u8 len | event | JSON

The commit time lets the receiver measure how late an event reaches it (cross-node lag).

``decode_event`` answers ``None`` for anything else (a foreign or malformed message), which
the receiver counts and drops.
"""

from __future__ import annotations

import struct
from typing import Final, NamedTuple

from etherd.core.topics import TopicError, validate_topic

__all__ = [
    "BusEvent",
    "decode_event",
    "encode_event",
    "pattern_subject",
    "subject_of",
    "topic_of",
]

VERSION: Final = 1
_HEAD: Final = struct.Struct(">BQQH")
_TOPICS: Final = "t"


def _escape(segment: str) -> str:
    return segment.replace("_", "_u").replace(".", "_d")


def _unescape(token: str) -> str | None:
    out: list[str] = []
    i = 0
    n = len(token)
    while i < n:
        ch = token[i]
        if ch != "_":
            out.append(ch)
            i += 1
            continue
        if i + 1 >= n:
            return None
        code = token[i + 1]
        if code == "u":
            out.append("_")
        elif code == "d":
            out.append(".")
        else:
            return None
        i += 2
    return "".join(out)


def subject_of(prefix: str, topic: str) -> str:
    """The subject a (valid, concrete) topic's events travel on."""
    return prefix + "." + _TOPICS + "." + ".".join(_escape(s) for s in topic.split("/"))


def pattern_subject(prefix: str, pattern: str) -> str:
    """The subject to subscribe to for a (valid) pattern or topic: wildcards stay wildcards."""
    tokens = [s if s in ("*", ">") else _escape(s) for s in pattern.split("/")]
    return prefix + "." + _TOPICS + "." + ".".join(tokens)


def topic_of(prefix: str, subject: str) -> str | None:
    """The topic of an event subject, or None for a subject that is not one of ours."""
    head = prefix + "." + _TOPICS + "."
    if not subject.startswith(head):
        return None
    segments = []
    for token in subject[len(head) :].split("."):
        segment = _unescape(token)
        if not segment:
            return None
        segments.append(segment)
    return "/".join(segments)


class BusEvent(NamedTuple):
    """An event as it arrives from another node."""

    topic: str
    # None for a non-durable event.
    offset: int | None
    # When the committing node committed (or published) it, in ms since the epoch.
    ts_ms: int
    event: str
    # The envelope every subscriber gets, exactly as the committing node encoded it.
    json: bytes


def encode_event(topic: str, offset: int | None, ts_ms: int, event: str, json: bytes) -> bytes:
    """The bus message of one event."""
    t = topic.encode()
    e = event.encode()
    return _HEAD.pack(VERSION, offset or 0, ts_ms, len(t)) + t + bytes((len(e),)) + e + json


def decode_event(data: bytes) -> BusEvent | None:
    """The event in a bus message, or None when it is not a well-formed one."""
    try:
        version, offset, ts_ms, tlen = _HEAD.unpack_from(data)
        if version != VERSION:
            return None
        pos = _HEAD.size
        raw_topic = data[pos : pos + tlen]
        pos += tlen
        elen = data[pos]
        raw_event = data[pos + 1 : pos + 1 + elen]
        body = data[pos + 1 + elen :]
        topic = raw_topic.decode("ascii")
        event = raw_event.decode("ascii")
    except (struct.error, IndexError, UnicodeDecodeError):
        return None
    if len(raw_topic) != tlen or len(raw_event) != elen or not elen or not body.startswith(b"{"):
        return None
    try:
        validate_topic(topic)
    except TopicError:
        return None
    return BusEvent(topic, offset or None, ts_ms, event, body)
