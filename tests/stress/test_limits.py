"""Limits under stress: slow consumers cut at ws.max_pending_bytes with their memory
released, silent clients dropped by the ping timeout, and payloads at the size limits."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Callable
from typing import Any

from tests.conftest import Etherd
from tests.stress.clients import Tally, Tracked, fd_count, rss_kb
from tests.stress.conftest import StartServer
from tests.stress.rawws import OP_CONT, OP_TEXT, RawWs, frame, post_raw

Report = Callable[[str], None]


def metric(server: Etherd, name: str, label: str) -> float:
    """One sample of /metrics (``name{label}``), 0 when absent."""
    status, raw = server.request("GET", "/metrics", token="test")
    assert status == 200
    for line in raw.decode().splitlines():
        if line.startswith(name) and label in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def publish_batches(server: Etherd, topic: str, batches: int, per: int, size: int) -> None:
    """``batches`` HTTP batches of ``per`` events with ``size`` bytes of data each."""
    pad = "x" * size
    for b in range(batches):
        events = [{"topic": topic, "event": "big", "data": {"b": b, "pad": pad}}] * per
        status, body = server.request("POST", "/api/publish", {"events": events}, token="test")
        assert status == 200, body


def test_slow_consumers_closed_and_released(
    start_server: StartServer, figure: Report, closing: contextlib.ExitStack
) -> None:
    cap = 1 << 20
    server = start_server({"ws": {"max_pending_bytes": cap, "close_grace_s": 15.0}})
    assert server.proc is not None
    pid = server.proc.pid
    topic, slow_n = "slow/t", 40
    batches, per, size = 60, 32, 16_000
    # Warm the paths a flood takes (encoding, fan-out, a subscriber) before the baseline.
    warm = closing.enter_context(RawWs(server.port))
    warm.subscribe([topic])
    publish_batches(server, topic, 2, per, size)
    for _ in range(2 * per):
        warm.recv_json()
    warm.close()
    time.sleep(0.5)
    base_rss, base_fds = rss_kb(pid), fd_count(pid)

    fast = closing.enter_context(RawWs(server.port))
    fast.subscribe([topic])
    fast_offsets: list[int] = []

    def read_fast() -> None:
        while True:
            try:
                event = fast.recv_json(timeout=20)
            except (TimeoutError, ConnectionError, OSError):
                return
            fast_offsets.append(event["offset"])
            if event["offset"] >= total:
                return

    total = 2 * per + batches * per
    runner = threading.Thread(target=read_fast, daemon=True)
    runner.start()
    # A 4 KiB receive window and no reads: the server's unsent bytes can only grow.
    slow = [closing.enter_context(RawWs(server.port, rcvbuf=4096)) for _ in range(slow_n)]
    for s in slow:
        s.subscribe([topic])
    peak = base_rss
    for b in range(batches):
        publish_batches(server, topic, 1, per, size)
        if b % 5 == 0:
            peak = max(peak, rss_kb(pid))
    deadline = time.monotonic() + 30
    while metric(server, "etherd_slow_consumer_closes", 'kind="ws"') < slow_n:
        peak = max(peak, rss_kb(pid))
        assert time.monotonic() < deadline, "slow consumers were not all closed"
        time.sleep(0.1)
    # Now read at full speed: behind the backlog each should find a CLOSE with 4008.
    codes = [s.read_until_close(10) for s in slow]
    for s in slow:
        s.close()
    runner.join(20)
    fast.close()
    in_order = fast_offsets == list(range(2 * per + 1, total + 1))
    time.sleep(1.0)
    after_rss, after_fds = rss_kb(pid), fd_count(pid)
    grew = (after_rss - base_rss) / 1024
    figure(
        f"slow consumers: {slow_n} non-reading clients, {codes.count(4008)} closed with 4008 "
        f"(cap {cap >> 10} KiB); RSS {base_rss / 1024:.1f} MB -> peak {peak / 1024:.1f} -> "
        f"after {after_rss / 1024:.1f} MB ({grew:+.1f} MB), fds {base_fds} -> {after_fds}; "
        f"a reading subscriber got {len(fast_offsets)}/{total - 2 * per} events, "
        f"in order with no gap: {in_order}"
    )
    assert codes == [4008] * slow_n, codes
    assert in_order
    # A PostgreSQL pool may open one of its store.pool_size connections meanwhile.
    assert after_fds <= base_fds + 4
    # Released: what the slow sessions held is gone, give or take allocator slack.
    assert grew < 8.0, f"RSS grew {grew:.1f} MB after the slow consumers were gone"


def test_silent_clients_dropped_with_4000(
    start_server: StartServer, figure: Report, closing: contextlib.ExitStack
) -> None:
    server = start_server({"ws": {"ping_interval_s": 0.5, "ping_timeout_s": 0.5}})
    silent_n = 50
    silent = [closing.enter_context(RawWs(server.port)) for _ in range(silent_n)]
    for s in silent:
        s.subscribe(["quiet/t"])
    started = time.monotonic()
    closed_at: list[float] = []
    codes: list[int | None] = []

    def watch(s: RawWs) -> None:
        codes.append(s.read_until_close(10))
        closed_at.append(time.monotonic() - started)

    # A picows client answers pings by itself: it must still be connected afterwards.
    healthy = Tracked(f"{server.ws_url}?token=test", ["quiet/t"], Tally())

    async def keep() -> bool:
        await healthy.connect()
        await asyncio.sleep(4.0)
        alive = healthy.transport is not None and not healthy.transport.is_disconnected
        healthy.drop(graceful=True)
        return alive

    threads = [threading.Thread(target=watch, args=(s,)) for s in silent]
    for t in threads:
        t.start()
    alive = asyncio.run(keep())
    for t in threads:
        t.join(15)
    for s in silent:
        s.close()
    figure(
        f"no-pong clients: {silent_n} silent clients, {codes.count(4000)} closed with 4000 "
        f"in {min(closed_at):.2f}-{max(closed_at):.2f} s (ping 0.5 s + timeout 0.5 s); "
        f"a ponging client still connected after 4 s: {alive}"
    )
    assert codes == [4000] * silent_n, codes
    assert alive


def exact_body(size: int) -> bytes:
    """A publish body of exactly ``size`` bytes."""
    empty = json.dumps({"topic": "big/http", "event": "e", "data": {"pad": ""}}).encode()
    body = json.dumps(
        {"topic": "big/http", "event": "e", "data": {"pad": "x" * (size - len(empty))}}
    ).encode()
    assert len(body) == size
    return body


def exact_command(size: int, topic: str) -> bytes:
    """A WebSocket publish command of exactly ``size`` bytes."""
    empty = json.dumps({"action": "publish", "topic": topic, "event": "e", "data": {"pad": ""}})
    pad = "y" * (size - len(empty))
    raw = json.dumps({"action": "publish", "topic": topic, "event": "e", "data": {"pad": pad}})
    assert len(raw) == size
    return raw.encode()


def test_payloads_at_the_limits(start_server: StartServer, figure: Report) -> None:
    server = start_server({})
    max_body = 1_048_576  # http.max_body_bytes (the default)
    max_msg = 65_536  # ws.max_message_bytes (the default)
    with contextlib.ExitStack() as stack:
        reader = stack.enter_context(RawWs(server.port))
        reader.subscribe(["big/http", "big/ws"])
        figures = _limits(server, reader, max_body, max_msg)
    at_limit, over_limit, http_intact, whole, pieces, over, over_pieces, ws_events = figures

    def status(reply: dict[str, Any] | int | None) -> object:
        return reply.get("type") if isinstance(reply, dict) else reply

    figure(
        f"large payloads: HTTP body {max_body} B -> {at_limit} (delivered intact: "
        f"{http_intact}), {max_body + 1} B -> {over_limit}; WS message {max_msg} B -> "
        f"{status(whole)} (4 fragments: {status(pieces)}, delivered intact: "
        f"{len(ws_events)}/2), {max_msg + 1} B -> close {status(over)} (4 fragments: "
        f"{status(over_pieces)})"
    )
    assert at_limit == 200 and http_intact
    assert over_limit == 413
    assert status(whole) == "published" and status(pieces) == "published"
    assert over == 1009 and over_pieces == 1009
    assert len(ws_events) == 2


def _limits(server: Etherd, reader: RawWs, max_body: int, max_msg: int) -> tuple[Any, ...]:
    """Publish at and past both limits; what each attempt got, and what ``reader`` saw."""
    at_limit = post_raw(server.port, "/api/publish", exact_body(max_body))
    over_limit = post_raw(server.port, "/api/publish", exact_body(max_body + 1))
    got = reader.recv_json()
    http_intact = got["topic"] == "big/http" and len(got["pad"]) == len(
        json.loads(exact_body(max_body))["data"]["pad"]
    )

    def ws_publish(payload: bytes, fragments: int = 1) -> dict[str, Any] | int | None:
        with RawWs(server.port) as ws:
            step = -(-len(payload) // fragments)
            parts = [payload[i : i + step] for i in range(0, len(payload), step)]
            for i, part in enumerate(parts):
                ws.send(frame(OP_TEXT if i == 0 else OP_CONT, part, fin=i == len(parts) - 1))
            try:
                return ws.recv_json()
            except ConnectionError as exc:
                return int(str(exc).rsplit(" ", 1)[1])

    whole = ws_publish(exact_command(max_msg, "big/ws"))
    pieces = ws_publish(exact_command(max_msg, "big/ws"), fragments=4)
    over = ws_publish(exact_command(max_msg + 1, "big/ws"))
    over_pieces = ws_publish(exact_command(max_msg + 1, "big/ws"), fragments=4)
    pad = len(json.loads(exact_command(max_msg, "big/ws"))["data"]["pad"])
    ws_events = [e for e in (reader.recv_json() for _ in range(2)) if len(e["pad"]) == pad]
    return at_limit, over_limit, http_intact, whole, pieces, over, over_pieces, ws_events
