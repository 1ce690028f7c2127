"""Hostile clients for a running etherd, each a plain function on raw sockets.

Every attack takes the target (``host``, ``port``) and its sizes and counts as arguments,
and returns what it measured (bytes sent, seconds, statuses) together with the sockets it
still holds, so a test can assert a bound and a soak can run the same attack at scale.
Nothing here knows how the server was started: memory is read from ``/proc/<pid>``, and
counters from ``GET /metrics``.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import http.client
import json
import os
import re
import select
import socket
import struct
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from tests.wsframes import OP_CLOSE, OP_TEXT, client_frame, parse_frame, recv_by

__all__ = [
    "Held",
    "SseReader",
    "WsReader",
    "chunk_extension",
    "get",
    "half_requests",
    "idle_connections",
    "limit_hits",
    "metric",
    "metrics",
    "pipeline_flood",
    "publish_backlog",
    "raw_request",
    "read_resume",
    "rss_bytes",
    "silent_connection",
    "sse_open",
    "stalled_resumes",
    "upgrade_flood",
    "ws_open",
    "ws_text_frame",
]


_METRIC_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")
_LABEL_RE = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


# -- measuring the server ------------------------------------------------------------------


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (``VmRSS`` from ``/proc/<pid>/status``), in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def get(
    host: str, port: int, path: str, token: str | None = None, timeout: float = 5.0
) -> tuple[int, bytes, float]:
    """One GET on a new connection: (status, body, seconds it took)."""
    started = time.monotonic()
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, body, time.monotonic() - started
    finally:
        conn.close()


def metrics(host: str, port: int, token: str = "test") -> dict[tuple[str, frozenset[Any]], float]:
    """Every sample of ``GET /metrics``: (name, frozenset of label pairs) -> value."""
    status, body, _ = get(host, port, "/metrics", token)
    if status != 200:
        raise RuntimeError(f"GET /metrics answered {status}: {body[:200]!r}")
    out: dict[tuple[str, frozenset[Any]], float] = {}
    for line in body.decode().splitlines():
        match = _METRIC_RE.match(line)
        if match is None or line.startswith("#"):
            continue
        labels = frozenset(_LABEL_RE.findall(match.group(2) or ""))
        out[(match.group(1), labels)] = float(match.group(3))
    return out


def metric(host: str, port: int, name: str, token: str = "test", **labels: str) -> float | None:
    """One sample's value, or None when the server exposes no such sample."""
    return metrics(host, port, token).get((name, frozenset(labels.items())))


def limit_hits(host: str, port: int, key: str, token: str = "test") -> float | None:
    """``etherd_limit_hits_total{limit=key}``, or None when it has no sample yet."""
    return metric(host, port, "etherd_limit_hits_total", token, limit=key)


# -- sockets held by an attack -------------------------------------------------------------


@dataclass
class Held:
    """Sockets an attack keeps open, and what it measured while opening them."""

    socks: list[socket.socket] = field(default_factory=list)
    sent: int = 0
    seconds: float = 0.0
    # Set when the server stopped taking bytes (the send made no progress for a while).
    stalled: bool = False
    # The first bytes the server answered, where the attack read any.
    answer: bytes = b""
    # WebSocket attacks: a reader per socket, holding what was read past the last frame.
    readers: list[WsReader] = field(default_factory=list)

    def close(self) -> None:
        """Close every socket (abortively: a hostile client does not say goodbye)."""
        for sock in self.socks:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        self.socks.clear()
        self.readers.clear()

    def __enter__(self) -> Held:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _connect(
    host: str, port: int, rcvbuf: int | None = None, timeout: float = 5.0
) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        # Before connect, so the advertised window is small from the first segment.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(timeout)
    sock.connect((host, port))
    return sock


def _push(
    sock: socket.socket, chunks: Iterator[bytes], total: int, seconds: float, stall_s: float
) -> tuple[int, bool]:
    """Write chunks without blocking until ``total`` bytes, ``seconds`` or ``stall_s`` of no
    progress; (bytes sent, whether it stalled)."""
    sock.setblocking(False)
    sent = 0
    deadline = time.monotonic() + seconds
    progress = time.monotonic()
    pending = b""
    try:
        while sent < total:
            now = time.monotonic()
            if now >= deadline:
                return sent, False
            if now - progress >= stall_s:
                return sent, True
            if not pending:
                pending = next(chunks)
            _, writable, _ = select.select([], [sock], [], min(0.05, deadline - now))
            if not writable:
                continue
            try:
                n = sock.send(pending)
            except BlockingIOError:
                continue
            except OSError as exc:
                if exc.errno in (errno.EPIPE, errno.ECONNRESET):
                    return sent, True
                raise
            sent += n
            pending = pending[n:]
            progress = time.monotonic()
        return sent, False
    finally:
        sock.setblocking(True)


# -- 1. answers nobody reads ---------------------------------------------------------------


def pipeline_flood(
    host: str,
    port: int,
    total_bytes: int = 8 * 1024 * 1024,
    path: str = "/healthz",
    seconds: float = 5.0,
    stall_s: float = 1.0,
    rcvbuf: int = 4096,
) -> Held:
    """Pipeline GET requests on one connection and never read an answer.

    Stops after ``total_bytes``, ``seconds``, or once the server has taken nothing for
    ``stall_s`` (it stopped reading). The socket stays open in the result.
    """
    request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    block = request * max(1, 65536 // len(request))
    sock = _connect(host, port, rcvbuf=rcvbuf)
    started = time.monotonic()
    sent, stalled = _push(sock, _repeat(block), total_bytes, seconds, stall_s)
    return Held([sock], sent, time.monotonic() - started, stalled)


def _repeat(block: bytes) -> Iterator[bytes]:
    while True:
        yield block


# -- events ----------------------------------------------------------------------------------


def publish_backlog(
    host: str,
    port: int,
    topic: str,
    count: int,
    size: int,
    token: str = "test",
    batch_bytes: int = 900_000,
) -> int:
    """Publish ``count`` durable events of about ``size`` bytes each to ``topic`` (batches
    under ``batch_bytes``, below the default ``http.max_body_bytes``); the last offset."""
    per_batch = max(1, batch_bytes // (size + 64))
    last = 0
    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        for first in range(0, count, per_batch):
            events = [
                {"topic": topic, "event": "blob", "data": {"seq": seq, "pad": "x" * size}}
                for seq in range(first, min(count, first + per_batch))
            ]
            body = json.dumps({"events": events}).encode()
            conn.request(
                "POST",
                "/api/publish",
                body=body,
                headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            )
            resp = conn.getresponse()
            answer = resp.read()
            if resp.status != 200:
                raise RuntimeError(f"publish answered {resp.status}: {answer[:300]!r}")
            last = int(json.loads(answer)["published"][-1]["offset"])
    finally:
        conn.close()
    return last


# -- WebSocket -------------------------------------------------------------------------------


def ws_text_frame(message: dict[str, Any] | bytes) -> bytes:
    """A masked client text frame carrying JSON (or the bytes given)."""
    payload = message if isinstance(message, bytes) else json.dumps(message).encode()
    return client_frame(OP_TEXT, payload)


class WsReader:
    """Frames from a WebSocket's server side, on a raw socket."""

    def __init__(self, sock: socket.socket, buf: bytes = b"") -> None:
        self.sock = sock
        self.buf = bytearray(buf)
        self.eof = False

    def frame(self, timeout: float = 5.0) -> tuple[int, bytes] | None:
        """The next (opcode, payload), or None once the server closed the TCP connection."""
        deadline = time.monotonic() + timeout
        while True:
            parsed = parse_frame(self.buf)
            if parsed is not None:
                frame, size = parsed
                del self.buf[:size]
                return frame.opcode, frame.payload
            if self.eof:
                return None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no whole frame within {timeout} s")
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(1 << 20)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                self.eof = True
            self.buf += chunk

    def json(self, timeout: float = 5.0) -> dict[str, Any]:
        """The next frame, which must be a JSON text message."""
        got = self.frame(timeout)
        if got is None or got[0] != OP_TEXT:
            raise AssertionError(f"expected a text frame, got {got!r}")
        value = json.loads(got[1])
        assert isinstance(value, dict), value
        return value

    def send(self, message: dict[str, Any]) -> None:
        """Send one JSON command."""
        self.sock.sendall(ws_text_frame(message))


def ws_open(
    host: str, port: int, token: str = "test", rcvbuf: int | None = None, timeout: float = 5.0
) -> WsReader:
    """A WebSocket to ``/api/realtime`` on a raw socket, past the 101."""
    sock = _connect(host, port, rcvbuf=rcvbuf, timeout=timeout)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET /api/realtime?token={token} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        f"Sec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError(f"closed during the handshake: {head!r}")
        head += chunk
    head, _, rest = head.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101"):
        sock.close()
        raise ConnectionError(f"no upgrade: {head!r}")
    return WsReader(sock, rest)


def _subscribed(reader: WsReader, timeout: float) -> dict[str, Any]:
    """Skip to the ``subscribed`` reply (events may not come before it)."""
    reply = reader.json(timeout)
    if reply.get("type") != "subscribed":
        raise AssertionError(f"expected the subscribed reply, got {reply!r}")
    return reply


def stalled_resumes(
    host: str,
    port: int,
    topic: str,
    count: int,
    since: int = 0,
    token: str = "test",
    rcvbuf: int = 4096,
) -> tuple[Held, list[dict[str, Any]]]:
    """``count`` WebSockets that resume ``topic`` from ``since`` and, past the subscribed
    reply, never read again; (the held sockets, their subscribed replies)."""
    held = Held()
    replies: list[dict[str, Any]] = []
    started = time.monotonic()
    try:
        for n in range(count):
            reader = ws_open(host, port, token, rcvbuf=rcvbuf)
            held.socks.append(reader.sock)
            held.readers.append(reader)
            reader.send(
                {"action": "subscribe", "topics": [topic], "since": {topic: since}, "id": n}
            )
            replies.append(_subscribed(reader, 10.0))
    except BaseException:
        held.close()
        raise
    held.seconds = time.monotonic() - started
    return held, replies


@dataclass
class Resume:
    """What a resuming WebSocket client got."""

    reply: dict[str, Any]
    offsets: list[int]
    close_code: int | None
    seconds: float


def read_resume(
    host: str,
    port: int,
    topic: str,
    expect: int,
    since: int = 0,
    token: str = "test",
    timeout: float = 20.0,
) -> Resume:
    """Resume ``topic`` from ``since`` and read as fast as possible until ``expect`` events
    arrived, the server closed, or ``timeout``."""
    reader = ws_open(host, port, token)
    started = time.monotonic()
    deadline = started + timeout
    offsets: list[int] = []
    close_code: int | None = None
    try:
        reader.send({"action": "subscribe", "topics": [topic], "since": {topic: since}, "id": 1})
        reply = _subscribed(reader, timeout)
    except BaseException:
        reader.sock.close()
        raise
    try:
        while len(offsets) < expect:
            got = reader.frame(max(0.01, deadline - time.monotonic()))
            if got is None:
                break
            opcode, payload = got
            if opcode == OP_CLOSE:
                close_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                break
            if opcode == OP_TEXT:
                offsets.append(int(json.loads(payload)["offset"]))
    except TimeoutError:
        pass
    finally:
        reader.sock.close()
    return Resume(reply, offsets, close_code, time.monotonic() - started)


# -- SSE -------------------------------------------------------------------------------------


def sse_open(
    host: str,
    port: int,
    path: str,
    headers: Iterable[tuple[str, str]] = (),
    rcvbuf: int | None = None,
) -> socket.socket:
    """Send a GET for an event stream on a new socket; the answer is left unread."""
    sock = _connect(host, port, rcvbuf=rcvbuf)
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}:{port}", *(f"{k}: {v}" for k, v in headers)]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    return sock


class SseReader:
    """An event stream read from a raw socket: the head, then de-chunked events."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.raw = bytearray()
        self.body = bytearray()
        self.status = 0
        self.head = b""
        self.ended = False  # the last chunk came
        self.eof = False

    def _fill(self, deadline: float) -> bool:
        if self.eof:
            return False
        chunk = recv_by(self.sock, deadline, 1 << 20)
        if chunk is None:
            return False
        if not chunk:
            self.eof = True
            return False
        self.raw += chunk
        return True

    def read_head(self, timeout: float = 5.0) -> int:
        """The status of the next answer; a non-streaming answer's body is read whole
        (into ``body``), so pipelined answers can be read one after the other."""
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in self.raw:
            if not self._fill(deadline):
                raise AssertionError(f"no response head: {bytes(self.raw)!r}")
        head, _, rest = bytes(self.raw).partition(b"\r\n\r\n")
        self.head = head
        self.status = int(head.split()[1])
        self.raw = bytearray(rest)
        length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
        if length is not None:
            size = int(length.group(1))
            while len(self.raw) < size and self._fill(deadline):
                pass
            self.body = self.raw[:size]
            del self.raw[:size]
        return self.status

    def _dechunk(self) -> None:
        while not self.ended:
            line_end = self.raw.find(b"\r\n")
            if line_end < 0:
                return
            size = int(bytes(self.raw[:line_end]).split(b";")[0], 16)
            if len(self.raw) < line_end + 2 + size + 2:
                return
            self.body += self.raw[line_end + 2 : line_end + 2 + size]
            del self.raw[: line_end + 2 + size + 2]
            if size == 0:
                self.ended = True

    def event(self, timeout: float = 5.0) -> dict[str, Any] | None:
        """The next event's fields (``data`` decoded as JSON), or None once the stream
        ended or the connection closed."""
        deadline = time.monotonic() + timeout
        while True:
            self._dechunk()
            end = self.body.find(b"\n\n")
            if end >= 0:
                block = bytes(self.body[:end]).decode()
                del self.body[: end + 2]
                fields: dict[str, Any] = {}
                for line in block.split("\n"):
                    if line.startswith(":"):
                        continue
                    name, _, value = line.partition(":")
                    fields[name] = value.removeprefix(" ")
                if not fields:
                    continue  # a comment (heartbeat)
                if "data" in fields:
                    fields["data"] = json.loads(fields["data"])
                return fields
            if self.ended:
                return None
            if not self._fill(deadline):
                if self.eof:
                    return None
                raise TimeoutError(f"no event within {timeout} s")


# -- 3. bytes after an upgrade request -------------------------------------------------------


def upgrade_flood(
    host: str,
    port: int,
    path: str,
    total_bytes: int = 300 * 1024 * 1024,
    seconds: float = 3.0,
    stall_s: float = 1.0,
    before: bytes = b"",
) -> Held:
    """A GET for ``path`` that asks for a WebSocket upgrade, then junk bytes after it.

    ``before`` is sent first on the same connection (requests pipelined ahead of it, so
    the junk flows while they are handled). Stops after ``total_bytes``, ``seconds``, or
    ``stall_s`` with nothing taken. The socket stays open in the result; ``answer`` is
    what the server had sent when the flood ended.
    """
    sock = _connect(host, port)
    sock.sendall(
        before
        + f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: Upgrade\r\n"
        f"Upgrade: websocket\r\n\r\n".encode()
    )
    junk = os.urandom(64) * 4096
    started = time.monotonic()
    sent, stalled = _push(sock, _repeat(junk), total_bytes, seconds, stall_s)
    elapsed = time.monotonic() - started
    sock.settimeout(5.0)
    answer = sock.recv(65536)
    return Held([sock], sent, elapsed, stalled, answer)


# -- 7. connections that say nothing ---------------------------------------------------------


def idle_connections(host: str, port: int, count: int) -> Held:
    """``count`` connections that send nothing."""
    held = Held()
    for _ in range(count):
        held.socks.append(_connect(host, port))
    return held


def half_requests(host: str, port: int, count: int) -> Held:
    """``count`` connections each stopped in the middle of a request head."""
    held = Held()
    for _ in range(count):
        sock = _connect(host, port)
        sock.sendall(f"GET /healthz HTTP/1.1\r\nHost: {host}\r\nX-Pad: ".encode())
        held.socks.append(sock)
    return held


def silent_connection(host: str, port: int, timeout: float = 10.0) -> float | None:
    """Connect, send nothing, and wait: seconds until the server closed it (None: it did
    not within ``timeout``)."""
    with _connect(host, port) as sock:
        started = time.monotonic()
        sock.settimeout(timeout)
        try:
            while sock.recv(4096):
                pass
        except TimeoutError:
            return None
        except ConnectionResetError:
            pass
        return time.monotonic() - started


def raw_request(host: str, port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send bytes and read until the server closes (or ``timeout``)."""
    with _connect(host, port, timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except (TimeoutError, ConnectionResetError):
            pass
        return b"".join(chunks)


def chunk_extension(
    host: str,
    port: int,
    ext_bytes: int,
    token: str = "test",
    split: bool = True,
    timeout: float = 5.0,
) -> bytes:
    """A chunked POST /api/publish whose first chunk header carries ``ext_bytes`` of
    extension; the server's answers (read until it closes or ``timeout``).

    With ``split`` the head asks for ``100 Continue`` and the chunk header is sent only
    once it came, so the extension reaches the server in reads of its own, as from a
    client that streams a header that never ends; else everything goes in one write.
    """
    body = b'{"topic":"attack/ext","event":"note","data":{}}'
    expect = "Expect: 100-continue\r\n" if split else ""
    head = (
        f"POST /api/publish HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
        f"Connection: close\r\n{expect}\r\n"
    ).encode()
    chunk_head = f"{len(body):x}".encode() + b";x=" + b"a" * max(0, ext_bytes - 3)
    rest = b"\r\n" + body + b"\r\n0\r\n\r\n"
    if not split:
        return raw_request(host, port, head + chunk_head + rest, timeout)
    with _connect(host, port, timeout=timeout) as sock:
        sock.sendall(head)
        got = b""
        while b"\r\n\r\n" not in got:
            chunk = sock.recv(4096)
            if not chunk:
                return got
            got += chunk
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(chunk_head)
            # The rest only if the server has not answered the header by itself: sent at
            # once, it could share a read with the header and hide it among body bytes.
            answered, _, _ = select.select([sock], [], [], 1.0)
            if not answered:
                sock.sendall(rest)
        try:
            while chunk := sock.recv(65536):
                got += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        return got
