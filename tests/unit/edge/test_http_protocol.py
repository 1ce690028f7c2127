"""``HttpConnection`` over a fake transport: no sockets, a real event loop.

Pipelined requests are answered strictly in request order even when a later one finishes
first; every limit is gone over; the request and keep-alive timers fire.
"""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import pytest

from etherd.core.config import Config
from etherd.edge.http.protocol import HttpConnection
from etherd.edge.http.request import Request
from etherd.edge.http.response import Response, Result, Upgrade
from etherd.services.state import ServerState


class FakeTransport:
    """Records what the protocol writes and asks of its transport."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.closed = False
        self.reading = True
        self.limits: dict[str, int | None] = {}

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 5555) if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.limits = {"high": high, "low": low}

    def get_write_buffer_size(self) -> int:
        return 0

    def write(self, data: bytes) -> None:
        assert not self.closed, "write after close"
        self.written += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def responses(self) -> list[tuple[int, bytes]]:
        """(status, body) of every complete response written so far."""
        out = []
        data = bytes(self.written)
        while data:
            head, _, rest = data.partition(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            status = int(lines[0].split()[1])
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(b": ")
                if name.lower() == b"content-length":
                    length = int(value)
            out.append((status, rest[:length]))
            data = rest[length:]
        return out


def config(**http: Any) -> Config:
    return msgspec.convert({"http": http}, Config)


class Harness:
    """A connection, its fake transport, and the requests its dispatch saw."""

    def __init__(
        self, cfg: Config, dispatch: Callable[[Request], Awaitable[Result]] | None = None
    ) -> None:
        self.state = ServerState(cfg)
        self.seen: list[str] = []
        self.answered: list[tuple[str | None, int]] = []

        async def echo(request: Request) -> Result:
            self.seen.append(request.path)
            return Response(200, request.path.encode())

        self.transport = FakeTransport()
        self.conn = HttpConnection(
            self.state,
            dispatch or echo,
            lambda path: ["GET"],
            lambda method, path: path.startswith("/stream"),
            lambda req, status: self.answered.append((req.path if req else None, status)),
            asyncio.get_running_loop(),
        )
        self.conn.connection_made(self.transport)  # type: ignore[arg-type]

    def feed(self, data: bytes) -> None:
        self.conn.data_received(data)


async def settle(rounds: int = 5) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0)


def get(path: str, extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode()


def test_pipelined_requests_are_answered_in_request_order() -> None:
    async def go() -> list[tuple[int, bytes]]:
        release: dict[str, asyncio.Future[None]] = {}

        async def dispatch(request: Request) -> Result:
            fut = asyncio.get_running_loop().create_future()
            release[request.path] = fut
            await fut
            return Response(200, request.path.encode())

        h = Harness(Config(), dispatch)
        h.feed(get("/a") + get("/b") + get("/c"))
        # Finish whatever is being handled, latest request first: the answers must still
        # leave in request order.
        for _ in range(20):
            for path in ("/c", "/b", "/a"):
                fut = release.get(path)
                if fut is not None and not fut.done():
                    fut.set_result(None)
                    await settle()
            await settle()
        return h.transport.responses()

    assert asyncio.run(go()) == [(200, b"/a"), (200, b"/b"), (200, b"/c")]


def test_too_many_pipelined_requests_pause_reading() -> None:
    async def go() -> tuple[bool, bool, int]:
        gate = asyncio.Event()

        async def dispatch(request: Request) -> Result:
            await gate.wait()
            return Response(200)

        h = Harness(config(max_pipelined=4), dispatch)
        h.feed(b"".join(get(f"/{n}") for n in range(6)))
        await settle()
        paused = not h.transport.reading
        gate.set()
        await settle(40)
        return paused, h.transport.reading, len(h.transport.responses())

    assert asyncio.run(go()) == (True, True, 6)


@pytest.mark.parametrize(
    ("data", "status", "fragment"),
    [
        (get("/", "X-Big: " + "a" * 600 + "\r\n"), 431, b"http.max_header_bytes"),
        (get("/", "".join(f"X-{n}: v\r\n" for n in range(12))), 431, b"http.max_headers"),
        (
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2000\r\n\r\n",
            413,
            b"http.max_body_bytes",
        ),
        (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: zz\r\n\r\n", 400, b""),
        (b"NOT HTTP AT ALL\r\n\r\n", 400, b"malformed"),
    ],
)
def test_limits_and_malformed_requests_answer_then_close(
    data: bytes, status: int, fragment: bytes
) -> None:
    async def go() -> FakeTransport:
        h = Harness(config(max_header_bytes=512, max_headers=10, max_body_bytes=1000))
        h.feed(data)
        await settle()
        assert h.seen == []
        return h.transport

    transport = asyncio.run(go())
    ((got, body),) = transport.responses()
    assert got == status
    assert fragment in body
    assert transport.closed


@pytest.mark.parametrize(("extra", "status"), [(0, 200), (1, 431)])
def test_the_head_limit_counts_every_byte_of_the_head(extra: int, status: int) -> None:
    """``http.max_header_bytes`` is the request line, every header line and the blank line."""

    async def go() -> list[tuple[int, bytes]]:
        h = Harness(config(max_header_bytes=512))
        head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Pad: \r\n\r\n"
        pad = b"a" * (512 - len(head) + extra)
        h.feed(head[:-4] + pad + b"\r\n\r\n")
        await settle()
        return h.transport.responses()

    assert asyncio.run(go())[0][0] == status


def test_a_head_that_never_ends_is_refused_by_size() -> None:
    async def go() -> FakeTransport:
        h = Harness(config(max_header_bytes=512))
        h.feed(b"GET / HTTP/1.1\r\nX-Slow: ")
        for _ in range(10):
            h.feed(b"a" * 100)
        await settle()
        return h.transport

    transport = asyncio.run(go())
    assert transport.responses()[0][0] == 431 and transport.closed


def test_too_many_requests_in_flight_answer_503() -> None:
    async def go() -> list[tuple[int, bytes]]:
        h = Harness(config(max_inflight=1))
        h.state.inflight = 1  # another connection's request is being handled
        h.feed(get("/x"))
        await settle()
        return h.transport.responses()

    ((status, body),) = asyncio.run(go())
    assert status == 503 and b"overloaded" in body


def test_request_timeout_answers_408() -> None:
    async def go() -> FakeTransport:
        h = Harness(config(request_timeout_s=0.05))
        h.feed(b"GET / HTTP/1.1\r\nHost:")
        await asyncio.sleep(0.15)
        return h.transport

    transport = asyncio.run(go())
    ((status, body),) = transport.responses()
    assert status == 408 and b"http.request_timeout_s" in body and transport.closed


def test_idle_keepalive_connection_closes() -> None:
    async def go() -> tuple[bool, bool]:
        h = Harness(config(keepalive_timeout_s=0.05))
        h.feed(get("/x"))
        await settle()
        open_after_answer = not h.transport.closed
        await asyncio.sleep(0.15)
        return open_after_answer, h.transport.closed

    assert asyncio.run(go()) == (True, True)


def test_connection_close_is_honoured_and_the_write_limit_set() -> None:
    async def go() -> Harness:
        h = Harness(config(write_high_water_bytes=12345))
        h.feed(get("/x", "Connection: close\r\n"))
        await settle()
        return h

    h = asyncio.run(go())
    assert h.transport.responses() == [(200, b"/x")]
    assert h.transport.closed
    assert h.transport.limits["high"] == 12345
    assert h.answered == [("/x", 200)]


def test_100_continue_is_sent_before_the_body() -> None:
    async def go() -> bytes:
        h = Harness(Config())
        h.feed(b"POST /x HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
        early = bytes(h.transport.written)
        h.feed(b"hi")
        await settle()
        return early

    assert asyncio.run(go()) == b"HTTP/1.1 100 Continue\r\n\r\n"


def test_pipelined_requests_run_at_once_but_commit_in_request_order() -> None:
    async def go() -> tuple[list[str], list[str], list[tuple[int, bytes]]]:
        started: list[str] = []
        committed: list[str] = []
        delay = {"/a": 0.05, "/b": 0.0, "/c": 0.01}

        async def dispatch(request: Request) -> Result:
            started.append(request.path)
            await asyncio.sleep(delay[request.path])
            assert request.turn is not None
            await request.turn.wait()
            committed.append(request.path)
            request.turn.done()
            return Response(200, request.path.encode())

        h = Harness(Config(), dispatch)
        h.feed(get("/a") + get("/b") + get("/c"))
        await settle()
        at_once = list(started)
        await asyncio.sleep(0.2)
        return at_once, committed, h.transport.responses()

    at_once, committed, answers = asyncio.run(go())
    assert at_once == ["/a", "/b", "/c"]
    assert committed == ["/a", "/b", "/c"]
    assert answers == [(200, b"/a"), (200, b"/b"), (200, b"/c")]


def test_a_streaming_route_is_a_barrier_in_the_pipeline() -> None:
    async def go() -> list[list[str]]:
        gates: dict[str, asyncio.Event] = {}
        snapshots: list[list[str]] = []
        started: list[str] = []

        async def dispatch(request: Request) -> Result:
            started.append(request.path)
            gate = gates.setdefault(request.path, asyncio.Event())
            await gate.wait()
            return Response(200, request.path.encode())

        h = Harness(Config(), dispatch)
        h.feed(get("/a") + get("/stream") + get("/b"))
        await settle()
        snapshots.append(list(started))  # /stream waits for /a
        gates["/a"].set()
        await settle(20)
        snapshots.append(list(started))  # /b waits for /stream
        gates["/stream"].set()
        await settle(20)
        snapshots.append(list(started))
        gates["/b"].set()
        await settle(20)
        snapshots.append([p.decode() for _, p in h.transport.responses()])
        return snapshots

    assert asyncio.run(go()) == [
        ["/a"],
        ["/a", "/stream"],
        ["/a", "/stream", "/b"],
        ["/a", "/stream", "/b"],
    ]


def test_an_upgraded_connection_leaves_nothing_of_http_behind() -> None:
    # Every WebSocket starts as an HTTP connection: whatever keeps that object alive after
    # the hand-off (its timer's handle, say) costs memory per subscriber.
    async def go() -> tuple[bool, bool]:
        handed: list[bool] = []

        async def dispatch(request: Request) -> Result:
            return Upgrade(lambda transport, req, tail: handed.append(True))

        h = Harness(Config(), dispatch)
        conn = weakref.ref(h.conn)
        h.feed(get("/stream", "Connection: Upgrade\r\nUpgrade: websocket\r\n"))
        await settle(10)
        del h.conn
        gc.collect()
        return bool(handed), conn() is None

    assert asyncio.run(go()) == (True, True)


def test_many_pipelined_answers_leave_in_few_writes() -> None:
    async def go() -> tuple[int, list[int]]:
        gate = asyncio.Event()

        async def dispatch(request: Request) -> Result:
            await gate.wait()
            return Response(200, request.path.encode())

        h = Harness(config(max_pipelined=64), dispatch)
        writes: list[int] = []
        write = h.transport.write

        def counted(data: bytes) -> None:
            writes.append(len(data))
            write(data)

        h.transport.write = counted  # type: ignore[method-assign]
        h.feed(b"".join(get(f"/{n}") for n in range(50)))
        await settle()
        gate.set()
        await settle(20)
        return len(h.transport.responses()), writes

    answered, writes = asyncio.run(go())
    assert answered == 50
    assert len(writes) <= 3, writes
