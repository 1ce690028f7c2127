"""WebSocket frames for the raw-socket tests: client frames as they send them, server
frames as they read them."""

from __future__ import annotations

import json
import os
import socket
import struct
import time
from typing import Any, NamedTuple

__all__ = ["OP_CLOSE", "OP_TEXT", "Frame", "client_frame", "parse_frame", "recv_by"]

OP_TEXT, OP_CLOSE = 0x1, 0x8


class Frame(NamedTuple):
    fin: bool
    opcode: int
    payload: bytes

    @property
    def close_code(self) -> int | None:
        assert self.opcode == OP_CLOSE, self
        return struct.unpack("!H", self.payload[:2])[0] if len(self.payload) >= 2 else None

    def json(self) -> dict[str, Any]:
        assert self.opcode == OP_TEXT, self
        value = json.loads(self.payload)
        assert isinstance(value, dict), value
        return value


def parse_frame(buf: bytes | bytearray) -> tuple[Frame, int] | None:
    """One server frame from the front of ``buf`` and its size, or None if incomplete."""
    if len(buf) < 2:
        return None
    b0, b1 = buf[0], buf[1]
    assert not b1 & 0x80, "a server must not mask its frames"
    assert not b0 & 0x70, "reserved bits set though no extension was negotiated"
    n = b1 & 0x7F
    pos = 2
    if n == 126:
        if len(buf) < 4:
            return None
        n = struct.unpack_from("!H", buf, 2)[0]
        pos = 4
    elif n == 127:
        if len(buf) < 10:
            return None
        n = struct.unpack_from("!Q", buf, 2)[0]
        pos = 10
    if len(buf) < pos + n:
        return None
    return Frame(bool(b0 & 0x80), b0 & 0x0F, bytes(buf[pos : pos + n])), pos + n


def client_frame(opcode: int, payload: bytes = b"", *, fin: bool = True) -> bytes:
    """A masked frame, as a client must send it (RFC 6455 section 5.3)."""
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    key = os.urandom(4)
    mask = (key * (n // 4 + 1))[:n]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(mask, "big")).to_bytes(n, "big")
    return head + key + masked


def recv_by(sock: socket.socket, deadline: float, size: int = 262144) -> bytes | None:
    """The next bytes from ``sock``: ``b""`` once the peer closed (or reset) the
    connection, None when ``deadline`` (monotonic) passed first."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        return None
    sock.settimeout(remaining)
    try:
        return sock.recv(size)
    except TimeoutError:
        return None
    except ConnectionResetError:
        return b""
