"""The server side of RFC 6455 framing, sans I/O: the opening handshake's answer, a parser
for the frames a client sends, and the control frames a server sends.

``FrameParser.feed(bytes)`` returns the frames completed by those bytes, in order. A frame
that breaks the protocol ends the list with the ``Disconnect`` the connection must close
with (the frames before it are still delivered, so a CLOSE followed by garbage in one
packet is seen as a CLOSE). Client frames must be masked (section 5.3) and carry no RSV
bits (no extension is negotiated); control frames are at most 125 bytes and never
fragmented (section 5.5); a data frame longer than ``max_payload`` is refused from its
header alone, so a client can never make the parser hold more than one frame of at most
``max_payload`` bytes.

What a whole message means (reassembly, UTF-8, the close handshake) is the connection's
business (``edge.ws.framing``); this module only turns bytes into frames and back.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Final, NamedTuple

from etherd.core.errors import Disconnect, message_too_big, protocol_error

__all__ = [
    "OP_BINARY",
    "OP_CLOSE",
    "OP_CONTINUATION",
    "OP_PING",
    "OP_PONG",
    "OP_TEXT",
    "PING",
    "Frame",
    "FrameParser",
    "accept_key",
    "binary_frame",
    "close_frame",
    "pong_frame",
    "unmask",
]

OP_CONTINUATION: Final = 0x0
OP_TEXT: Final = 0x1
OP_BINARY: Final = 0x2
OP_CLOSE: Final = 0x8
OP_PING: Final = 0x9
OP_PONG: Final = 0xA
_KNOWN: Final = frozenset({OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG})

# RFC 6455 section 1.3: the GUID the accept key is derived with.
_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
# A ping with no payload, as the server sends it.
PING: Final = b"\x89\x00"


class Frame(NamedTuple):
    """One frame from the client, unmasked."""

    opcode: int
    fin: bool
    payload: bytes


def accept_key(key: str) -> str:
    """``Sec-WebSocket-Accept`` for a client's ``Sec-WebSocket-Key`` (section 4.2.2)."""
    digest = hashlib.sha1(key.strip().encode("ascii") + _GUID).digest()
    return base64.b64encode(digest).decode("ascii")


def unmask(payload: bytes | bytearray | memoryview, mask: bytes) -> bytes:
    """XOR ``payload`` with the 4-byte ``mask`` repeated (section 5.3), in C-speed big ints."""
    n = len(payload)
    if not n:
        return b""
    key = (mask * ((n >> 2) + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")


def close_frame(code: int, reason: bytes = b"") -> bytes:
    """A CLOSE frame with a status code and a reason of at most 123 bytes."""
    payload = code.to_bytes(2, "big") + reason[:123]
    return bytes((0x88, len(payload))) + payload


def pong_frame(payload: bytes) -> bytes:
    """The PONG answering a PING: the same payload (at most 125 bytes)."""
    return bytes((0x8A, len(payload))) + payload


def binary_frame(payload: bytes) -> bytes:
    """An unmasked, final BINARY frame (the conformance echo sends them back)."""
    n = len(payload)
    if n < 126:
        return bytes((0x82, n)) + payload
    if n < 65536:
        return b"\x82\x7e" + n.to_bytes(2, "big") + payload
    return b"\x82\x7f" + n.to_bytes(8, "big") + payload


class FrameParser:
    """Incremental parser of client frames (see the module docstring)."""

    __slots__ = ("_buf", "_max")

    def __init__(self, max_payload: int) -> None:
        self._max = max_payload
        # Bytes of a frame not yet complete; empty between frames (the usual case).
        self._buf = bytearray()

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete frame."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Frame | Disconnect]:
        """Parse ``data``; the frames it completes, possibly ending with a ``Disconnect``."""
        buf: bytes | bytearray
        if self._buf:
            self._buf += data
            buf = self._buf
        else:
            buf = data
        out: list[Frame | Disconnect] = []
        pos = 0
        end = len(buf)
        max_payload = self._max
        while end - pos >= 2:
            b0 = buf[pos]
            b1 = buf[pos + 1]
            opcode = b0 & 0x0F
            fin = bool(b0 & 0x80)
            if b0 & 0x70:
                out.append(protocol_error("reserved bits are set but no extension was agreed"))
                break
            if opcode not in _KNOWN:
                out.append(protocol_error(f"unknown opcode {opcode:#x}"))
                break
            if not b1 & 0x80:
                out.append(protocol_error("client frames must be masked (RFC 6455 section 5.3)"))
                break
            length = b1 & 0x7F
            head = 2
            if length == 126:
                if end - pos < 4:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 4], "big")
                head = 4
            elif length == 127:
                if end - pos < 10:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                head = 10
                if length >> 63:
                    out.append(protocol_error("frame length has the most significant bit set"))
                    break
            if opcode >= OP_CLOSE:
                if length > 125:
                    out.append(protocol_error("control frame payload over 125 bytes"))
                    break
                if not fin:
                    out.append(protocol_error("fragmented control frame"))
                    break
            elif length > max_payload:
                out.append(message_too_big(length, max_payload))
                break
            start = pos + head + 4
            stop = start + length
            if stop > end:
                break
            mask = bytes(buf[pos + head : start])
            out.append(Frame(opcode, fin, unmask(buf[start:stop], mask)))
            pos = stop
        if out and isinstance(out[-1], Disconnect):
            self._buf = bytearray()
        elif buf is self._buf:
            del self._buf[:pos]
        elif pos < end:
            self._buf = bytearray(buf[pos:])
        return out
