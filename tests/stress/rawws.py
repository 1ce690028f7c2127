"""A WebSocket client on a plain blocking socket, for clients that misbehave on purpose:
they never read, never answer pings, or send frames no library would send."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import struct
import time
from typing import Any

from tests.wsframes import parse_frame

OP_TEXT = 0x1
OP_CLOSE = 0x8
OP_PING = 0x9
OP_CONT = 0x0


def frame(
    opcode: int, payload: bytes, *, fin: bool = True, mask: bool = True, rsv: int = 0
) -> bytes:
    """One client frame (masked unless told otherwise)."""
    head = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
    n = len(payload)
    bit = 0x80 if mask else 0
    if n < 126:
        head += bytes([bit | n])
    elif n < 1 << 16:
        head += bytes([bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    body = bytes(b ^ key[i & 3] for i, b in enumerate(payload)) if n < 4096 else _xor(payload, key)
    return head + key + body


def _xor(payload: bytes, key: bytes) -> bytes:
    # int arithmetic over the whole buffer: far faster than a byte loop for large payloads.
    n = len(payload)
    mask = int.from_bytes((key * (n // 4 + 1))[:n], "big")
    return (int.from_bytes(payload, "big") ^ mask).to_bytes(n, "big")


def text(command: dict[str, Any] | bytes) -> bytes:
    """A masked text frame of a JSON command (or of raw bytes)."""
    raw = command if isinstance(command, bytes) else json.dumps(command).encode()
    return frame(OP_TEXT, raw)


def upgrade_request(port: int, token: str = "test", path: str = "/api/realtime") -> bytes:
    """The HTTP upgrade request of a WebSocket handshake."""
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {path}?token={token} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def parse(buf: bytearray) -> tuple[int, bytes] | None:
    """Take one server frame off the front of ``buf``: (opcode, payload), or None if
    it is not all there yet."""
    got = parse_frame(buf)
    if got is None:
        return None
    frame, size = got
    del buf[:size]
    return frame.opcode, frame.payload


def close_code(payload: bytes) -> int:
    """The status code of a CLOSE payload (1005 when it has none)."""
    return int(struct.unpack("!H", payload[:2])[0]) if len(payload) >= 2 else 1005


class RawWs:
    """A handshaken WebSocket on a blocking socket; the caller decides when to read."""

    def __init__(
        self, port: int, token: str = "test", rcvbuf: int | None = None, timeout: float = 10.0
    ) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            # Before connect, so the window the server sees is small from the start.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(timeout)
        sock.connect(("127.0.0.1", port))
        self.sock = sock
        self.buf = bytearray()
        sock.sendall(upgrade_request(port, token))
        while b"\r\n\r\n" not in self.buf:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed during the handshake")
            self.buf += chunk
        head, _, rest = bytes(self.buf).partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            raise ConnectionError(head.decode(errors="replace"))
        self.buf = bytearray(rest)

    def send(self, data: bytes) -> None:
        """Send raw bytes (frames built with ``frame``/``text``)."""
        self.sock.sendall(data)

    def recv_frame(self, timeout: float = 10.0) -> tuple[int, bytes] | None:
        """The next frame, or None at EOF or after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            got = parse(self.buf)
            if got is not None:
                return got
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(262144)
            except (TimeoutError, ConnectionError):
                return None
            if not chunk:
                return None
            self.buf += chunk

    def recv_json(self, timeout: float = 10.0) -> dict[str, Any]:
        """The next text frame as JSON (pings skipped, unanswered)."""
        while True:
            got = self.recv_frame(timeout)
            if got is None:
                raise TimeoutError("no frame")
            opcode, payload = got
            if opcode == OP_TEXT:
                decoded: dict[str, Any] = json.loads(payload)
                return decoded
            if opcode == OP_CLOSE:
                raise ConnectionError(f"closed with {close_code(payload)}")

    def subscribe(self, topics: list[str]) -> dict[str, Any]:
        """Subscribe and return the ``subscribed`` reply."""
        self.send(text({"action": "subscribe", "topics": topics, "id": "s"}))
        while True:
            reply = self.recv_json()
            if reply.get("type") == "subscribed":
                return reply

    def read_until_close(self, timeout: float) -> int | None:
        """Read (never answering pings) until the server's CLOSE; its code, or None if the
        connection ended without one or ``timeout`` passed."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.recv_frame(max(0.0, deadline - time.monotonic()))
            if got is None:
                return None
            if got[0] == OP_CLOSE:
                return close_code(got[1])

    def close(self) -> None:
        """Drop the socket."""
        self.sock.close()

    def __enter__(self) -> RawWs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def post_raw(port: int, path: str, body: bytes, token: str = "test") -> int:
    """POST ``body`` on a raw socket and return the status. Sending stops quietly if the
    server answers (and closes) before taking the whole body, as it may for a 413."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head)
        with contextlib.suppress(OSError):
            sock.sendall(body)
        answer = b""
        while b"\r\n" not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    return int(answer.split(b" ", 2)[1])
