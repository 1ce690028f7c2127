"""HTTP/1.1 edge against a real etherd process: keep-alive, pipelining, limits, errors."""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.conftest import Etherd, make_token, raw_exchange


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Etherd]:
    """A server with small limits so tests can go over each of them cheaply."""
    server = Etherd(
        tmp_path_factory.mktemp("small"),
        {
            "http": {
                "max_header_bytes": 2048,
                "max_headers": 20,
                "max_body_bytes": 4096,
                "request_timeout_s": 0.5,
                "keepalive_timeout_s": 0.8,
                "max_pipelined": 4,
            }
        },
    ).start()
    yield server
    server.kill()


def split_responses(data: bytes) -> list[tuple[int, bytes]]:
    """Split raw bytes holding several Content-Length responses into (status, body)."""
    out = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        out.append((status, rest[:length]))
        data = rest[length:]
    return out


def error_of(body: object) -> tuple[str, str]:
    assert isinstance(body, dict), body
    err = body["error"]
    assert set(err) == {"code", "message"}
    return err["code"], err["message"]


def test_health_and_readiness(etherd: Etherd) -> None:
    assert etherd.request("GET", "/healthz") == (200, {"status": "ok"})
    status, body = etherd.request("GET", "/readyz")
    assert status == 200 and body["status"] == "ready" and body["epoch"]


def test_unknown_route_and_wrong_method(etherd: Etherd) -> None:
    status, body = etherd.request("GET", "/api/nothing-here")
    assert status == 404 and error_of(body)[0] == "not_found"
    status, body = etherd.request("DELETE", "/api/publish", token="test")
    code, message = error_of(body)
    assert status == 405 and code == "method_not_allowed" and "POST" in message


def test_head_has_no_body(etherd: Etherd) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", etherd.port, timeout=5)
    conn.request("HEAD", "/healthz")
    resp = conn.getresponse()
    assert resp.status == 200 and resp.read() == b""
    assert int(resp.getheader("Content-Length", "0")) > 0
    conn.close()


def test_keep_alive_reuses_one_connection(etherd: Etherd) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", etherd.port, timeout=5)
    for _ in range(5):
        conn.request("GET", "/healthz")
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("Connection") == "keep-alive"
        resp.read()
    sock = conn.sock
    conn.request("GET", "/healthz")
    conn.getresponse().read()
    assert conn.sock is sock
    conn.close()


def test_pipelined_requests_are_answered_in_order(small: Etherd) -> None:
    # More requests than http.max_pipelined: reading pauses and resumes, order holds.
    paths = [b"/healthz", b"/nope", b"/healthz", b"/api/publish"] * 5
    data = b"".join(b"GET " + p + b" HTTP/1.1\r\nHost: x\r\n\r\n" for p in paths)
    data += b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    responses = split_responses(raw_exchange(small.port, data))
    statuses = [s for s, _ in responses]
    assert statuses == [200, 404, 200, 405] * 5 + [200]


def test_http_1_0_closes_after_the_answer(etherd: Etherd) -> None:
    raw = raw_exchange(etherd.port, b"GET /healthz HTTP/1.0\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200") and b"Connection: close" in raw


def test_malformed_request_gets_400_and_close(etherd: Etherd) -> None:
    raw = raw_exchange(etherd.port, b"THIS IS NOT HTTP\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 400")
    code, message = error_of(json.loads(raw.split(b"\r\n\r\n", 1)[1]))
    assert code == "bad_request" and "malformed" in message


def test_conflicting_length_headers_are_refused(etherd: Etherd) -> None:
    raw = raw_exchange(
        etherd.port,
        b"POST /api/publish HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
    )
    assert raw.startswith(b"HTTP/1.1 400")


def test_oversized_head_gets_431(small: Etherd) -> None:
    raw = raw_exchange(small.port, b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * 4000 + b"\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 431")
    assert b"http.max_header_bytes" in raw


def test_endless_header_line_gets_431_without_waiting_for_its_end(small: Etherd) -> None:
    with socket.create_connection(("127.0.0.1", small.port), timeout=5) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * 8000)
        raw = sock.recv(65536)
    assert raw.startswith(b"HTTP/1.1 431")


def test_too_many_headers_gets_431(small: Etherd) -> None:
    headers = b"".join(b"X-H%d: v\r\n" % i for i in range(30))
    raw = raw_exchange(small.port, b"GET /healthz HTTP/1.1\r\n" + headers + b"\r\n")
    assert raw.startswith(b"HTTP/1.1 431") and b"http.max_headers" in raw


def test_body_over_the_cap_gets_413_before_it_is_sent(small: Etherd) -> None:
    with socket.create_connection(("127.0.0.1", small.port), timeout=5) as sock:
        sock.sendall(
            b"POST /api/publish HTTP/1.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000\r\n\r\n"
        )
        raw = sock.recv(65536)
    assert raw.startswith(b"HTTP/1.1 413") and b"http.max_body_bytes" in raw


def test_chunked_body_over_the_cap_gets_413(small: Etherd) -> None:
    chunk = b"a" * 3000
    body = b"%x\r\n%s\r\n" % (len(chunk), chunk) * 2 + b"0\r\n\r\n"
    raw = raw_exchange(
        small.port,
        b"POST /api/publish HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + body,
    )
    assert raw.startswith(b"HTTP/1.1 413")


def test_expect_100_continue(etherd: Etherd) -> None:
    with socket.create_connection(("127.0.0.1", etherd.port), timeout=5) as sock:
        body = b'{"topic":"t/a","event":"e","durable":false}'
        sock.sendall(
            b"POST /api/publish HTTP/1.1\r\nAuthorization: Bearer test\r\n"
            b"Content-Type: application/json\r\nExpect: 100-continue\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)
        )
        assert sock.recv(1024).startswith(b"HTTP/1.1 100 Continue")
        sock.sendall(body)
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")


def test_slow_request_gets_408(small: Etherd) -> None:
    with socket.create_connection(("127.0.0.1", small.port), timeout=5) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        raw = sock.recv(65536)
        assert raw.startswith(b"HTTP/1.1 408")
        assert sock.recv(1) == b""  # and the connection is closed
    assert time.monotonic() - started < 3


def test_idle_keep_alive_connection_is_closed(small: Etherd) -> None:
    with socket.create_connection(("127.0.0.1", small.port), timeout=5) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        assert sock.recv(1) == b""  # closed after http.keepalive_timeout_s


def test_publish_refusals(etherd: Etherd) -> None:
    ok: dict[str, object] = {"topic": "tasks/a", "event": "e", "data": {}}
    cases: list[tuple[dict[str, str], bytes | dict[str, object], str | None, int, str]] = [
        ({}, ok, None, 401, "unauthorized"),
        ({}, ok, "not-a-jwt", 401, "unauthorized"),
        ({}, ok, make_token("bob", ttl=-120), 401, "unauthorized"),
        ({}, ok, make_token("bob"), 403, "forbidden"),
        ({"Content-Type": "text/plain"}, b"{}", "test", 415, "unsupported_media_type"),
        ({}, b"{not json", "test", 400, "bad_request"),
        ({}, {"topic": 5, "event": "e"}, "test", 422, "unprocessable"),
        ({}, {"topic": "tasks/a", "event": "e", "extra": 1}, "test", 422, "unprocessable"),
        ({}, {"topic": "tasks//a", "event": "e"}, "test", 422, "unprocessable"),
        ({}, {"topic": "tasks/*", "event": "e"}, "test", 422, "unprocessable"),
        ({}, {"topic": "tasks/a", "event": "bad name"}, "test", 422, "unprocessable"),
        (
            {},
            {"topic": "tasks/a", "event": "e", "data": {"offset": 1}},
            "test",
            422,
            "unprocessable",
        ),
        ({}, {"topic": "tasks/a", "event": "e", "data": []}, "test", 422, "unprocessable"),
        ({}, {"events": []}, "test", 422, "unprocessable"),
    ]
    for headers, body, token, status, code in cases:
        got_status, got = etherd.request("POST", "/api/publish", body, token=token, headers=headers)
        assert (got_status, error_of(got)[0]) == (status, code), (body, got)


def test_service_token_may_publish_and_claim_narrows(etherd: Etherd) -> None:
    service = make_token("svc", role="service")
    status, body = etherd.request(
        "POST", "/api/publish", {"topic": "news/x", "event": "e"}, token=service
    )
    assert status == 200 and body["published"][0]["offset"] >= 1
    narrow = make_token("svc", role="service", topics=["news/>"])
    status, body = etherd.request(
        "POST", "/api/publish", {"topic": "tasks/x", "event": "e"}, token=narrow
    )
    assert status == 403 and error_of(body)[0] == "forbidden"


def test_publish_batch_gets_consecutive_offsets(etherd: Etherd) -> None:
    events: list[dict[str, object]] = [
        {"topic": "batch/a", "event": "n", "data": {"i": i}} for i in range(5)
    ]
    events.append({"topic": "batch/b", "event": "n", "durable": False})
    status, body = etherd.request("POST", "/api/publish", {"events": events}, token="test")
    assert status == 200
    offsets = [item.get("offset") for item in body["published"]]
    assert offsets[5] is None
    first = offsets[0]
    assert offsets[:5] == list(range(first, first + 5))


def test_idempotent_publish_returns_the_first_answer(etherd: Etherd) -> None:
    body = {"topic": "idem/a", "event": "n", "data": {"v": 1}}
    headers = {"Idempotency-Key": "k-1"}
    first = etherd.request("POST", "/api/publish", body, token="test", headers=headers)
    again = etherd.request("POST", "/api/publish", body, token="test", headers=headers)
    assert first == again and first[0] == 200
    status, fresh = etherd.request("POST", "/api/publish", body, token="test")
    assert fresh["published"][0]["offset"] == first[1]["published"][0]["offset"] + 1
    other = {"topic": "idem/a", "event": "n", "data": {"v": 2}}
    status, conflict = etherd.request("POST", "/api/publish", other, token="test", headers=headers)
    assert status == 409 and error_of(conflict)[0] == "idempotency_conflict"


def test_batch_limit(tmp_path: Path) -> None:
    server = Etherd(tmp_path, {"realtime": {"max_publish_batch": 3}}).start()
    try:
        events = [{"topic": "b/a", "event": "n"}] * 4
        status, body = server.request("POST", "/api/publish", {"events": events}, token="test")
        assert status == 413 and "realtime.max_publish_batch" in error_of(body)[1]
    finally:
        server.kill()


def test_max_inflight(tmp_path: Path) -> None:
    # One request in flight across the server: a burst of batch publishes from many
    # connections is partly refused with 503 and the JSON error, never a hang.
    server = Etherd(tmp_path, {"http": {"max_inflight": 1}}).start()
    try:
        socks = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(20)]
        body = b'{"events":[' + b",".join([b'{"topic":"x/y","event":"e"}'] * 200) + b"]}"
        req = (
            b"POST /api/publish HTTP/1.1\r\nAuthorization: Bearer test\r\n"
            b"Content-Type: application/json\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)
        ) + body
        for s in socks:
            s.sendall(req)
        statuses = []
        for s in socks:
            data = b""
            while chunk := s.recv(65536):
                data += chunk
            statuses.append(int(data.split()[1]))
            s.close()
        assert set(statuses) == {200, 503}, statuses
    finally:
        server.kill()


def test_realtime_config(etherd: Etherd) -> None:
    status, body = etherd.request("GET", "/api/realtime/config")
    assert status == 200 and body["prefer_websocket"] is True
    assert body["websocket_url"] == f"ws://127.0.0.1:{etherd.port}/api/realtime"


def test_limits_on_connections_streams_and_prompts(tmp_path: Path) -> None:
    server = Etherd(
        tmp_path,
        {
            "server": {"max_connections": 2},
            "http": {"max_pending_bytes": 65536, "max_body_bytes": 2_000_000},
            "tasks": {"max_prompt_bytes": 100},
        },
    ).start()
    try:
        # server.max_connections: the third WebSocket is refused before the upgrade.
        with connect(server.ws_url + "?token=test"), connect(server.ws_url + "?token=test"):
            with pytest.raises(InvalidStatus) as refused:
                connect(server.ws_url + "?token=test")
            assert refused.value.response.status_code == 503
        # tasks.max_prompt_bytes
        status, body = server.request("POST", "/api/tasks", {"prompt": "p" * 101}, token="test")
        assert status == 413 and "tasks.max_prompt_bytes" in error_of(body)[1]
        # http.max_pending_bytes: an SSE reader that stops reading is dropped; others go on.
        stalled = socket.socket()
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.connect(("127.0.0.1", server.port))
        stalled.sendall(b"GET /api/events?topic=sse/slow&token=test HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.3)
        # Far more than the kernel's socket buffers hold, so the stream's own backlog grows.
        event = {"topic": "sse/slow", "event": "n", "data": {"pad": "x" * 8000}, "durable": False}
        for _ in range(20):
            status, _ = server.request("POST", "/api/publish", {"events": [event] * 100},
                                       token="test")  # fmt: skip
            assert status == 200
        stalled.settimeout(5)
        received = 0
        try:
            while chunk := stalled.recv(1 << 20):
                received += len(chunk)
        except ConnectionResetError:
            pass
        stalled.close()
        assert received < 2000 * 8000  # cut off, not everything was delivered
        assert server.request("GET", "/healthz")[0] == 200
    finally:
        server.kill()
