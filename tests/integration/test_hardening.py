"""Hostile clients against a real server: each way a client could make etherd hold memory
without bound or outlive its token, reproduced, and the bound asserted.

Memory is the server's resident set (``VmRSS``). Kernel socket buffers are not part of it,
so a bound measured this way is what etherd itself keeps; each margin below says what it
allows for. The attacks live in ``tests/attacks.py`` so the stress suite runs the same ones
at scale.
"""

from __future__ import annotations

import json
import re
import select
import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jwt
import pytest

from tests import attacks
from tests.attacks import Held, SseReader
from tests.conftest import Etherd, make_token
from tests.wsframes import OP_CLOSE

H = "127.0.0.1"
MB = 1024 * 1024
BIG = 2**63  # one past the largest offset the stores keep


def uid() -> str:
    return f"{time.monotonic_ns():x}"


def rss(server: Etherd) -> int:
    assert server.proc is not None
    return attacks.rss_bytes(server.proc.pid)


def peak_rss(server: Etherd, seconds: float = 1.0) -> int:
    """The highest resident set over a short window (the attack's effect has to settle)."""
    peak = rss(server)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.05)
        peak = max(peak, rss(server))
    return peak


def hits(server: Etherd, key: str) -> float:
    return attacks.limit_hits(H, server.port, key) or 0.0


def sample(server: Etherd, name: str, **labels: str) -> float:
    return attacks.metric(H, server.port, name, **labels) or 0.0


def healthy_within(server: Etherd, seconds: float = 2.0) -> float:
    """Another client's health check while an attack runs: answered, and how fast."""
    status, _, took = attacks.get(H, server.port, "/healthz", timeout=seconds + 3)
    assert status == 200
    assert took < seconds, f"/healthz took {took:.2f} s under attack"
    return took


def wait_for(what: Callable[[], bool], seconds: float, message: str) -> None:
    deadline = time.monotonic() + seconds
    while not what():
        assert time.monotonic() < deadline, message
        time.sleep(0.05)


def wait_stalled(server: Etherd, minimum: float = 1.0, seconds: float = 10.0) -> float:
    """Wait until replay bytes in flight are at least ``minimum`` and stop moving (the
    replay waits for a client that does not read); their amount."""
    deadline = time.monotonic() + seconds
    last = -1.0
    steady = 0
    while steady < 3:
        assert time.monotonic() < deadline, f"the replay never stalled ({last} bytes in flight)"
        now = sample(server, "etherd_replay_bytes")
        steady = steady + 1 if now == last and now >= minimum else 0
        last = now
        time.sleep(0.1)
    return last


def error_code(raw: bytes) -> tuple[int, str]:
    """Status and JSON error code of a raw HTTP answer with a Content-Length body."""
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    return status, json.loads(body)["error"]["code"]


def make(tmp: Path, store_url: str | None = None, **sections: dict[str, Any]) -> Etherd:
    config: dict[str, Any] = {"log": {"level": "warning"}, **sections}
    if store_url is not None:
        config["store"] = {"url": store_url}
    return Etherd(tmp, config).start()


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Etherd]:
    """One server on SQLite with defaults, but SSE heartbeats (and expiry checks) at 0.2 s."""
    server = make(tmp_path_factory.mktemp("hub"), realtime={"sse_heartbeat_s": 0.2})
    yield server
    server.kill()


# -- 1. answers nobody reads ---------------------------------------------------------------


@pytest.mark.parametrize("path", ["/healthz", "/api/nope"])
def test_pipelined_requests_whose_answers_nobody_reads_hold_bounded_memory(
    hub: Etherd, path: str
) -> None:
    before = rss(hub)
    # 32 MB of requests is about 130 MB of answers; the server must stop taking them.
    with attacks.pipeline_flood(H, hub.port, 32 * MB, path, seconds=8.0, stall_s=1.0) as flood:
        grown = peak_rss(hub, 0.5) - before
        healthy_within(hub)
        assert flood.stalled, f"the server took all {flood.sent} bytes without answers read"
        # What it holds: answers up to the write high-water mark (256 KiB), requests up to
        # http.max_pending_bytes (4 MiB) or 32 pipelined, parser and allocator slack. The
        # bytes that stalled sit in kernel buffers, outside the resident set.
        assert grown <= 30 * MB, f"resident set grew {grown / MB:.1f} MB; sent {flood.sent}"
    wait_for(lambda: attacks.get(H, hub.port, "/healthz")[0] == 200, 5, "not serving after")


# -- 2. replays ----------------------------------------------------------------------------


def test_resumes_that_never_read_hold_bounded_memory(tmp_path: Path, store_url: str) -> None:
    server = make(tmp_path, store_url, http={"max_body_bytes": 4 * MB})
    try:
        topic = f"attack/backlog-{uid()}"
        count, size, clients = 2000, 30_000, 20
        head = attacks.publish_backlog(H, server.port, topic, count, size, batch_bytes=3 * MB)
        assert head == count
        backlog = count * size
        before = rss(server)
        held, replies = attacks.stalled_resumes(H, server.port, topic, clients)
        with held:
            assert all(r["topics"][0]["recovered"] for r in replies), replies[0]
            grown = peak_rss(server) - before
            in_flight = sample(server, "etherd_replay_bytes")
            healthy_within(server)
            # Another client resuming the same backlog meanwhile gets all of it.
            fast = attacks.read_resume(H, server.port, topic, count, timeout=30)
            assert fast.offsets == list(range(1, count + 1)) and fast.close_code is None
        # Unbounded, each would hold the whole 60 MB backlog (1.2 GB). Bounded, each holds
        # about one page (realtime.replay_page_bytes, 256 KiB) plus the write high-water
        # mark (256 KiB) and the frames around them; 80 MB leaves room for the store's page
        # cache and allocator slack and is still under 7 % of the unbounded figure.
        assert grown < 80 * MB, f"{grown / MB:.1f} MB for {clients} stalled resumes"
        assert grown < 0.25 * clients * backlog
        # Replay bytes read and not taken: at most a page (and one event past it) each.
        assert 0 < in_flight <= clients * (256 * 1024 + size + 1024), in_flight
    finally:
        server.kill()


def sse_events(server: Etherd, path: str, count: int, timeout: float = 20.0) -> list[int]:
    """Ids of the first ``count`` events of an SSE stream read as fast as it comes."""
    sock = attacks.sse_open(H, server.port, path)
    with sock:
        reader = SseReader(sock)
        assert reader.read_head() == 200, bytes(reader.body)
        ids: list[int] = []
        deadline = time.monotonic() + timeout
        while len(ids) < count:
            event = reader.event(max(0.01, deadline - time.monotonic()))
            assert event is not None, f"the stream ended after {len(ids)} events"
            ids.append(int(event["id"]))
        return ids


def test_a_fast_client_gets_a_replay_larger_than_its_cap(tmp_path: Path, store_url: str) -> None:
    cap = 1 * MB
    server = make(
        tmp_path,
        store_url,
        ws={"max_pending_bytes": cap},
        http={"max_pending_bytes": cap, "max_body_bytes": 4 * MB},
    )
    try:
        topic = f"attack/big-{uid()}"
        count = 340  # 10 MB of 30 KB events: ten times either cap
        attacks.publish_backlog(H, server.port, topic, count, 30_000, batch_bytes=3 * MB)
        got = attacks.read_resume(H, server.port, topic, count)
        assert got.close_code is None, f"closed {got.close_code} after {len(got.offsets)}"
        assert got.offsets == list(range(1, count + 1))
        ids = sse_events(server, f"/api/events?topic={topic}&since=0&token=test", count)
        assert ids == list(range(1, count + 1))
        assert sample(server, "etherd_slow_consumer_closes_total", kind="ws") == 0
        assert sample(server, "etherd_slow_consumer_closes_total", kind="sse") == 0
    finally:
        server.kill()


def drain_until_closed(reader: attacks.WsReader, seconds: float = 10.0) -> int | None:
    """Read everything a stalled WebSocket was sent; the CLOSE code, or None if the server
    cut the connection before its CLOSE got through."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        got = reader.frame(max(0.01, deadline - time.monotonic()))
        if got is None:
            return None
        if got[0] == OP_CLOSE:
            return int(struct.unpack("!H", got[1][:2])[0])
    raise AssertionError(f"not closed within {seconds} s")


def test_live_events_held_behind_a_stalled_replay_count_toward_the_cap(
    tmp_path: Path, store_url: str
) -> None:
    cap = 1 * MB
    server = make(
        tmp_path, store_url, ws={"max_pending_bytes": cap}, http={"max_body_bytes": 4 * MB}
    )
    try:
        topic = f"attack/held-{uid()}"
        attacks.publish_backlog(H, server.port, topic, 340, 30_000, batch_bytes=3 * MB)
        held, _ = attacks.stalled_resumes(H, server.port, topic, 1)
        with held:
            wait_stalled(server)
            # The topic goes on: 1.5 MB of live events wait behind the replay.
            attacks.publish_backlog(H, server.port, topic, 50, 30_000, batch_bytes=3 * MB)
            wait_for(
                lambda: sample(server, "etherd_slow_consumer_closes_total", kind="ws") == 1,
                5,
                "the stalled resume was not dropped",
            )
            assert drain_until_closed(held.readers[0]) in (4008, None)
        assert hits(server, "ws.max_pending_bytes") == 1
        wait_for(lambda: sample(server, "etherd_replay_bytes") == 0, 5, "replay bytes kept")
    finally:
        server.kill()


def test_a_spent_replay_budget_refuses_new_resumes(tmp_path: Path, store_url: str) -> None:
    page, budget = 200_000, 100_000
    server = make(
        tmp_path,
        store_url,
        realtime={"replay_page_bytes": page, "max_replay_bytes": budget},
        http={"max_body_bytes": 4 * MB},
    )
    try:
        topic = f"attack/budget-{uid()}"
        attacks.publish_backlog(H, server.port, topic, 340, 30_000, batch_bytes=3 * MB)
        held, _ = attacks.stalled_resumes(H, server.port, topic, 1)
        with held:
            # One stalled resume holds one page: realtime.replay_page_bytes is its size.
            assert budget <= wait_stalled(server, budget) <= page + 30_100
            refused = attacks.ws_open(H, server.port)
            with refused.sock:
                refused.send({"action": "subscribe", "topics": [topic], "since": {topic: 0}})
                reply = refused.json()
                assert reply["type"] == "subscribed" and reply["topics"] == [], reply
                assert [(e["topic"], e["code"]) for e in reply["errors"]] == [(topic, "overloaded")]
                assert "realtime.max_replay_bytes" in reply["errors"][0]["message"]
                # A subscribe without a resume needs no replay and is not refused.
                refused.send({"action": "subscribe", "topics": [topic]})
                assert refused.json()["errors"] == []
            status, body = server.request("GET", f"/api/events?topic={topic}&since=0&token=test")
            assert status == 503 and body["error"]["code"] == "overloaded", body
            status, body = server.request(
                "GET", f"/api/events?topic={topic}&token=test", headers={"Last-Event-ID": "5"}
            )
            assert status == 503 and body["error"]["code"] == "overloaded", body
        assert sample(server, "etherd_replays_refused_total", kind="ws") == 1
        assert sample(server, "etherd_replays_refused_total", kind="sse") == 2
        assert hits(server, "realtime.max_replay_bytes") == 3
        # Once the stalled client is gone its page is given back and resumes start again.
        wait_for(lambda: sample(server, "etherd_replay_bytes") == 0, 5, "budget not returned")
        got = attacks.read_resume(H, server.port, topic, 340)
        assert got.reply["errors"] == [] and len(got.offsets) == 340
    finally:
        server.kill()


# -- 3. bytes after an upgrade request on a stream -----------------------------------------


@pytest.fixture(scope="module")
def lagging(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Etherd]:
    """A server whose publishes wait 1.5 s for their group commit."""
    server = make(tmp_path_factory.mktemp("lagging"), store={"batch_max_delay_ms": 1500.0})
    yield server
    server.kill()


def publish_request(topic: str) -> bytes:
    body = json.dumps({"topic": topic, "event": "first", "data": {}}).encode()
    return (
        f"POST /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer test\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


@pytest.mark.parametrize("behind_a_slow_request", [False, True])
def test_upgrade_headers_on_an_event_stream_do_not_make_the_server_buffer(
    lagging: Etherd, behind_a_slow_request: bool
) -> None:
    topic = f"attack/upgrade-{uid()}"
    # Behind a publish that takes 1.5 s the stream starts late: the junk must not pile up
    # in the meantime (reading pauses at the upgrade request until it is answered).
    before = publish_request(topic) if behind_a_slow_request else b""
    start = rss(lagging)
    flood = attacks.upgrade_flood(
        H,
        lagging.port,
        f"/api/events?topic={topic}&token=test",
        300 * MB,
        seconds=3.0,
        stall_s=3.0,
        before=before,
    )
    with flood:
        grown = peak_rss(lagging, 0.5) - start
        # Unbounded, the resident set grew by each byte sent (300 MB behind the publish).
        assert grown <= 30 * MB, f"resident set grew {grown / MB:.1f} MB for {flood.sent}"
        healthy_within(lagging)
        reader = SseReader(flood.socks[0])
        reader.raw += flood.answer
        if behind_a_slow_request:
            # The publish is answered with close (an upgrade request waits behind it, and
            # only a WebSocket may take the bytes after one over), and nothing else.
            assert reader.read_head() == 200 and b"connection: close" in reader.head.lower()
            assert json.loads(bytes(reader.body))["published"][0]["offset"] == 1
            assert reader.event(timeout=5) is None and reader.eof
            return
        # The stream drops what the client sends: the server goes on taking bytes.
        assert flood.sent >= 30 * MB, f"only {flood.sent} bytes were taken"
        assert reader.read_head() == 200
        assert b"text/event-stream" in reader.head
        offset = lagging.publish(topic, "after", n=1)["published"][0]["offset"]
        event = reader.event(timeout=5)
        assert event is not None and event["event"] == "after" and int(event["id"]) == offset


# -- 4. positions that do not fit ----------------------------------------------------------


def test_a_websocket_resume_past_63_bits_is_refused_and_registers_nothing(hub: Etherd) -> None:
    topic = f"attack/big-since-{uid()}"

    def subscriptions() -> int:
        status, stats = hub.request("GET", "/api/admin/stats", token="test")
        assert status == 200, stats
        return int(stats["subscriptions"])

    before = subscriptions()
    ws = attacks.ws_open(H, hub.port)
    with ws.sock:
        ws.send({"action": "subscribe", "topics": [topic], "since": {topic: BIG}, "id": "big"})
        reply = ws.json()
        assert reply["type"] == "error" and reply["code"] == "bad_request", reply
        assert reply["id"] == "big"
        assert subscriptions() == before
        hub.publish(topic, "note", n=1)
        # A pong is queued behind anything delivered before it: nothing came.
        ws.send({"action": "ping", "id": "p"})
        assert ws.json() == {"type": "pong", "id": "p"}
        # The largest offset that fits is a resume from the future: not recovered.
        ws.send({"action": "subscribe", "topics": [topic], "since": {topic: BIG - 1}})
        ack = ws.json()
        assert ack["type"] == "subscribed" and ack["topics"][0]["recovered"] is False, ack


@pytest.mark.parametrize(
    ("path", "headers", "field"),
    [
        (f"/api/events?topic=attack/n&token=test&since={BIG}", {}, "since"),
        ("/api/events?topic=attack/n&token=test&since=" + quote("²"), {}, "since"),
        ("/api/events?topic=attack/n&token=test", {"Last-Event-ID": "²"}, "Last-Event-ID"),
        ("/api/events?topic=attack/n&token=test", {"Last-Event-ID": str(BIG)}, "Last-Event-ID"),
        (f"/api/tasks/TASK/timeline?since={BIG}", {}, "since"),
        (f"/api/tasks/TASK/timeline?limit={BIG}", {}, "limit"),
        ("/api/tasks/TASK/timeline?since=" + quote("١٢"), {}, "since"),
        (f"/api/activity?limit={BIG}", {}, "limit"),
        ("/api/activity?limit=" + quote("²"), {}, "limit"),
        ("/api/activity?cursor=junk", {}, "cursor"),
        ("/api/activity?cursor=" + quote("²") + ".task_x", {}, "cursor"),
        (f"/api/activity?cursor={BIG * 10}.task_x", {}, "cursor"),
    ],
)
def test_numbers_that_do_not_fit_are_400(
    hub: Etherd, path: str, headers: dict[str, str], field: str
) -> None:
    if "TASK" in path:
        status, task = hub.request("POST", "/api/tasks", {"prompt": "p"}, token="test")
        assert status == 201, task
        path = path.replace("TASK", task["id"])
    status, body = hub.request("GET", path, token="test", headers=headers)
    assert status == 400 and body["error"]["code"] == "bad_request", (status, body)
    assert field.split("-")[0].lower() in body["error"]["message"].lower(), body


# -- 5. an event stream outliving its token -------------------------------------------------


def test_an_event_stream_ends_when_its_token_expires(hub: Etherd) -> None:
    topic = f"attack/exp-{uid()}"
    token = make_token(f"exp-{uid()}", role="admin", ttl=2.5)
    exp = int(jwt.decode(token, options={"verify_signature": False})["exp"])
    sock = attacks.sse_open(H, hub.port, f"/api/events?topic={topic}&token={token}")
    with sock:
        reader = SseReader(sock)
        assert reader.read_head() == 200
        hub.publish(topic, "live", n=1)
        live = reader.event()
        assert live is not None and live["event"] == "live"
        expired = reader.event(timeout=exp - time.time() + 3)
        arrived = time.time()
        assert expired is not None and expired["event"] == "expired", expired
        assert expired["data"] == {"topic": topic, "exp": exp}
        # Checked on each heartbeat (0.2 s): not before the token's exp, and soon after.
        assert exp - 0.05 <= arrived <= exp + 2.0, (exp, arrived)
        # Then the stream ends: its last chunk, and nothing published later arrives.
        hub.publish(topic, "late", n=2)
        assert reader.event(timeout=3) is None
        assert reader.ended


# -- 6. slow consumers are counted ---------------------------------------------------------


def test_websocket_slow_consumer_closes_are_counted(tmp_path: Path) -> None:
    server = make(tmp_path, ws={"max_pending_bytes": 64 * 1024})
    try:
        topic = f"attack/slow-{uid()}"
        reader = attacks.ws_open(H, server.port, rcvbuf=4096)
        with reader.sock:
            reader.send({"action": "subscribe", "topics": [topic]})
            assert reader.json()["type"] == "subscribed"
            sent = 0
            while sample(server, "etherd_slow_consumer_closes_total", kind="ws") == 0:
                assert sent < 8000, "never dropped although it read nothing of 32 MB"
                batch = [
                    {"topic": topic, "event": "b", "data": {"pad": "x" * 4000}, "durable": False}
                    for _ in range(8)
                ]
                status, body = server.request("POST", "/api/publish", {"events": batch}, "test")
                assert status == 200, body
                sent += 8
            assert drain_until_closed(reader) in (4008, None)
        assert sample(server, "etherd_slow_consumer_closes_total", kind="ws") == 1
        assert hits(server, "ws.max_pending_bytes") == 1
    finally:
        server.kill()


# -- 7. connections that say nothing -------------------------------------------------------


@pytest.fixture(scope="module")
def capped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Etherd]:
    """At most 20 plain HTTP connections."""
    server = make(tmp_path_factory.mktemp("capped"), http={"max_connections": 20})
    yield server
    server.kill()


def closed_ones(held: Held, seconds: float) -> int:
    """How many of the held sockets the server closed within ``seconds``."""
    closed: set[socket.socket] = set()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and len(closed) < len(held.socks):
        ready, _, _ = select.select([s for s in held.socks if s not in closed], [], [], 0.1)
        for sock in ready:
            try:
                data = sock.recv(4096)
            except ConnectionResetError:
                data = b""
            if not data:
                closed.add(sock)
        if closed:
            break
    return len(closed)


def test_at_the_connection_cap_an_idle_connection_makes_room(capped: Etherd) -> None:
    with attacks.idle_connections(H, capped.port, 20) as idle:
        healthy_within(capped)
        assert closed_ones(idle, 3.0) >= 1, "no idle connection was closed to make room"


def test_at_the_connection_cap_with_none_idle_a_new_one_gets_503(capped: Etherd) -> None:
    before = hits(capped, "http.max_connections")
    with attacks.half_requests(H, capped.port, 20):
        raw = attacks.raw_request(H, capped.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert error_code(raw) == (503, "overloaded"), raw
        assert b"http.max_connections" in raw and b"Connection: close" in raw
    wait_for(lambda: attacks.get(H, capped.port, "/healthz")[0] == 200, 5, "cap not given back")
    assert hits(capped, "http.max_connections") == before + 1


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Etherd]:
    """A server that closes a silent connection after 0.5 s."""
    server = make(tmp_path_factory.mktemp("edge"), http={"first_byte_timeout_s": 0.5})
    yield server
    server.kill()


def test_a_connection_that_sends_nothing_is_closed_after_the_first_byte_timeout(
    edge: Etherd,
) -> None:
    before = hits(edge, "http.first_byte_timeout_s")
    took = attacks.silent_connection(H, edge.port, timeout=10)
    assert took is not None, "a silent connection stayed open 10 s"
    assert 0.4 <= took < 2.5, took  # 0.5 s, not the 75 s keep-alive timeout
    assert hits(edge, "http.first_byte_timeout_s") == before + 1
    # A connection that asked something is held to the keep-alive timeout instead.
    with socket.create_connection((H, edge.port), timeout=5) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        sock.settimeout(1.5)
        with pytest.raises(TimeoutError):
            sock.recv(4096)


@pytest.mark.parametrize("ext_bytes", [50_000, 1_000_000])
def test_a_chunk_header_over_the_cap_is_400(edge: Etherd, ext_bytes: int) -> None:
    before = hits(edge, "http.max_chunk_extension_bytes")
    raw = attacks.chunk_extension(H, edge.port, ext_bytes)
    answer = raw[raw.index(b"\r\n\r\n") + 4 :] if raw.startswith(b"HTTP/1.1 100") else raw
    assert error_code(answer) == (400, "bad_request"), raw[:400]
    assert b"http.max_chunk_extension_bytes" in answer
    assert hits(edge, "http.max_chunk_extension_bytes") == before + 1
    # Within the cap the same request is served.
    ok = attacks.chunk_extension(H, edge.port, 1000, split=False)
    assert b"HTTP/1.1 200 OK" in ok, ok[:400]


@pytest.mark.parametrize(
    "request_line",
    [b"GET /", b"GET /healthz", b"GET /healthz HTTP/0.9", b"GET /healthz HTTP/2.0"],
)
def test_other_http_versions_are_505(edge: Etherd, request_line: bytes) -> None:
    extra = b"" if request_line.count(b" ") < 2 else b"Host: x\r\n"
    raw = attacks.raw_request(H, edge.port, request_line + b"\r\n" + extra + b"\r\n")
    assert raw.startswith(b"HTTP/1.1 505 HTTP Version Not Supported\r\n"), raw[:200]
    assert error_code(raw) == (505, "http_version_not_supported")
    assert re.search(rb"(?im)^connection: close\r$", raw)
    # HTTP/1.0 is still served.
    ok = attacks.raw_request(H, edge.port, b"GET /healthz HTTP/1.0\r\n\r\n")
    assert ok.startswith(b"HTTP/1.1 200"), ok[:200]


# -- every limit the hardening added -------------------------------------------------------


def _over_max_connections(server: Etherd) -> None:
    with attacks.half_requests(H, server.port, 2):
        raw = attacks.raw_request(H, server.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert error_code(raw) == (503, "overloaded")
    # The metrics request after this needs one of the two places back.
    wait_for(lambda: attacks.get(H, server.port, "/healthz")[0] == 200, 5, "cap not given back")


def _over_first_byte_timeout(server: Etherd) -> None:
    took = attacks.silent_connection(H, server.port)
    assert took is not None and took < 2.5


def _over_chunk_extension(server: Etherd) -> None:
    raw = attacks.chunk_extension(H, server.port, 200)
    assert b"HTTP/1.1 400" in raw and b"http.max_chunk_extension_bytes" in raw


def _stalled_budget(server: Etherd) -> Held:
    topic = "attack/limits"
    attacks.publish_backlog(H, server.port, topic, 400, 30_000)
    held, _ = attacks.stalled_resumes(H, server.port, topic, 1)
    wait_stalled(server)
    return held


def _over_replay_budget(server: Etherd) -> None:
    with _stalled_budget(server):
        status, body = server.request("GET", "/api/events?topic=attack/limits&since=0&token=test")
        assert status == 503 and body["error"]["code"] == "overloaded"


def _over_replay_page(server: Etherd) -> None:
    # Going over a page splits the replay: a stalled client holds one 30 KB event per
    # piece, not the 12 MB backlog.
    with _stalled_budget(server):
        assert sample(server, "etherd_replay_bytes") <= 30_000 + 200


LIMITS: dict[str, tuple[dict[str, Any], Callable[[Etherd], None], bool]] = {
    # key: (configuration, the attack going over it, whether it is counted as a limit hit)
    "http.max_connections": ({"http": {"max_connections": 2}}, _over_max_connections, True),
    "http.first_byte_timeout_s": (
        {"http": {"first_byte_timeout_s": 0.3}},
        _over_first_byte_timeout,
        True,
    ),
    "http.max_chunk_extension_bytes": (
        {"http": {"max_chunk_extension_bytes": 64}},
        _over_chunk_extension,
        True,
    ),
    "realtime.max_replay_bytes": (
        {"realtime": {"max_replay_bytes": 1, "replay_page_bytes": 1}},
        _over_replay_budget,
        True,
    ),
    # A page size is not a refusal: going over it is counted nowhere.
    "realtime.replay_page_bytes": (
        {"realtime": {"replay_page_bytes": 1}},
        _over_replay_page,
        False,
    ),
}


@pytest.mark.parametrize("key", list(LIMITS))
def test_going_over_each_new_limit(tmp_path: Path, key: str) -> None:
    config, attack, counted = LIMITS[key]
    server = make(tmp_path, **config)
    try:
        attack(server)
        got = attacks.limit_hits(H, server.port, key)
        if counted:
            assert got is not None and got >= 1, f"no etherd_limit_hits_total{{limit={key!r}}}"
        else:
            assert got is None
    finally:
        server.kill()
