"""Hostile and careless clients: malformed protocol, connect churn, and the attacks of
tests/attacks.py, while a well-behaved client keeps being served."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import socket
import struct
import threading
import time
from collections.abc import Callable

from tests import attacks
from tests.stress.clients import fd_count, rss_kb
from tests.stress.conftest import StartServer
from tests.stress.probe import Probe
from tests.stress.rawws import OP_CLOSE, OP_CONT, OP_PING, OP_TEXT, frame, text, upgrade_request

Report = Callable[[str], None]
HOST = "127.0.0.1"
DEADLINE_S = 3.0  # the longest a well-behaved round trip may take meanwhile (a shared machine)


def _bad_frames() -> list[bytes]:
    """Frames a WebSocket server must refuse (each closes the connection)."""
    return [
        frame(OP_TEXT, b'{"action":"ping"}', mask=False),  # client frames must be masked
        frame(0x3, b"reserved opcode"),
        frame(OP_TEXT, b"{}", rsv=0x4),  # RSV bits without an extension
        frame(OP_TEXT, b"\xff\xfe not utf-8"),
        frame(OP_PING, b"p" * 126),  # control frame over 125 bytes
        frame(OP_PING, b"p", fin=False),  # fragmented control frame
        frame(OP_CONT, b"continuation with nothing to continue"),
        frame(OP_CLOSE, struct.pack("!H", 1005)),  # reserved close code
        bytes([0x81, 0xFF]) + struct.pack("!Q", 1 << 62) + os.urandom(4),  # absurd length
        text(b"not json at all") + frame(OP_TEXT, b"x", fin=False) + frame(OP_TEXT, b"y"),
    ]


def _bad_requests(port: int) -> list[bytes]:
    """HTTP a server must refuse without hanging."""
    return [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(200),  # a TLS hello
        os.urandom(4096),
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
        b"POST /api/publish HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"GET /api/realtime?token=test HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n",  # no key
        b"GET /api/realtime?token=test HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: short\r\nSec-WebSocket-Version: 8\r\n\r\n",
        b"GET /\x00\x01 HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 500 + b"\r\n",
        upgrade_request(port)[:40],  # half a handshake, then silence
        b"",  # connect and say nothing
    ]


def _hostile(port: int, payload: bytes, handshake: bool, limit_s: float) -> float | None:
    """Send ``payload`` (after a good handshake when ``handshake``) and read until the
    server closes; seconds that took, or None if it did not within ``limit_s``."""
    started = time.monotonic()
    with socket.create_connection((HOST, port), timeout=limit_s) as sock:
        if handshake:
            sock.sendall(upgrade_request(port))
            head = b""
            while b"\r\n\r\n" not in head:
                head += sock.recv(4096)
        with contextlib.suppress(OSError):
            sock.sendall(payload)
        try:
            while sock.recv(65536):
                if time.monotonic() - started > limit_s:
                    return None
        except TimeoutError:
            return None
        except OSError:
            pass  # reset: closed, too
    return time.monotonic() - started


def test_malformed_clients_never_hang_the_server(start_server: StartServer, figure: Report) -> None:
    timeout_s = 2.0
    server = start_server(
        {"http": {"request_timeout_s": timeout_s, "first_byte_timeout_s": timeout_s}}
    )
    cases = [(f, True) for f in _bad_frames()] + [(r, False) for r in _bad_requests(server.port)]
    rounds = 5
    closed: list[float | None] = []
    lock = threading.Lock()

    def attack(payload: bytes, handshake: bool) -> None:
        took = _hostile(server.port, payload, handshake, limit_s=timeout_s + 8)
        with lock:
            closed.append(took)

    with Probe(server) as probe:
        time.sleep(0.3)
        threads = [
            threading.Thread(target=attack, args=case) for _ in range(rounds) for case in cases
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        time.sleep(0.3)
    hung = closed.count(None)
    slowest = max(c for c in closed if c is not None)
    figure(
        f"malformed clients: {len(closed)} hostile connections ({len(cases)} kinds x {rounds}), "
        f"{len(closed) - hung} closed by the server (slowest {slowest:.2f} s, timeouts "
        f"{timeout_s:g} s), {hung} left hanging; meanwhile {probe.summary()}, "
        f"{len(probe.failures)} failures"
    )
    assert hung == 0
    assert not probe.failures, probe.failures[:3]
    assert max(probe.round_trips) < DEADLINE_S


async def _cycle(port: int, graceful: bool) -> None:
    """One WebSocket connect, subscribe, and leave (with a CLOSE or by dropping TCP)."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(upgrade_request(port))
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head[:80]
        writer.write(text({"action": "subscribe", "topics": ["churn/t"], "id": 1}))
        first = await reader.readexactly(2)
        n = first[1] & 0x7F
        if n == 126:
            n = struct.unpack("!H", await reader.readexactly(2))[0]
        reply = await reader.readexactly(n)
        assert b'"subscribed"' in reply, reply[:80]
        if graceful:
            writer.write(frame(OP_CLOSE, struct.pack("!H", 1000)))
            await reader.read()  # the server's CLOSE, then EOF
    finally:
        if not graceful:
            sock = writer.get_extra_info("socket")
            # SO_LINGER 0: close with a reset, as a vanished client does.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _churn(port: int, cycles: int, concurrency: int) -> None:
    rng = random.Random(5)
    sem = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with sem:
            await _cycle(port, rng.random() < 0.5)

    await asyncio.gather(*(one() for _ in range(cycles)))


def _settle(pid: int, want: int, limit_s: float) -> int:
    """Wait (up to ``limit_s``) for the server's descriptors to come down to ``want``."""
    deadline = time.monotonic() + limit_s
    while fd_count(pid) > want and time.monotonic() < deadline:
        time.sleep(0.1)
    return fd_count(pid)


def test_connect_churn_leaks_nothing(start_server: StartServer, figure: Report) -> None:
    server = start_server({})
    assert server.proc is not None
    pid = server.proc.pid
    asyncio.run(_churn(server.port, 500, 20))  # warm-up: allocator pools, caches, pages
    base_fds = _settle(pid, 0, 3.0)
    base_rss = rss_kb(pid)
    cycles = 4000
    started = time.monotonic()
    asyncio.run(_churn(server.port, cycles, 20))
    took = time.monotonic() - started
    after_fds = _settle(pid, base_fds, 5.0)
    after_rss = rss_kb(pid)
    grew = (after_rss - base_rss) / 1024
    figure(
        f"connect churn: {cycles} connect/subscribe/disconnect cycles in {took:.1f} s (half "
        f"CLOSE, half reset), fds {base_fds} -> {after_fds}, RSS {base_rss / 1024:.1f} -> "
        f"{after_rss / 1024:.1f} MB ({grew:+.2f} MB, {1024 * grew / cycles:.2f} KB/cycle)"
    )
    assert after_fds <= base_fds
    assert grew < 4.0, f"RSS grew {grew:.1f} MB over {cycles} cycles"


def test_seven_attacks(start_server: StartServer, figure: Report) -> None:
    server = start_server({"http": {"first_byte_timeout_s": 3.0, "request_timeout_s": 5.0}})
    assert server.proc is not None
    pid, port = server.proc.pid, server.port
    backlog = attacks.publish_backlog(HOST, port, "attack/backlog", 3000, 2000)
    time.sleep(0.5)
    base_rss = attacks.rss_bytes(pid)
    peak = base_rss
    held: list[attacks.Held] = []
    outcome: dict[str, str] = {}
    lock = threading.Lock()

    def keep(name: str, h: attacks.Held, note: str = "") -> None:
        with lock:
            held.append(h)
            outcome[name] = note or f"{h.sent >> 10} KiB sent, stalled {h.stalled}"

    def unread_pipelines() -> None:
        for _ in range(3):
            keep("unread pipelines", attacks.pipeline_flood(HOST, port, seconds=3.0))

    def stalled_resumes() -> None:
        h, replies = attacks.stalled_resumes(HOST, port, "attack/backlog", 30)
        ok = sum(1 for r in replies if r.get("type") == "subscribed")
        keep("stalled resumes", h, f"30 resumes of {backlog} events, {ok} acknowledged")

    def fast_resumes() -> None:
        got = [
            attacks.read_resume(HOST, port, "attack/backlog", backlog, timeout=60) for _ in range(3)
        ]
        whole = sum(1 for r in got if r.offsets == list(range(1, backlog + 1)))
        with lock:
            outcome["fast resumes"] = f"3 readers, {whole} got all {backlog} in order"

    def upgrade_flood() -> None:
        h = attacks.upgrade_flood(HOST, port, "/api/realtime?token=test", seconds=3.0)
        keep("upgrade flood", h)

    def silent() -> None:
        h = attacks.idle_connections(HOST, port, 200)
        took = attacks.silent_connection(HOST, port, timeout=10.0)
        after = "never" if took is None else f"{took:.1f} s"
        keep("silent connections", h, f"200 held; a silent one was closed after {after}")

    def half_open() -> None:
        keep("half-open requests", attacks.half_requests(HOST, port, 200), "200 held")

    def chunk_ext() -> None:
        answer = attacks.chunk_extension(HOST, port, 1 << 20)
        # A 100 Continue may come first; the final status is the last one.
        statuses = re.findall(rb"HTTP/1\.1 (\d{3})", answer)
        final = statuses[-1].decode() if statuses else "none"
        with lock:
            outcome["chunk extension"] = f"1 MiB of chunk extension answered {final}"

    steps = [
        unread_pipelines,
        stalled_resumes,
        fast_resumes,
        upgrade_flood,
        silent,
        half_open,
        chunk_ext,
    ]
    errors: list[BaseException] = []

    def run(step: Callable[[], None]) -> None:
        try:
            step()
        except BaseException as exc:
            errors.append(exc)

    try:
        with Probe(server) as probe:
            threads = [threading.Thread(target=run, args=(s,)) for s in steps]
            for t in threads:
                t.start()
            while any(t.is_alive() for t in threads):
                peak = max(peak, attacks.rss_bytes(pid))
                time.sleep(0.1)
            for _ in range(20):  # the held sockets stay open a while longer
                peak = max(peak, attacks.rss_bytes(pid))
                time.sleep(0.1)
    finally:
        for h in held:
            h.close()
    grew = (peak - base_rss) / 2**20
    figure(
        f"seven attacks: RSS {base_rss / 2**20:.1f} MB -> peak {peak / 2**20:.1f} MB "
        f"({grew:+.1f} MB); meanwhile {probe.summary()}, {len(probe.failures)} failures; "
        + "; ".join(f"{k}: {v}" for k, v in sorted(outcome.items()))
    )
    assert not errors, errors
    assert len(outcome) == 7, outcome
    assert not probe.failures, probe.failures[:3]
    assert max(probe.round_trips) < DEADLINE_S
    assert outcome["fast resumes"].startswith("3 readers, 3 got")
    assert outcome["chunk extension"].endswith("answered 400")
    # Bounded: per-connection caps keep the attackers' cost to a few tens of MB.
    assert grew < 64.0
