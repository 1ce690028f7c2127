"""A minimal HTTP/1.1 client protocol for load generators: keep-alive and pipelining.

It parses only what etherd and the uWS peer send (a status line, ``Content-Length``
bodies) and matches answers to requests in order, so any number may be in flight on one
connection. Subclasses get one ``answered`` call per response, with no awaiting, which
keeps a client at tens of thousands of requests per second on one core.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections import deque
from typing import Final, Self, cast

TOKEN: Final = b"test"


def post(path: bytes, body: bytes, token: bytes | None = TOKEN, headers: bytes = b"") -> bytes:
    """A complete ``POST`` request with a JSON body and a Bearer token (``None``: the
    caller's ``headers`` carry the authorization)."""
    auth = b"Authorization: Bearer %s\r\n" % token if token is not None else b""
    return (
        b"POST %s HTTP/1.1\r\nHost: bench\r\n%sContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n%s\r\n%s" % (path, auth, len(body), headers, body)
    )


class HttpConn(asyncio.Protocol):
    """One keep-alive connection; requests may be pipelined, answers come in order."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.need = -1  # bytes of the whole response being read, once its head is in
        self.head_end = 0
        self.sent_ns: deque[int] = deque()  # send time of each request in flight
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @property
    def in_flight(self) -> int:
        return len(self.sent_ns)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)
        now = time.monotonic_ns()
        while self.sent_ns:
            self.answered(0, b"", self.sent_ns.popleft(), now)

    def send(self, request: bytes) -> None:
        """Write one request (it may follow others still unanswered)."""
        assert self.transport is not None
        self.sent_ns.append(time.monotonic_ns())
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        while True:
            if self.need < 0:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = bytes(buf[:end]).lower()
                at = head.find(b"\r\ncontent-length:")
                length = 0
                if at >= 0:
                    stop = head.find(b"\r\n", at + 2)
                    length = int(head[at + 17 : stop if stop >= 0 else len(head)])
                self.head_end = end + 4
                self.need = end + 4 + length
            if len(buf) < self.need:
                return
            status = int(buf[9:12])
            body = bytes(buf[self.head_end : self.need])
            del buf[: self.need]
            self.need = -1
            sent = self.sent_ns.popleft() if self.sent_ns else 0
            self.answered(status, body, sent, time.monotonic_ns())

    def answered(self, status: int, body: bytes, sent_ns: int, now_ns: int) -> None:
        """One response arrived (status 0: the connection was lost before it)."""

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class AwaitableConn(HttpConn):
    """``await conn.request(...)`` for clients that wait for each answer (a harness)."""

    def __init__(self) -> None:
        super().__init__()
        self.waiters: deque[asyncio.Future[tuple[int, bytes]]] = deque()

    @classmethod
    async def open(cls, port: int, host: str = "127.0.0.1") -> Self:
        """Connect to ``host:port``."""
        _, conn = await asyncio.get_running_loop().create_connection(cls, host, port)
        return conn

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        """Send a complete request; its status and body."""
        waiter: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        self.send(raw)
        return await waiter

    def answered(self, status: int, body: bytes, sent_ns: int, now_ns: int) -> None:
        waiter = self.waiters.popleft()
        if waiter.done():
            return
        if status == 0:
            waiter.set_exception(ConnectionError("connection lost before the answer"))
        else:
            waiter.set_result((status, body))
