"""The fan-out's C write loop (etherd.edge.ws._directwrite) on real sockets.

It must do exactly what the hub's Python loop (``send_direct``) does, except that a direct
sink whose transport holds nothing gets its bytes written to its socket by the loop itself;
whatever the socket does not take (a full buffer, a short write, an error) must go through
the sink's ``send``, in order, so nothing is lost or reordered.
"""

from __future__ import annotations

import asyncio
import os
import resource
import socket
import sys
from collections.abc import Iterator
from typing import cast

import pytest
from hypothesis import given
from hypothesis import strategies as st

from etherd.core.config import Config, WsConfig
from etherd.core.hub import Pending, send_direct
from etherd.edge.ws._directwrite import send_all
from etherd.edge.ws.session import _own_fd
from etherd.server import fanout_loop


class FakeSink:
    """The attributes the loop reads, with ``send`` recording what the transport got."""

    def __init__(self, fd: int = -1, unsent: int = 0, direct: bool = True) -> None:
        self.fd = fd
        self.drained_fd = -1
        self.direct = direct
        self.pending: list[Pending] = []
        self.queued = unsent
        self.sent: list[bytes | memoryview] = []

    def unsent(self) -> int:
        return self.queued

    def send(self, data: bytes | memoryview) -> None:
        self.sent.append(data)


class NoSocket:
    """A sink without ``fd`` or ``unsent`` (an SSE stream, a test's list)."""

    def __init__(self) -> None:
        self.direct = True
        self.pending: list[Pending] = []
        self.sent: list[bytes | memoryview] = []

    def send(self, data: bytes | memoryview) -> None:
        self.sent.append(data)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    yield a, b
    a.close()
    b.close()


def drain(sock: socket.socket) -> bytes:
    out = bytearray()
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            return bytes(out)
        if not chunk:
            return bytes(out)
        out += chunk


def fill(sock: socket.socket) -> None:
    """Write until the socket takes nothing more."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    while True:
        try:
            sock.send(b"x" * 65536)
        except BlockingIOError:
            return


def test_an_idle_direct_sink_gets_the_bytes_on_its_socket(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    sink = FakeSink(a.fileno())
    slow: list[FakeSink] = []
    assert send_all([sink], b"frame-bytes", slow) == 1
    assert drain(b) == b"frame-bytes"
    assert sink.sent == []
    assert slow == []
    # The transport was seen empty: the next writes need not ask it again.
    assert sink.drained_fd == a.fileno()
    sink.queued = 99  # (it is not asked, so this is not seen)
    assert send_all([sink], b"next", slow) == 1
    assert drain(b) == b"next"


def test_the_kept_answer_is_what_is_written_to(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    sink = FakeSink(fd=-1)
    sink.drained_fd = a.fileno()
    assert send_all([sink], b"ev", []) == 1
    assert drain(b) == b"ev"
    assert sink.sent == []


def test_bytes_waiting_in_the_transport_keep_the_frame_behind_them(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    sink = FakeSink(a.fileno(), unsent=10)
    assert send_all([sink], b"after", []) == 1
    assert drain(b) == b""
    assert sink.sent == [b"after"]
    assert sink.drained_fd == -1


def test_a_full_socket_hands_the_whole_frame_to_the_transport(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    fill(a)
    sink = FakeSink(a.fileno())
    assert send_all([sink], b"late", []) == 1
    assert sink.sent == [b"late"]
    assert set(drain(b)) == {ord("x")}
    # Until the transport is seen empty again, it gets everything.
    assert sink.drained_fd == -1
    sink.queued = 4
    assert send_all([sink], b"later", []) == 1
    assert sink.sent == [b"late", b"later"]


def test_a_short_write_hands_the_rest_to_the_transport(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    data = bytes(range(256)) * 4096  # 1 MiB: more than the socket takes at once
    sink = FakeSink(a.fileno())
    assert send_all([sink], data, []) == 1
    assert len(sink.sent) == 1
    got = drain(b)
    assert 0 < len(got) < len(data)
    assert got + bytes(sink.sent[0]) == data
    assert isinstance(sink.sent[0], memoryview)  # the rest is not copied
    assert sink.drained_fd == -1


def test_a_dead_peer_leaves_the_error_to_the_transport(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    b.close()
    sink = FakeSink(a.fileno())
    # EPIPE, no SIGPIPE: the transport's own write then reports the lost connection.
    assert send_all([sink], b"gone", []) == 1
    assert sink.sent == [b"gone"]


def test_sinks_that_are_not_direct_or_have_pending_items_go_on_slow_in_order(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    ready = FakeSink(a.fileno())
    paused = FakeSink(a.fileno(), direct=False)
    waiting = FakeSink(a.fileno())
    waiting.pending.append((0, b"own"))
    no_fd = FakeSink()
    slow: list[FakeSink] = []
    assert send_all((paused, ready, waiting, no_fd), b"ev", slow) == 2
    assert slow == [paused, waiting]
    assert drain(b) == b"ev"
    assert no_fd.sent == [b"ev"]
    assert paused.sent == [] and waiting.sent == []


def test_a_sink_without_a_socket_attribute_is_sent_through_its_transport() -> None:
    sink = NoSocket()
    assert send_all({sink}, b"ev", []) == 1
    assert sink.sent == [b"ev"]


def test_bad_arguments_are_type_errors() -> None:
    sink = FakeSink()
    with pytest.raises(TypeError, match="data must be bytes"):
        send_all([sink], bytearray(b"x"), [])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="slow must be a list"):
        send_all([sink], b"x", ())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="sinks must be iterable"):
        send_all(5, b"x", [])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="takes sinks, data and slow"):
        send_all([sink], b"x")  # type: ignore[call-arg]


def test_an_error_raised_by_send_propagates_and_leaks_nothing() -> None:
    class Failing(FakeSink):
        def send(self, data: bytes | memoryview) -> None:
            raise RuntimeError("transport broke")

    sink = Failing()
    before = sys.getrefcount(sink)
    for _ in range(100):
        with pytest.raises(RuntimeError, match="transport broke"):
            send_all([sink], b"x", [])
    assert sys.getrefcount(sink) == before


@given(
    st.lists(
        st.tuples(st.booleans(), st.booleans(), st.booleans()),
        max_size=30,
    ),
    st.binary(min_size=1, max_size=64),
)
def test_same_choices_as_the_python_loop(flags: list[tuple[bool, bool, bool]], data: bytes) -> None:
    def sinks() -> list[FakeSink]:
        out = []
        for direct, has_pending, unsent in flags:
            sink = FakeSink(direct=direct, unsent=int(unsent))
            if has_pending:
                sink.pending.append((0, b"p"))
            out.append(sink)
        return out

    ours, theirs = sinks(), sinks()
    slow_c: list[FakeSink] = []
    slow_py: list[FakeSink] = []
    assert send_all(ours, data, slow_c) == send_direct(theirs, data, slow_py)  # type: ignore[arg-type]
    assert [ours.index(s) for s in slow_c] == [theirs.index(s) for s in slow_py]
    assert [s.sent for s in ours] == [s.sent for s in theirs]


def test_the_server_runs_the_c_loop_unless_direct_write_is_off() -> None:
    # ``make test`` installs with a C compiler, so the loop must be the compiled one here;
    # were the (optional) build to fail, this is the test that says so.
    assert fanout_loop(Config()) is send_all
    assert fanout_loop(Config(ws=WsConfig(direct_write=False))) is send_direct


class SocketTransport:
    """What ``_own_fd`` asks of a transport: its socket and whether it encrypts."""

    def __init__(self, sock: socket.socket, sslcontext: object = None) -> None:
        self.extra = {"socket": sock, "sslcontext": sslcontext}

    def get_extra_info(self, name: str, default: object = None) -> object:
        return self.extra.get(name, default)


def test_a_session_gets_a_descriptor_of_its_own_for_its_socket() -> None:
    a, b = socket.socketpair()
    fd = _own_fd(cast(asyncio.Transport, SocketTransport(a)))
    try:
        assert fd not in (-1, a.fileno())
        assert os.fstat(fd).st_ino == os.fstat(a.fileno()).st_ino
        a.close()  # the transport's number goes; the session's still reaches the peer
        os.write(fd, b"x")
        assert b.recv(1) == b"x"
    finally:
        os.close(fd)
        b.close()


def test_no_descriptor_of_its_own_for_tls_or_past_half_the_limit() -> None:
    a, b = socket.socketpair()
    try:
        tls = SocketTransport(a, sslcontext=object())
        assert _own_fd(cast(asyncio.Transport, tls)) == -1
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        # The socket's number is then exactly half the limit: accepting needs the rest.
        resource.setrlimit(resource.RLIMIT_NOFILE, (a.fileno() * 2, hard))
        try:
            assert _own_fd(cast(asyncio.Transport, SocketTransport(a))) == -1
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        fd = _own_fd(cast(asyncio.Transport, SocketTransport(a)))
        assert fd not in (-1, a.fileno())
        os.close(fd)
    finally:
        a.close()
        b.close()
