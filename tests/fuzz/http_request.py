"""Fuzz the HTTP/1.1 edge: bytes in, answers or a close out.

The real ``HttpConnection`` runs on a real event loop over a fake transport that records
what it is asked to do and behaves as asyncio's does: ``close`` reports
``connection_lost`` on the next loop iteration, a paused transport delivers nothing until
it is resumed, and, when the input asks for it, writes past a small buffer call
``pause_writing`` until the buffer drains.

Input: byte 0 holds flags (bit 0: back-pressure, bit 1: CORS on, bit 2: the server is
draining), bytes 1 and 2 two split points (in 256ths of the rest), and the rest is what the
client sends, in three pieces with the loop run in between. The dispatch answers a small
JSON body; ``/slow`` answers a few iterations later, ``/boom`` raises, ``/none`` answers
204, ``/sse`` is a stream and ``/ws`` with an upgrade is a WebSocket hand-off (each writes
a head and closes, as a refused or finished one would).

Invariants: no exception escapes ``data_received`` or a callback of the loop; nothing is
logged as an error but the failures ``/boom`` causes; the bytes written are a sequence of
well-formed HTTP/1.1 responses (status line, headers, a body of its Content-Length), one
per answer the ``on_response`` hook saw and in its order, with only ``100 Continue``
between them; a ``Connection: close`` answer (every answer to a parse error) is the last
thing written and the transport is closed right after; nothing is written after close; a
connection left open is reading again once its requests are answered; no task is left.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import atheris

from tests.fuzz._run import main

with atheris.instrument_imports(include=["etherd"]):
    import msgspec

    from etherd.core.config import Config
    from etherd.edge.http.protocol import HttpConnection
    from etherd.edge.http.request import Request
    from etherd.edge.http.response import Headers, Response, Result, Stream, Upgrade
    from etherd.services.state import ServerState

_LIMITS = {
    "max_header_bytes": 1024,
    "max_headers": 16,
    "max_body_bytes": 512,
    "max_pipelined": 4,
    "max_pending_bytes": 2048,
    "max_chunk_extension_bytes": 64,
    "max_inflight": 3,
}
CONFIGS = (
    msgspec.convert({"http": _LIMITS}, Config),
    msgspec.convert({"http": {**_LIMITS, "cors_origins": ["https://app.example"]}}, Config),
)
SWITCHING = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
STREAM_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
HIGH_WATER = 256
# Loop iterations after each piece: more than any handler here needs to finish.
SETTLE_ROUNDS = 8


class Errors(logging.Handler):
    """Collects what etherd logs at ERROR and above."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


ERRORS = Errors()
_etherd_log = logging.getLogger("etherd")
_etherd_log.addHandler(ERRORS)
_etherd_log.propagate = False


class FakeTransport:
    """Records writes, close and reading state; asks the protocol to pause like asyncio."""

    def __init__(self, loop: asyncio.AbstractEventLoop, backpressure: bool) -> None:
        self.loop = loop
        self.protocol: HttpConnection | None = None
        self.written = bytearray()
        self.problems: list[str] = []
        self.closed = False
        self.lost = False
        self.reading = True
        self.buffered = 0
        self.writing_paused = False
        self.backpressure = backpressure
        self.buffer_size_asked = 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("192.0.2.7", 40000) if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        self.buffer_size_asked += 1
        return self.buffered

    def write(self, data: bytes) -> None:
        if self.closed:
            self.problems.append(f"write after close: {bytes(data[:80])!r}")
            return
        self.written += data
        self.buffered += len(data)
        if self.backpressure and self.buffered > HIGH_WATER and not self.writing_paused:
            self.writing_paused = True
            if self.protocol is not None:
                self.protocol.pause_writing()

    def drain(self) -> None:
        """The peer read everything: the buffer empties and writing may resume."""
        self.buffered = 0
        if self.writing_paused and not self.closed:
            self.writing_paused = False
            if self.protocol is not None:
                self.protocol.resume_writing()

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.loop.call_soon(self._lost)

    def abort(self) -> None:
        self.close()

    def _lost(self) -> None:
        self.lost = True
        if self.protocol is not None:
            self.protocol.connection_lost(None)

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def hand_over(self) -> None:
        """A stream or a WebSocket takes the connection: the HTTP protocol is out of it."""
        self.protocol = None


class Run:
    """One input's connection, its dispatch and what it saw."""

    def __init__(self, loop: asyncio.AbstractEventLoop, flags: int) -> None:
        self.loop = loop
        self.state = ServerState(CONFIGS[flags >> 1 & 1])
        self.state.draining = bool(flags & 4)
        self.transport = FakeTransport(loop, backpressure=bool(flags & 1))
        self.answered: list[tuple[str | None, int]] = []
        self.raised = 0
        self.tails: list[bytes] = []
        self.conn = HttpConnection(
            self.state,
            self.dispatch,
            lambda path: ["GET", "POST"],
            lambda method, path: path == "/sse",
            self.on_response,
            loop,
        )
        self.transport.protocol = self.conn
        self.conn.connection_made(self.transport)  # type: ignore[arg-type]

    def on_response(self, request: Request | None, status: int) -> None:
        self.answered.append((request.method if request is not None else None, status))

    async def dispatch(self, request: Request) -> Result:
        path = request.path
        if path == "/slow":
            for _ in range(3):
                await asyncio.sleep(0)
        elif path == "/boom":
            self.raised += 1
            raise RuntimeError("the handler failed")
        elif path == "/none":
            return Response(204)
        elif path == "/sse":
            return Stream(self.start_stream)
        elif path == "/ws" and request.upgrade:
            return Upgrade(self.hand_off)
        return Response(200, b'{"ok":true,"n":%d}' % len(request.body))

    def start_stream(self, transport: asyncio.Transport, headers: Headers) -> None:
        self.transport.hand_over()
        head = STREAM_HEAD + b"".join(name + b": " + value + b"\r\n" for name, value in headers)
        transport.write(head + b"\r\n")
        transport.close()

    def hand_off(self, transport: asyncio.Transport, request: Request, tail: bytes) -> None:
        self.transport.hand_over()
        self.tails.append(tail)
        transport.write(SWITCHING)
        transport.close()


async def _settle() -> None:
    for _ in range(SETTLE_ROUNDS):
        await asyncio.sleep(0)


def _responses(data: bytes, answered: list[tuple[str | None, int]]) -> tuple[int, bool]:
    """Check ``data`` response by response; how many final ones, whether the last closes."""
    count = 0
    closes = False
    pos = 0
    while pos < len(data):
        assert not closes, f"bytes after a Connection: close answer: {data[pos : pos + 80]!r}"
        if data.startswith(CONTINUE, pos):
            pos += len(CONTINUE)
            continue
        if data.startswith(SWITCHING, pos):
            pos += len(SWITCHING)
            closes = True
            continue
        end = data.find(b"\r\n\r\n", pos)
        assert end >= 0, f"a response head that never ends: {data[pos : pos + 120]!r}"
        lines = data[pos:end].split(b"\r\n")
        pos = end + 4
        status_line = lines[0]
        assert status_line[:9] == b"HTTP/1.1 " and status_line[12:13] == b" ", status_line
        assert status_line[9:12].isdigit(), status_line
        assert status_line[13:] and status_line[13:] != b"Unknown", status_line
        status = int(status_line[9:12])
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(b": ")
            assert sep and name and name.isascii() and b" " not in name, line
            assert name.lower() not in headers, f"repeated header {name!r}"
            headers[name.lower()] = value
        assert count < len(answered), f"an answer the hook never saw: {status_line!r}"
        method, want = answered[count]
        assert status == want, (status, want)
        count += 1
        if headers.get(b"content-type") == b"text/event-stream":
            closes = True  # a stream: the rest is events, and here it ends at once
            continue
        if status == 204:
            assert b"content-length" not in headers
            length = 0
        else:
            value = headers.get(b"content-length", b"")
            assert value.isdigit(), f"no Content-Length in {lines!r}"
            length = 0 if method == "HEAD" else int(value)
        assert pos + length <= len(data), "a body shorter than its Content-Length"
        pos += length
        connection = headers.get(b"connection")
        assert connection in (b"keep-alive", b"close"), connection
        closes = connection == b"close"
    return count, closes


def drive(loop: asyncio.AbstractEventLoop, data: bytes) -> None:
    """Send one input to a new connection and check everything it answered."""
    if len(data) < 3:
        return
    flags, first, second, body = data[0], data[1], data[2], data[3:]
    cuts = sorted((len(body) * first // 256, len(body) * second // 256))
    pieces = [body[: cuts[0]], body[cuts[0] : cuts[1]], body[cuts[1] :]]
    ERRORS.records.clear()
    run = Run(loop, flags)
    transport = run.transport
    delivered = bytearray()
    for piece in pieces:
        # A paused transport reads nothing; give the connection a chance to resume first.
        for _ in range(4):
            if transport.reading or transport.closed:
                break
            transport.drain()
            loop.run_until_complete(_settle())
        if transport.closed or transport.protocol is None or not transport.reading:
            break
        if piece:
            delivered += piece
            run.conn.data_received(piece)
        loop.run_until_complete(_settle())
        transport.drain()
    # The client now reads everything: answers written while draining may pause writing
    # again, so drain until the transport stays below its mark.
    for _ in range(8):
        loop.run_until_complete(_settle())
        if not transport.writing_paused:
            break
        transport.drain()

    assert not transport.problems, transport.problems
    failures = [r for r in ERRORS.records if r.getMessage() != "HTTP handler failed"]
    assert not failures, [r.getMessage() for r in failures]
    assert len(ERRORS.records) <= run.raised, "a handler failure that was not /boom's"
    count, closes = _responses(bytes(transport.written), run.answered)
    assert count == len(run.answered), (count, run.answered)
    for method, status in run.answered:
        if method is None:  # a parse error, a limit or a timeout: the stream is lost
            assert status >= 400 and closes and transport.closed, run.answered
    if closes:
        assert transport.closed, "Connection: close was answered and the connection stayed"
    for tail in run.tails:
        assert delivered.endswith(tail), "the WebSocket got other bytes than the last ones"
    if not transport.closed and transport.protocol is not None:
        assert not run.conn.busy, "requests left unanswered"
        assert transport.reading, "an idle connection left with reading paused"
    if not transport.closed:
        transport.close()
        loop.run_until_complete(_settle())
    pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
    assert not pending, pending


def _loop() -> Callable[[bytes], None]:
    loop = asyncio.new_event_loop()
    escaped: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: escaped.append(context))

    def test_one_input(data: bytes) -> None:
        """Run one input and fail on anything that escaped into the loop."""
        drive(loop, data)
        assert not escaped, escaped

    return test_one_input


test_one_input = _loop()

if __name__ == "__main__":
    main(test_one_input)
