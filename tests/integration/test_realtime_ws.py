"""The WebSocket protocol at ``/api/realtime`` against a real ``etherd serve`` process.

Contract sections 2-4 and 8. Three kinds of client take part: ``websockets`` (sync API), an
independent and strict RFC 6455 client; ``picows`` on uvloop, for many connections in one
process; and raw sockets with a tiny frame codec, for what a client library refuses to do
(a Firefox-style handshake, frames in the upgrade packet, reserved close codes, a peer
that stops reading or never answers pings).

Every receive has a timeout, so a server bug fails a test instead of hanging the suite.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import struct
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import picows
import pytest
import uvloop
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from tests.conftest import Etherd, make_token
from tests.wsframes import Frame, client_frame, parse_frame, recv_by

RECV_TIMEOUT = 5.0
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
TS_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def uid() -> str:
    """A short unique suffix, so tests sharing a server never share a topic."""
    return uuid.uuid4().hex[:12]


# -- websockets (sync) helpers -------------------------------------------------------------


def ws_open(
    server: Etherd,
    token: str | None = "test",
    *,
    bearer: bool = False,
    max_queue: int | None = 16,
) -> ClientConnection:
    """A websockets connection, the token in ``?token=`` or in ``Authorization: Bearer``."""
    url = server.ws_url
    headers: dict[str, str] | None = None
    if token is not None:
        if bearer:
            headers = {"Authorization": f"Bearer {token}"}
        else:
            url += "?token=" + quote(token, safe="")
    conn = connect(
        url,
        additional_headers=headers,
        proxy=None,
        compression=None,
        open_timeout=RECV_TIMEOUT,
        close_timeout=2,
        max_queue=max_queue,
        legacy=True,  # a plain connection; callers close it (most use it in a with block)
    )
    return conn


def send_json(ws: ClientConnection, message: dict[str, Any]) -> None:
    ws.send(json.dumps(message))


def recv_json(ws: ClientConnection, timeout: float = RECV_TIMEOUT) -> dict[str, Any]:
    message = ws.recv(timeout=timeout)
    assert isinstance(message, str), f"expected a text frame, got {message!r}"
    value = json.loads(message)
    assert isinstance(value, dict), value
    return value


def subscribe(ws: ClientConnection, topics: list[str], **extra: Any) -> dict[str, Any]:
    """Send a subscribe with a fresh id and return its reply (checked to be that reply)."""
    rid = uid()
    send_json(ws, {"action": "subscribe", "topics": topics, "id": rid, **extra})
    reply = recv_json(ws)
    assert reply["type"] == "subscribed", reply
    assert reply["id"] == rid, reply
    assert set(reply) == {"type", "id", "topics", "errors"}, reply
    return reply


def until_pong(ws: ClientConnection, timeout: float = RECV_TIMEOUT) -> list[dict[str, Any]]:
    """Ping, and return every message that arrived before the matching pong.

    Replies are queued behind frames already pending for the connection, and a publish
    answers only after its frames are queued, so this is exactly what was delivered for
    everything published before the call.
    """
    rid = "sentinel-" + uid()
    send_json(ws, {"action": "ping", "id": rid})
    before: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while True:
        message = recv_json(ws, max(0.01, deadline - time.monotonic()))
        if message == {"type": "pong", "id": rid}:
            return before
        before.append(message)


def closed_with(ws: ClientConnection, timeout: float = RECV_TIMEOUT) -> int | None:
    """Read until the server closes; the close code it sent (None: no close frame)."""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ws.recv(timeout=max(0.01, deadline - time.monotonic()))
    except ConnectionClosed as exc:
        return exc.rcvd.code if exc.rcvd is not None else None
    except TimeoutError:
        pass
    raise AssertionError(f"the server did not close the connection within {timeout} s")


def send_then_closed_with(
    ws: ClientConnection, message: Any, *, text: bool | None = None
) -> int | None:
    """Send a message the server must close on; the close code it sent.

    websockets ends a fragmented message with an empty final frame, which may find the
    connection already closed by the server: that is the expected outcome, not an error.
    """
    try:
        ws.send(message, text=text)
    except ConnectionClosed as exc:
        return exc.rcvd.code if exc.rcvd is not None else None
    return closed_with(ws)


def refused_status(
    server: Etherd, token: str | None, *, bearer: bool = False
) -> tuple[int, Any, dict[str, str]]:
    """Try an upgrade that must be refused; the HTTP status, JSON body and headers."""
    with pytest.raises(InvalidStatus) as info:
        ws_open(server, token, bearer=bearer).close()
    response = info.value.response
    assert response.headers.get("Content-Type", "").startswith("application/json")
    headers = {name.lower(): value for name, value in response.headers.raw_items()}
    return response.status_code, json.loads(response.body or b"null"), headers


def assert_error_body(body: Any, code: str) -> None:
    """Contract section 8: ``{"error":{"code":...,"message":...}}`` and nothing else."""
    assert isinstance(body, dict) and set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message"}, body
    assert body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body


# -- raw sockets ---------------------------------------------------------------------------


def text_frame(message: dict[str, Any]) -> bytes:
    return client_frame(OP_TEXT, json.dumps(message).encode())


def close_frame(code: int) -> bytes:
    return client_frame(OP_CLOSE, struct.pack("!H", code))


def upgrade_request(
    port: int,
    key: str,
    *,
    path: str = "/api/realtime?token=test",
    connection: str = "Upgrade",
    extra: tuple[tuple[str, str], ...] = (),
) -> bytes:
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Upgrade: websocket",
        f"Connection: {connection}",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        *(f"{name}: {value}" for name, value in extra),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def expected_accept(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode() + WS_GUID).digest()).decode()


class RawWs:
    """A WebSocket client on a bare socket: it does exactly what the test says."""

    def __init__(self, port: int, *, rcvbuf: int | None = None) -> None:
        self.port = port
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            # Before connect, so the advertised window is small from the first segment.
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(RECV_TIMEOUT)
        self.sock.connect(("127.0.0.1", port))
        self.key = base64.b64encode(os.urandom(16)).decode()
        self.buf = bytearray()
        self.eof = False

    def __enter__(self) -> RawWs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def _fill(self, deadline: float) -> bool:
        """Read more bytes; False at EOF or when the deadline passed."""
        if self.eof:
            return False
        chunk = recv_by(self.sock, deadline)
        if chunk is None:
            return False
        if not chunk:
            self.eof = True
            return False
        self.buf += chunk
        return True

    def read_head(self, timeout: float = RECV_TIMEOUT) -> tuple[int, dict[str, str]]:
        """The HTTP response head: status and headers (lower-case names)."""
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in self.buf:
            if not self._fill(deadline):
                raise AssertionError(f"no complete response head; got {bytes(self.buf)!r}")
        head, _, rest = bytes(self.buf).partition(b"\r\n\r\n")
        self.buf = bytearray(rest)
        status_line, *lines = head.decode("latin-1").split("\r\n")
        version, status, *_ = status_line.split(" ", 2)
        assert version == "HTTP/1.1", status_line
        headers: dict[str, str] = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return int(status), headers

    def read_response(self, timeout: float = RECV_TIMEOUT) -> tuple[int, dict[str, str], bytes]:
        """A whole HTTP response with a Content-Length body."""
        deadline = time.monotonic() + timeout
        status, headers = self.read_head(timeout)
        length = int(headers.get("content-length", "0"))
        while len(self.buf) < length:
            if not self._fill(deadline):
                raise AssertionError(f"body shorter than {length}: {bytes(self.buf)!r}")
        body = bytes(self.buf[:length])
        del self.buf[:length]
        return status, headers, body

    def handshake(self, request: bytes | None = None, tail: bytes = b"") -> dict[str, str]:
        """Send the upgrade (and ``tail`` in the same write), check the 101, return headers."""
        self.sock.sendall((request or upgrade_request(self.port, self.key)) + tail)
        status, headers = self.read_head()
        assert status == 101, (status, headers, bytes(self.buf))
        assert headers.get("upgrade", "").lower() == "websocket", headers
        assert "upgrade" in headers.get("connection", "").lower(), headers
        assert headers.get("sec-websocket-accept") == expected_accept(self.key), headers
        return headers

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_json(self, message: dict[str, Any]) -> None:
        self.send(text_frame(message))

    def recv_frame(self, timeout: float = RECV_TIMEOUT) -> Frame | None:
        """The next frame, or None if the server closed the TCP connection first."""
        deadline = time.monotonic() + timeout
        while True:
            parsed = parse_frame(self.buf)
            if parsed is not None:
                frame, size = parsed
                del self.buf[:size]
                return frame
            if not self._fill(deadline):
                if self.eof:
                    assert not self.buf, f"connection ended inside a frame: {bytes(self.buf)!r}"
                    return None
                raise AssertionError(f"no frame within {timeout} s")

    def recv_json(self, timeout: float = RECV_TIMEOUT) -> dict[str, Any]:
        frame = self.recv_frame(timeout)
        assert frame is not None, "the server closed the connection"
        return frame.json()

    def close_code(self, timeout: float = RECV_TIMEOUT) -> int | None:
        """Skip data frames up to the server's CLOSE frame; return its code."""
        while True:
            frame = self.recv_frame(timeout)
            assert frame is not None, "TCP closed without a CLOSE frame"
            if frame.opcode == OP_CLOSE:
                return frame.close_code


# -- picows on uvloop ----------------------------------------------------------------------


class PicowsClient(picows.WSListener):
    """Collects the JSON messages of one picows connection."""

    def __init__(self) -> None:
        super().__init__()
        self.transport: picows.WSTransport | None = None
        self.messages: list[dict[str, Any]] = []
        self.close_code: int | None = None
        self.changed = asyncio.Event()

    def on_ws_connected(self, transport: picows.WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: picows.WSTransport, frame: picows.WSFrame) -> None:
        if frame.msg_type == picows.WSMsgType.TEXT:
            self.messages.append(json.loads(frame.get_payload_as_bytes()))
        elif frame.msg_type == picows.WSMsgType.CLOSE:
            self.close_code = int(frame.get_close_code().value)
            transport.send_close(picows.WSCloseCode.OK)
            transport.disconnect()
        self.changed.set()

    def on_ws_disconnected(self, transport: picows.WSTransport) -> None:
        self.changed.set()

    def send_json(self, message: dict[str, Any]) -> None:
        assert self.transport is not None
        self.transport.send(picows.WSMsgType.TEXT, json.dumps(message).encode())

    async def wait_messages(self, count: int, within: float = 10.0) -> list[dict[str, Any]]:
        """Wait until at least ``count`` messages arrived; return them all."""
        deadline = time.monotonic() + within
        while len(self.messages) < count:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"got {len(self.messages)} of {count} messages: {self.messages}"
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), remaining)
        return self.messages


async def picows_open(url: str, headers: dict[str, str] | None = None) -> PicowsClient:
    transport, listener = await picows.ws_connect(
        PicowsClient, url, extra_headers=headers, websocket_handshake_timeout=RECV_TIMEOUT
    )
    assert isinstance(listener, PicowsClient)
    assert listener.transport is transport
    return listener


# -- servers -------------------------------------------------------------------------------

LIMITS: dict[str, Any] = {
    "ws": {
        "max_message_bytes": 1024,
        "max_topics_per_connection": 3,
        "max_patterns_per_connection": 1,
        "max_connections_per_subject": 2,
        "max_queued_commands": 2,
    }
}


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Etherd]:
    """An etherd with small per-connection limits."""
    server = Etherd(tmp_path_factory.mktemp("limited"), LIMITS).start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture(scope="module")
def pinging(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Etherd]:
    """An etherd that pings silent connections after 0.3 s and drops them 0.3 s later."""
    config = {"ws": {"ping_interval_s": 0.3, "ping_timeout_s": 0.3}}
    server = Etherd(tmp_path_factory.mktemp("pinging"), config).start()
    try:
        yield server
    finally:
        server.kill()


# -- 1. subscribe ack and event envelope ---------------------------------------------------


def test_subscribe_ack_and_event_envelope(etherd: Etherd) -> None:
    topic = f"tasks/env-{uid()}"
    with ws_open(etherd) as ws:
        send_json(ws, {"action": "subscribe", "topics": [topic], "id": "1"})
        ack = recv_json(ws)
        epoch = ack["topics"][0]["epoch"]
        assert isinstance(epoch, str) and epoch
        assert ack == {
            "type": "subscribed",
            "id": "1",
            "topics": [{"topic": topic, "offset": 0, "epoch": epoch, "recovered": True}],
            "errors": [],
        }
        data: dict[str, Any] = {
            "task_id": "t1",
            "phase": "plan",
            "n": 3,
            "nested": {"a": [1, None]},
        }
        before = time.time()
        answer = etherd.publish(topic, "os.harness.step", **data)
        assert answer == {
            "published": [{"topic": topic, "event": "os.harness.step", "offset": 1}],
            "epoch": epoch,
        }
        event = recv_json(ws)
        ts = event.pop("ts")
        assert event == {
            "type": "os.harness.step",
            "event": "os.harness.step",
            "topic": topic,
            "offset": 1,
            **data,
        }
        assert isinstance(ts, str) and TS_RE.match(ts), ts
        stamped = datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
        assert before - 5 <= stamped.timestamp() <= time.time() + 5

        # A second durable event continues the per-topic offsets.
        etherd.publish(topic, "note", seq=2)
        assert recv_json(ws)["offset"] == 2
        assert until_pong(ws) == []

        # A second subscribe to the topic reports where it stands now.
        again = subscribe(ws, [topic])
        assert again["topics"] == [{"topic": topic, "offset": 2, "epoch": epoch, "recovered": True}]


def test_non_durable_event_has_no_offset(etherd: Etherd) -> None:
    topic = f"tasks/nd-{uid()}"
    with ws_open(etherd) as ws:
        subscribe(ws, [topic])
        status, body = etherd.request(
            "POST",
            "/api/publish",
            {"topic": topic, "event": "typing", "data": {"who": "alice"}, "durable": False},
            token="test",
        )
        assert status == 200, body
        assert body["published"] == [{"topic": topic, "event": "typing"}]
        event = recv_json(ws)
        assert "offset" not in event, event
        assert TS_RE.match(event.pop("ts"))
        assert event == {"type": "typing", "event": "typing", "topic": topic, "who": "alice"}
        # Nothing was stored: a new subscriber sees the topic at offset 0.
        assert subscribe(ws, [topic])["topics"][0]["offset"] == 0


# -- 2. authentication on the upgrade ------------------------------------------------------


def test_token_in_query_and_in_bearer_header(etherd: Etherd) -> None:
    token = make_token(f"alice-{uid()}")
    sub = jwt_sub(token)
    for bearer in (False, True):
        with ws_open(etherd, token, bearer=bearer) as ws:
            reply = subscribe(ws, [f"activity/{sub}"])
            assert [t["topic"] for t in reply["topics"]] == [f"activity/{sub}"]
            assert reply["errors"] == []
            etherd.publish(f"activity/{sub}", "activity.list_updated", task_id="t", status="x")
            event = recv_json(ws)
            assert (event["topic"], event["task_id"]) == (f"activity/{sub}", "t")


def jwt_sub(token: str) -> str:
    """The ``sub`` claim of a token (no verification: the test made it)."""
    payload = token.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    sub = claims["sub"]
    assert isinstance(sub, str)
    return sub


@pytest.mark.parametrize(
    ("token", "bearer"),
    [
        pytest.param("not-a-jwt", False, id="garbage-query"),
        pytest.param("not-a-jwt", True, id="garbage-header"),
        pytest.param(make_token("alice", ttl=-3600), False, id="expired-query"),
        pytest.param(make_token("alice", ttl=-3600), True, id="expired-header"),
        pytest.param(make_token("alice") + "x", False, id="bad-signature"),
        pytest.param(None, False, id="missing"),
    ],
)
def test_bad_expired_or_missing_token_is_401_before_upgrade(
    etherd: Etherd, token: str | None, bearer: bool
) -> None:
    status, body, headers = refused_status(etherd, token, bearer=bearer)
    assert status == 401
    assert_error_body(body, "unauthorized")
    assert headers.get("www-authenticate", "").startswith("Bearer"), headers
    assert token is None or token not in body["error"]["message"], "the token was echoed"


def test_plain_get_on_realtime_is_426(etherd: Etherd) -> None:
    for token in ("test", None):
        status, body = etherd.request("GET", "/api/realtime", token=token)
        assert status == 426
        assert_error_body(body, "upgrade_required")


# -- 3. handshakes a library would not send -------------------------------------------------

FIREFOX_HEADERS = (
    ("User-Agent", "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"),
    ("Accept", "*/*"),
    ("Accept-Language", "en-US,en;q=0.5"),
    ("Accept-Encoding", "gzip, deflate, br, zstd"),
    ("Origin", "http://localhost:5173"),
    ("Sec-WebSocket-Extensions", "permessage-deflate"),
    ("Sec-Fetch-Dest", "empty"),
    ("Sec-Fetch-Mode", "websocket"),
    ("Sec-Fetch-Site", "same-origin"),
    ("Pragma", "no-cache"),
    ("Cache-Control", "no-cache"),
)


def test_firefox_style_connection_header_upgrades(etherd: Etherd) -> None:
    with RawWs(etherd.port) as raw:
        request = upgrade_request(
            etherd.port, raw.key, connection="keep-alive, Upgrade", extra=FIREFOX_HEADERS
        )
        headers = raw.handshake(request)
        # permessage-deflate was offered but is not implemented: it must not be accepted.
        assert "sec-websocket-extensions" not in headers, headers
        raw.send_json({"action": "subscribe", "topics": ["tasks/ff"], "id": "ff"})
        reply = raw.recv_json()
        assert (reply["type"], reply["id"], reply["errors"]) == ("subscribed", "ff", [])


def test_frames_in_the_upgrade_packet_are_processed(etherd: Etherd) -> None:
    topic = f"tasks/tail-{uid()}"
    with RawWs(etherd.port) as raw:
        tail = text_frame({"action": "subscribe", "topics": [topic], "id": "t1"}) + text_frame(
            {"action": "ping", "id": "t2"}
        )
        raw.handshake(tail=tail)
        reply = raw.recv_json()
        assert (reply["type"], reply["id"]) == ("subscribed", "t1")
        assert [t["topic"] for t in reply["topics"]] == [topic]
        assert raw.recv_json() == {"type": "pong", "id": "t2"}
        etherd.publish(topic, "note", n=1)
        assert raw.recv_json()["n"] == 1


def test_upgrade_head_larger_than_2_kib(etherd: Etherd) -> None:
    cookie = "; ".join(f"c{i}={'v' * 40}" for i in range(150))
    assert len(cookie) > 6000
    with RawWs(etherd.port) as raw:
        request = upgrade_request(
            etherd.port,
            raw.key,
            connection="keep-alive, Upgrade",
            extra=(*FIREFOX_HEADERS, ("Cookie", cookie)),
        )
        assert len(request) > 2048
        raw.handshake(request, tail=text_frame({"action": "ping", "id": "big"}))
        assert raw.recv_json() == {"type": "pong", "id": "big"}


@pytest.mark.parametrize(
    "key",
    [pytest.param(None, id="missing"), pytest.param("c2hvcnQ=", id="not-16-bytes")],
)
def test_upgrade_without_a_valid_key_is_400_json(etherd: Etherd, key: str | None) -> None:
    with RawWs(etherd.port) as raw:
        request = upgrade_request(etherd.port, key or "")
        if key is None:
            request = request.replace(b"Sec-WebSocket-Key: \r\n", b"")
        raw.send(request)
        status, headers, body = raw.read_response()
        assert status == 400, (status, headers, body)
        assert headers.get("content-type", "").startswith("application/json"), (headers, body)
        assert_error_body(json.loads(body), "bad_request")


def test_upgrade_with_unsupported_version_is_426(etherd: Etherd) -> None:
    # RFC 6455 section 4.2.2: answer 426 with the versions the server speaks.
    with RawWs(etherd.port) as raw:
        raw.send(upgrade_request(etherd.port, raw.key).replace(b"Version: 13", b"Version: 8"))
        status, headers, body = raw.read_response()
        assert status == 426, (status, headers, body)
        assert headers.get("sec-websocket-version") == "13", headers
        assert_error_body(json.loads(body), "upgrade_required")


# -- 4. authorisation per topic ------------------------------------------------------------


def test_user_may_follow_only_its_own_activity(etherd: Etherd) -> None:
    with ws_open(etherd, make_token("alice")) as ws:
        reply = subscribe(ws, ["activity/alice", "activity/bob", "tasks/*"])
        assert [t["topic"] for t in reply["topics"]] == ["activity/alice"]
        assert reply["topics"][0]["recovered"] is True
        refused = {e["topic"]: e for e in reply["errors"]}
        assert set(refused) == {"activity/bob", "tasks/*"}
        for entry in refused.values():
            assert entry["code"] == "forbidden"
            assert isinstance(entry["message"], str) and entry["message"]
        # Refusals never close the connection.
        assert until_pong(ws) == []
        again = subscribe(ws, ["tasks/>"])
        assert again["topics"] == []
        assert [(e["topic"], e["code"]) for e in again["errors"]] == [("tasks/>", "forbidden")]
        assert until_pong(ws) == []


def test_harness_may_subscribe_to_harness(etherd: Etherd) -> None:
    with ws_open(etherd, make_token(f"runner-{uid()}", role="harness")) as ws:
        reply = subscribe(ws, ["harness", "activity/alice"])
        assert [t["topic"] for t in reply["topics"]] == ["harness"]
        assert [(e["topic"], e["code"]) for e in reply["errors"]] == [
            ("activity/alice", "forbidden")
        ]
        etherd.publish("harness", "task.harness.ready", task_id="t-ready", title="x")
        event = recv_json(ws)
        assert (event["event"], event["task_id"]) == ("task.harness.ready", "t-ready")


def test_admin_patterns_deliver_each_event_once(etherd: Etherd) -> None:
    root = uid()
    exact = f"tasks/{root}"
    with ws_open(etherd) as ws:
        reply = subscribe(ws, ["tasks/*", "tasks/>", exact])
        assert reply["errors"] == []
        assert [t["topic"] for t in reply["topics"]] == ["tasks/*", "tasks/>", exact]
        etherd.publish(exact, "note", n=1)  # matches all three subscriptions
        etherd.publish(f"{exact}/sub", "note", n=2)  # only tasks/>
        etherd.publish(f"activity/{root}", "note", n=3)  # none
        received = until_pong(ws)
        assert [(m["topic"], m["n"]) for m in received] == [(exact, 1), (f"{exact}/sub", 2)]


def test_topics_claim_lets_a_user_subscribe_to_a_pattern(etherd: Etherd) -> None:
    token = make_token(f"carol-{uid()}", topics=["tasks/>"])
    sub = jwt_sub(token)
    with ws_open(etherd, token) as ws:
        reply = subscribe(ws, ["tasks/*", f"activity/{sub}"])
        assert [t["topic"] for t in reply["topics"]] == ["tasks/*"]
        # The claim narrows: even the user's own activity topic is outside it.
        assert [(e["topic"], e["code"]) for e in reply["errors"]] == [
            (f"activity/{sub}", "forbidden")
        ]
        topic = f"tasks/claim-{uid()}"
        etherd.publish(topic, "note", n=1)
        assert [(m["topic"], m["n"]) for m in until_pong(ws)] == [(topic, 1)]


# -- 5. bad topics and bad messages --------------------------------------------------------


def test_invalid_topics_are_refused_with_bad_topic(etherd: Etherd) -> None:
    long_topic = "tasks/" + "x" * 294
    assert len(long_topic) == 300
    bad = ["tasks//x", "a/>/b", long_topic, "tasks/", "tasks/a b", "tasks/x*"]
    with ws_open(etherd) as ws:
        reply = subscribe(ws, [*bad, "tasks/ok"])
        assert [t["topic"] for t in reply["topics"]] == ["tasks/ok"]
        assert [e["topic"] for e in reply["errors"]] == bad
        for entry in reply["errors"]:
            assert entry["code"] == "bad_topic", entry
            assert entry["message"], entry
        assert until_pong(ws) == []


@pytest.mark.parametrize(
    ("message", "rid"),
    [
        pytest.param('{"action":"frobnicate","id":"u1"}', "u1", id="unknown-action"),
        pytest.param('{"topics":["tasks/a"],"id":"na"}', "na", id="no-action"),
        pytest.param("hello", None, id="not-json"),
        pytest.param('{"action":"subscribe","id":5}', 5, id="missing-topics"),
        pytest.param('{"action":"subscribe","topics":[],"id":"e"}', "e", id="empty-topics"),
        pytest.param('{"action":"subscribe","topics":"tasks/a","id":"s"}', "s", id="topics-str"),
        pytest.param('{"action":"unsubscribe","id":"u"}', "u", id="unsubscribe-no-topics"),
        pytest.param('["subscribe"]', None, id="not-an-object"),
        pytest.param('{"action":"subscribe","topics":["tasks/a"', None, id="truncated"),
        pytest.param(
            '{"action":"subscribe","topics":["tasks/a"],"since":{"tasks/a":-1},"id":9}',
            9,
            id="negative-since",
        ),
    ],
)
def test_bad_message_gets_error_reply_and_connection_stays(
    etherd: Etherd, message: str, rid: str | int | None
) -> None:
    with ws_open(etherd) as ws:
        ws.send(message)
        reply = recv_json(ws)
        assert set(reply) == {"type", "id", "code", "message"}, reply
        assert (reply["type"], reply["code"], reply["id"]) == ("error", "bad_request", rid)
        assert isinstance(reply["message"], str) and reply["message"]
        assert until_pong(ws) == []
        assert subscribe(ws, ["tasks/after-error"])["errors"] == []


def test_since_for_a_topic_not_subscribed_is_refused(etherd: Etherd) -> None:
    with ws_open(etherd) as ws:
        reply = subscribe(ws, ["tasks/one"], since={"tasks/other": 0})
        assert [t["topic"] for t in reply["topics"]] == ["tasks/one"]
        assert [(e["topic"], e["code"]) for e in reply["errors"]] == [
            ("tasks/other", "bad_request")
        ]


# -- 6. protocol violations close the connection -------------------------------------------


def test_binary_frame_closes_1003(etherd: Etherd) -> None:
    with ws_open(etherd) as ws:
        assert send_then_closed_with(ws, b'{"action":"ping"}') == 1003


def test_invalid_utf8_text_closes_1007(etherd: Etherd) -> None:
    with ws_open(etherd) as ws:
        message = b'{"action":"ping","id":"\xff\xfe"}'
        assert send_then_closed_with(ws, message, text=True) == 1007


def test_invalid_utf8_across_fragments_closes_1007(etherd: Etherd) -> None:
    # A valid two-byte sequence split between fragments is fine; a bad one is not.
    with ws_open(etherd) as ws:
        ws.send([b'{"action":"ping","id":"\xc3', b'\xa9"}'], text=True)
        assert recv_json(ws) == {"type": "pong", "id": "é"}
        bad = [b'{"action":"ping","id":"\xc3', b'("}']
        assert send_then_closed_with(ws, bad, text=True) == 1007


def test_fragmented_text_is_reassembled(etherd: Etherd) -> None:
    topic = f"tasks/frag-{uid()}"
    with ws_open(etherd) as ws:
        ws.send(['{"action":"subscribe",', f'"topics":["{topic}"],', '"id":"frag"}'])
        reply = recv_json(ws)
        assert (reply["type"], reply["id"]) == ("subscribed", "frag")
        assert [t["topic"] for t in reply["topics"]] == [topic]
        etherd.publish(topic, "note", n=1)
        assert recv_json(ws)["n"] == 1


def test_control_frame_between_fragments(etherd: Etherd) -> None:
    with RawWs(etherd.port) as raw:
        raw.handshake()
        raw.send(client_frame(OP_TEXT, b'{"action":"pi', fin=False))
        raw.send(client_frame(OP_PING, b"hello"))
        raw.send(client_frame(OP_CONT, b'ng","id":"x"}'))
        assert raw.recv_frame() == Frame(True, OP_PONG, b"hello")
        assert raw.recv_json() == {"type": "pong", "id": "x"}


def test_continuation_without_a_message_closes_1002(etherd: Etherd) -> None:
    with RawWs(etherd.port) as raw:
        raw.handshake()
        raw.send(client_frame(OP_CONT, b"{}"))
        assert raw.close_code() == 1002


def test_new_message_inside_a_fragmented_one_closes_1002(etherd: Etherd) -> None:
    with RawWs(etherd.port) as raw:
        raw.handshake()
        raw.send(client_frame(OP_TEXT, b'{"action":', fin=False))
        raw.send(client_frame(OP_TEXT, b'{"action":"ping"}'))
        assert raw.close_code() == 1002


def test_message_at_the_size_limit_is_processed(limited: Etherd) -> None:
    token = make_token(f"size-{uid()}", role="admin")
    with ws_open(limited, token) as ws:
        base = json.dumps({"action": "ping", "id": ""})
        message = json.dumps({"action": "ping", "id": "p" * (1024 - len(base))})
        assert len(message.encode()) == 1024
        ws.send(message)
        assert recv_json(ws)["type"] == "pong"


def test_message_over_the_size_limit_closes_1009(limited: Etherd) -> None:
    token = make_token(f"size-{uid()}", role="admin")
    with ws_open(limited, token) as ws:
        message = json.dumps({"action": "ping", "id": "p" * 2000})
        assert send_then_closed_with(ws, message) == 1009


def test_fragmented_message_over_the_size_limit_closes_1009(limited: Etherd) -> None:
    token = make_token(f"size-{uid()}", role="admin")
    with ws_open(limited, token) as ws:
        fragments = ['{"action":"ping","id":"', "p" * 600, "p" * 600, '"}']
        assert send_then_closed_with(ws, fragments) == 1009


@pytest.mark.parametrize(
    ("frames", "code"),
    [
        pytest.param(client_frame(OP_BINARY, b"{}"), 1003, id="binary"),
        pytest.param(bytes([0xC1, 0x80]) + os.urandom(4), 1002, id="rsv1"),
        pytest.param(client_frame(OP_PING, b"x" * 126), 1002, id="ping-over-125"),
        pytest.param(client_frame(OP_PING, b"x", fin=False), 1002, id="fragmented-ping"),
        pytest.param(client_frame(0x3, b"x"), 1002, id="reserved-opcode"),
        pytest.param(bytes([0x81, 2]) + b"{}", 1002, id="unmasked"),
        pytest.param(client_frame(OP_CLOSE, b"\x03"), 1002, id="close-1-byte"),
        pytest.param(client_frame(OP_CLOSE, b"\x03\xe8\xff"), 1007, id="close-reason-utf8"),
    ],
)
def test_frame_level_violation_closes(etherd: Etherd, frames: bytes, code: int) -> None:
    with RawWs(etherd.port) as raw:
        raw.handshake()
        raw.send(frames)
        assert raw.close_code() == code


@pytest.mark.parametrize("code", [1005, 1006, 999, 5000, 1004, 1015, 2999, 0])
def test_close_with_reserved_code_is_answered_1002(etherd: Etherd, code: int) -> None:
    with RawWs(etherd.port) as raw:
        raw.handshake()
        raw.send(close_frame(code))
        assert raw.close_code() == 1002


@pytest.mark.parametrize("code", [1000, 1001, 3000, 4321])
def test_close_with_valid_code_is_echoed(etherd: Etherd, code: int) -> None:
    with RawWs(etherd.port) as raw:
        raw.handshake()
        raw.send(close_frame(code))
        assert raw.close_code() == code
        assert raw.recv_frame() is None, "the server must close TCP after the close handshake"


def test_close_without_code_is_answered_normally(etherd: Etherd) -> None:
    with RawWs(etherd.port) as raw:
        raw.handshake()
        raw.send(client_frame(OP_CLOSE))
        frame = raw.recv_frame()
        assert frame is not None and frame.opcode == OP_CLOSE
        assert frame.close_code in (None, 1000), frame


def test_normal_close_is_echoed_to_websockets_client(etherd: Etherd) -> None:
    ws = ws_open(etherd)
    ws.close(1000)
    assert ws.protocol.close_sent is not None and ws.protocol.close_sent.code == 1000
    assert ws.protocol.close_rcvd is not None and ws.protocol.close_rcvd.code == 1000


# -- 7. unsubscribe and ping ---------------------------------------------------------------


def test_unsubscribe_stops_delivery(etherd: Etherd) -> None:
    keep, drop = f"tasks/keep-{uid()}", f"tasks/drop-{uid()}"
    with ws_open(etherd) as ws:
        subscribe(ws, [keep, drop])
        etherd.publish(drop, "note", n=1)
        assert [m["n"] for m in until_pong(ws)] == [1]
        send_json(ws, {"action": "unsubscribe", "topics": [drop, "tasks/never"], "id": "u"})
        assert recv_json(ws) == {"type": "unsubscribed", "id": "u", "topics": [drop]}
        etherd.publish(drop, "note", n=2)
        etherd.publish(keep, "note", n=3)
        assert [(m["topic"], m["n"]) for m in until_pong(ws)] == [(keep, 3)]


def test_ping_is_answered_with_pong_and_id(etherd: Etherd) -> None:
    with ws_open(etherd) as ws:
        send_json(ws, {"action": "ping", "id": 7})
        assert recv_json(ws) == {"type": "pong", "id": 7}
        send_json(ws, {"action": "ping"})
        assert recv_json(ws) == {"type": "pong", "id": None}


# -- 8. fan-out ----------------------------------------------------------------------------


def test_fan_out_to_100_picows_clients_in_order(etherd: Etherd) -> None:
    topic = f"tasks/fan-{uid()}"
    clients, events = 100, 50

    def publish_all() -> None:
        for seq in range(1, events + 1):
            etherd.publish(topic, "note", seq=seq)

    async def main() -> None:
        url = etherd.ws_url + "?token=test"
        conns = await asyncio.gather(*(picows_open(url) for _ in range(clients)))
        try:
            for i, conn in enumerate(conns):
                conn.send_json({"action": "subscribe", "topics": [topic], "id": i})
            for i, conn in enumerate(conns):
                (ack,) = await conn.wait_messages(1)
                assert (ack["type"], ack["id"], ack["errors"]) == ("subscribed", i, [])
            await asyncio.to_thread(publish_all)
            for conn in conns:
                got = (await conn.wait_messages(1 + events, within=15))[1:]
                assert [m["offset"] for m in got] == list(range(1, events + 1))
                assert [m["seq"] for m in got] == list(range(1, events + 1))
                assert {m["topic"] for m in got} == {topic}
        finally:
            for conn in conns:
                assert conn.transport is not None
                conn.transport.disconnect()

    uvloop.run(main())


def test_picows_client_with_bearer_header(etherd: Etherd) -> None:
    token = make_token(f"svc-{uid()}", role="service")
    topic = f"tasks/pic-{uid()}"

    async def main() -> None:
        conn = await picows_open(etherd.ws_url, {"Authorization": f"Bearer {token}"})
        assert conn.transport is not None
        try:
            conn.send_json({"action": "subscribe", "topics": [topic, "tasks/*"], "id": "p"})
            (ack,) = await conn.wait_messages(1)
            assert [t["topic"] for t in ack["topics"]] == [topic]
            assert [(e["topic"], e["code"]) for e in ack["errors"]] == [("tasks/*", "forbidden")]
            await asyncio.to_thread(etherd.publish, topic, "note", n=1)
            event = (await conn.wait_messages(2))[1]
            assert (event["topic"], event["offset"], event["n"]) == (topic, 1, 1)
            conn.transport.send_close(picows.WSCloseCode.OK)
            await asyncio.wait_for(conn.transport.wait_disconnected(), RECV_TIMEOUT)
            assert conn.transport.close_handshake is not None
            assert conn.transport.close_handshake.recv is not None
            assert conn.transport.close_handshake.recv.code == picows.WSCloseCode.OK
        finally:
            conn.transport.disconnect()

    uvloop.run(main())


# -- 9. per-connection and per-subject limits ----------------------------------------------


def test_topic_limit(limited: Etherd) -> None:
    token = make_token(f"lim-{uid()}", role="admin")
    base = f"tasks/lim-{uid()}"
    with ws_open(limited, token) as ws:
        reply = subscribe(ws, [f"{base}/1", f"{base}/2", f"{base}/3", f"{base}/4"])
        assert [t["topic"] for t in reply["topics"]] == [f"{base}/1", f"{base}/2", f"{base}/3"]
        assert [(e["topic"], e["code"]) for e in reply["errors"]] == [(f"{base}/4", "limit")]
        assert "max_topics_per_connection" in reply["errors"][0]["message"]
        # Re-subscribing a held topic is not a new one; a new one is still refused.
        reply = subscribe(ws, [f"{base}/1", f"{base}/5"])
        assert [t["topic"] for t in reply["topics"]] == [f"{base}/1"]
        assert [(e["topic"], e["code"]) for e in reply["errors"]] == [(f"{base}/5", "limit")]
        send_json(ws, {"action": "unsubscribe", "topics": [f"{base}/1"]})
        assert recv_json(ws)["type"] == "unsubscribed"
        reply = subscribe(ws, [f"{base}/5"])
        assert (reply["errors"], len(reply["topics"])) == ([], 1)


def test_topic_limit_does_not_count_held_topics_twice(limited: Etherd) -> None:
    token = make_token(f"lim-{uid()}", role="admin")
    base = f"tasks/held-{uid()}"
    with ws_open(limited, token) as ws:
        assert subscribe(ws, [f"{base}/1", f"{base}/2"])["errors"] == []
        # Holding 2 of 3: re-subscribing one held topic next to a new one makes 3, not 4.
        reply = subscribe(ws, [f"{base}/1", f"{base}/3"])
        assert reply["errors"] == []
        assert [t["topic"] for t in reply["topics"]] == [f"{base}/1", f"{base}/3"]


def test_pattern_limit_across_subscribes(limited: Etherd) -> None:
    token = make_token(f"pat-{uid()}", role="admin")
    with ws_open(limited, token) as ws:
        assert subscribe(ws, ["tasks/*"])["errors"] == []
        reply = subscribe(ws, ["harness/>"])
        assert reply["topics"] == []
        assert [(e["topic"], e["code"]) for e in reply["errors"]] == [("harness/>", "limit")]
        assert "max_patterns_per_connection" in reply["errors"][0]["message"]
        send_json(ws, {"action": "unsubscribe", "topics": ["tasks/*"]})
        assert recv_json(ws)["topics"] == ["tasks/*"]
        assert subscribe(ws, ["harness/>"])["errors"] == []


def test_commands_queued_behind_a_subscribe_are_capped(limited: Etherd) -> None:
    # A subscribe to a concrete topic reads the store; commands arriving meanwhile wait, at
    # most ws.max_queued_commands of them. Sent in one write, all the pings are parsed
    # before the subscribe can finish, so the ones past the cap are refused, and nothing
    # is lost or reordered.
    burst = 30
    with RawWs(limited.port) as raw:
        raw.handshake()
        frames = text_frame({"action": "subscribe", "topics": [f"burst/{uid()}"], "id": "s"})
        frames += b"".join(text_frame({"action": "ping", "id": n}) for n in range(burst))
        raw.send(frames)
        replies = [raw.recv_json() for _ in range(burst + 1)]
    refused = [r for r in replies if r["type"] == "error"]
    assert len(refused) == burst - 2
    assert all(r["code"] == "rate_limited" for r in refused)
    assert "ws.max_queued_commands" in refused[0]["message"]
    assert [r["id"] for r in refused] == list(range(2, burst))
    answered = [(r["type"], r["id"]) for r in replies if r["type"] != "error"]
    assert answered == [("subscribed", "s"), ("pong", 0), ("pong", 1)]


def test_pattern_limit_within_one_subscribe(limited: Etherd) -> None:
    token = make_token(f"pat-{uid()}", role="admin")
    with ws_open(limited, token) as ws:
        reply = subscribe(ws, ["tasks/*", "harness/>"])
        assert [t["topic"] for t in reply["topics"]] == ["tasks/*"]
        assert [(e["topic"], e["code"]) for e in reply["errors"]] == [("harness/>", "limit")]


def test_connections_per_subject_limit_is_429_before_upgrade(limited: Etherd) -> None:
    sub = f"dave-{uid()}"
    first = ws_open(limited, make_token(sub))
    second = ws_open(limited, make_token(sub), bearer=True)
    try:
        status, body, _ = refused_status(limited, make_token(sub))
        assert status == 429
        assert_error_body(body, "rate_limited")
        assert "max_connections_per_subject" in body["error"]["message"]
        # Another subject is not affected.
        ws_open(limited, make_token(f"erin-{uid()}")).close()
        # Once one closes, the subject may connect again.
        first.close()
        deadline = time.monotonic() + 3
        while True:
            try:
                third = ws_open(limited, make_token(sub))
            except InvalidStatus as exc:
                assert exc.response.status_code == 429
                assert time.monotonic() < deadline, "the closed connection was never released"
                time.sleep(0.05)
                continue
            third.close()
            break
    finally:
        first.close()
        second.close()


# -- 10. slow consumer ---------------------------------------------------------------------

SLOW: dict[str, Any] = {"ws": {"max_pending_bytes": 65536, "max_connections_per_subject": 1}}


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Etherd]:
    """An etherd that drops a connection once 64 KiB wait unsent for it.

    One connection per subject, so a test can see, without reading from it, when the
    server let go of a connection: a new one for the same subject is accepted again.
    """
    server = Etherd(tmp_path_factory.mktemp("slow"), SLOW).start()
    try:
        yield server
    finally:
        server.kill()


def still_connected(server: Etherd, token: str) -> bool:
    """Whether the subject of ``token`` holds its one allowed connection."""
    try:
        ws_open(server, token).close()
    except InvalidStatus as exc:
        assert exc.response.status_code == 429, exc.response
        return True
    return False


def publish_blobs(server: Etherd, topic: str, first: int, count: int = 8) -> int:
    """Publish ``count`` fire-and-forget events of about 4 KB; returns the next seq."""
    batch = [
        {"topic": topic, "event": "blob", "data": {"seq": seq, "pad": "x" * 4000}, "durable": False}
        for seq in range(first, first + count)
    ]
    status, body = server.request("POST", "/api/publish", {"events": batch}, token="test")
    assert status == 200, body
    return first + count


def stall_slow_client(server: Etherd, topic: str) -> tuple[RawWs, str, int]:
    """A subscriber that stops reading, fed until the server drops it; (client, token, sent).

    Batches stay small (32 KB) so a subscriber that does read never has 64 KiB unsent.
    """
    token = make_token(f"slow-{uid()}", role="service")
    raw = RawWs(server.port, rcvbuf=4096)
    try:
        raw.handshake(upgrade_request(server.port, raw.key, path="/api/realtime?token=" + token))
        raw.send_json({"action": "subscribe", "topics": [topic], "id": "s"})
        assert raw.recv_json()["type"] == "subscribed"
        raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sent = 0
        while still_connected(server, token):
            assert sent < 8000, "never dropped although it read nothing of 32 MB"
            sent = publish_blobs(server, topic, sent)
    except BaseException:
        raw.sock.close()
        raise
    return raw, token, sent


def test_slow_consumer_is_closed_4008_and_others_are_served(slow_server: Etherd) -> None:
    topic = f"tasks/slow-{uid()}"
    with ws_open(slow_server, make_token(f"good-{uid()}", role="service"), max_queue=None) as good:
        assert subscribe(good, [topic])["errors"] == []
        raw, _, sent = stall_slow_client(slow_server, topic)
        with raw:
            # Dropped: nothing more is queued for it.
            for _ in range(4):
                sent = publish_blobs(slow_server, topic, sent)
            # It now reads what was queued before the cap was passed, then the CLOSE.
            seqs: list[int] = []
            while True:
                frame = raw.recv_frame(timeout=10)
                assert frame is not None, f"TCP closed without a CLOSE frame after {seqs[-3:]}"
                if frame.opcode == OP_CLOSE:
                    assert frame.close_code == 4008, frame
                    assert b"slow consumer" in frame.payload[2:], frame
                    break
                seqs.append(frame.json()["seq"])
            assert seqs == list(range(len(seqs))), "events lost or reordered before the close"
            assert len(seqs) <= sent - 32
        # The well-behaved subscriber got every event, in order, and is still served.
        got = [recv_json(good, timeout=10)["seq"] for _ in range(sent)]
        assert got == list(range(sent))
        assert until_pong(good) == []
    assert slow_server.request("GET", "/healthz")[0] == 200


def server_holds_socket(server_port: int, client_port: int) -> bool:
    """Whether a process still owns the server end of a loopback TCP connection.

    Linux ``/proc/net/tcp``: a socket its process has closed is orphaned (inode 0) and
    left to the kernel, which gives up on an orphan whose peer keeps its window shut.
    """
    local = f"0100007F:{server_port:04X}"
    remote = f"0100007F:{client_port:04X}"
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            if fields[1] == local and fields[2] == remote:
                return fields[9] != "0"
    return False


def test_slow_consumer_that_never_reads_is_released(slow_server: Etherd) -> None:
    # Once dropped with 4008, a peer that keeps its receive window shut must not keep the
    # server's socket and the bytes queued on it: TCP persist probes never time out while
    # the peer answers them, so a graceful close alone waits forever.
    with RawWs(slow_server.port) as probe:
        probe.handshake()
        # The observation works: a live connection's server end is held by etherd.
        assert server_holds_socket(slow_server.port, probe.sock.getsockname()[1])
    raw, _, _ = stall_slow_client(slow_server, f"tasks/stall-{uid()}")
    with raw:
        client_port = raw.sock.getsockname()[1]
        deadline = time.monotonic() + 10
        while server_holds_socket(slow_server.port, client_port):
            assert time.monotonic() < deadline, (
                "10 s after dropping the slow consumer the server still holds its socket"
            )
            time.sleep(0.1)


# -- 11. server pings ----------------------------------------------------------------------


def test_client_answering_pings_stays_connected(pinging: Etherd) -> None:
    topic = f"tasks/alive-{uid()}"
    with ws_open(pinging) as ws:
        subscribe(ws, [topic])
        time.sleep(2.0)
        etherd_publish = pinging.publish(topic, "note", n=1)
        assert etherd_publish["published"][0]["offset"] == 1
        event = recv_json(ws)
        assert (event["topic"], event["n"]) == (topic, 1)


def test_expired_token_closes_the_connection_4001(pinging: Etherd) -> None:
    token = make_token(f"short-{uid()}", role="service", ttl=1.5)
    with ws_open(pinging, token) as ws:
        subscribe(ws, [f"tasks/exp-{uid()}"])
        start = time.monotonic()
        assert closed_with(ws, timeout=5) == 4001
        assert time.monotonic() - start < 3.5


def test_client_not_answering_pings_is_dropped(pinging: Etherd) -> None:
    with RawWs(pinging.port) as raw:
        raw.handshake()
        start = time.monotonic()
        frame = raw.recv_frame(timeout=3)
        assert frame is not None and frame.opcode == OP_PING, frame
        pinged = time.monotonic() - start
        end = raw.recv_frame(timeout=3)
        elapsed = time.monotonic() - start
        assert end is None or (end.opcode == OP_CLOSE and end.close_code == 4000), end
        assert pinged < 1.5, pinged
        assert elapsed < 2.5, elapsed


# -- 12. graceful stop ---------------------------------------------------------------------


def test_sigterm_closes_every_client_1001_and_exits_0(tmp_path: Path) -> None:
    server = Etherd(tmp_path).start()
    clients: list[ClientConnection] = []
    try:
        for i in range(3):
            ws = ws_open(server)
            subscribe(ws, [f"tasks/stop-{i}"])
            clients.append(ws)
        server.signal(signal.SIGTERM)
        codes = [closed_with(ws, timeout=10) for ws in clients]
        assert codes == [1001, 1001, 1001]
        assert server.proc is not None
        assert server.proc.wait(timeout=15) == 0
    finally:
        for ws in clients:
            ws.close()
        server.kill()


# -- 13. resume ----------------------------------------------------------------------------


def test_resume_replays_then_goes_live(etherd: Etherd) -> None:
    topic = f"tasks/r-{uid()}"
    epoch = ""
    for seq in range(1, 6):
        answer = etherd.publish(topic, "note", seq=seq)
        assert answer["published"][0]["offset"] == seq
        epoch = answer["epoch"]
    with ws_open(etherd) as ws:
        reply = subscribe(ws, [topic], since={topic: 2})
        assert reply["topics"] == [{"topic": topic, "offset": 5, "epoch": epoch, "recovered": True}]
        assert reply["errors"] == []
        replayed = [recv_json(ws) for _ in range(3)]
        assert [(m["offset"], m["seq"]) for m in replayed] == [(3, 3), (4, 4), (5, 5)]
        assert {m["event"] for m in replayed} == {"note"}
        assert until_pong(ws) == []
        etherd.publish(topic, "note", seq=6)
        assert [(m["offset"], m["seq"]) for m in until_pong(ws)] == [(6, 6)]

    with ws_open(etherd) as ws:
        reply = subscribe(ws, [topic], since={topic: 0}, epoch=epoch)
        assert reply["topics"] == [{"topic": topic, "offset": 6, "epoch": epoch, "recovered": True}]
        assert [m["offset"] for m in until_pong(ws)] == [1, 2, 3, 4, 5, 6]


def test_resume_with_another_epoch_is_not_recovered(etherd: Etherd) -> None:
    topic = f"tasks/re-{uid()}"
    for seq in range(1, 4):
        etherd.publish(topic, "note", seq=seq)
    with ws_open(etherd) as ws:
        reply = subscribe(ws, [topic], since={topic: 1}, epoch="not-this-epoch")
        (ack,) = reply["topics"]
        assert (ack["topic"], ack["offset"], ack["recovered"]) == (topic, 3, False)
        assert ack["epoch"] != "not-this-epoch"
        assert until_pong(ws) == []
        # Not recovered, but subscribed: live events still arrive.
        etherd.publish(topic, "note", seq=4)
        assert [m["offset"] for m in until_pong(ws)] == [4]


def test_resume_from_the_future_is_not_recovered(etherd: Etherd) -> None:
    topic = f"tasks/rf-{uid()}"
    etherd.publish(topic, "note", seq=1)
    with ws_open(etherd) as ws:
        (ack,) = subscribe(ws, [topic], since={topic: 50})["topics"]
        assert (ack["offset"], ack["recovered"]) == (1, False)
        assert until_pong(ws) == []


def test_since_on_a_pattern_is_refused(etherd: Etherd) -> None:
    with ws_open(etherd) as ws:
        reply = subscribe(ws, ["tasks/*"], since={"tasks/*": 0})
        assert reply["topics"] == []
        assert [(e["topic"], e["code"]) for e in reply["errors"]] == [("tasks/*", "bad_request")]
        assert until_pong(ws) == []


def test_since_on_an_already_subscribed_pattern_is_refused(etherd: Etherd) -> None:
    # A pattern has no offsets, so it can never be resumed: holding it already changes
    # nothing, and reporting recovered: true would claim a replay that never happens.
    with ws_open(etherd) as ws:
        assert subscribe(ws, ["tasks/*"])["errors"] == []
        reply = subscribe(ws, ["tasks/*"], since={"tasks/*": 0})
        assert reply["topics"] == []
        assert [(e["topic"], e["code"]) for e in reply["errors"]] == [("tasks/*", "bad_request")]


def test_resume_while_publishing_has_no_gap_or_duplicate(etherd: Etherd) -> None:
    topic = f"tasks/race-{uid()}"
    total = 120
    for seq in range(1, 21):
        etherd.publish(topic, "note", seq=seq)
    failures: list[BaseException] = []

    def publish_rest() -> None:
        try:
            for seq in range(21, total + 1):
                etherd.publish(topic, "note", seq=seq)
        except BaseException as exc:
            failures.append(exc)

    publisher = threading.Thread(target=publish_rest)
    with ws_open(etherd, max_queue=None) as ws:
        publisher.start()
        try:
            reply = subscribe(ws, [topic], since={topic: 10})
            assert reply["topics"][0]["recovered"] is True
        finally:
            publisher.join(timeout=30)
        assert not failures, failures
        offsets: list[int] = []
        while not offsets or offsets[-1] < total:
            offsets.append(recv_json(ws)["offset"])
        assert offsets == list(range(11, total + 1))
        assert until_pong(ws) == []
