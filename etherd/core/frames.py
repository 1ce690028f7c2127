"""The bytes of each wire variant an event or reply is sent in, built once.

Two variants exist: a WebSocket TEXT frame (RFC 6455 section 5.2, unmasked as a server
sends it) and a ``text/event-stream`` event inside one HTTP/1.1 chunk (RFC 9112 section
7.1), for Server-Sent Events. Pure functions of bytes.
"""

from __future__ import annotations

__all__ = ["sse_chunk", "sse_event", "ws_text_frame"]


def ws_text_frame(payload: bytes) -> bytes:
    """An unmasked, final TEXT frame carrying ``payload``."""
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 65536:
        return b"\x81\x7e" + n.to_bytes(2, "big") + payload
    return b"\x81\x7f" + n.to_bytes(8, "big") + payload


def sse_chunk(text: bytes) -> bytes:
    """Text of a ``text/event-stream`` body as one HTTP/1.1 chunk."""
    return b"%x\r\n%s\r\n" % (len(text), text)


def sse_event(event: str, data: bytes, ident: int | None = None) -> bytes:
    """One SSE event (``id:`` when given, ``event:``, ``data:``) as one chunk.

    ``data`` is one line of JSON (msgspec never writes a raw newline inside it).
    """
    head = b"" if ident is None else b"id: %d\n" % ident
    return sse_chunk(head + b"event: " + event.encode() + b"\ndata: " + data + b"\n\n")
