"""The WebSocket actions beyond subscribing (contract section 4): ``publish``, ``refresh``
and ``presence``, against a real server with real clients."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from websockets.sync.client import ClientConnection, connect

from tests.conftest import Etherd, make_token

SERVICE = make_token("svc", role="service")


def uid() -> str:
    return uuid.uuid4().hex[:8]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Etherd]:
    srv = Etherd(
        tmp_path_factory.mktemp("ws-actions"),
        {
            "ws": {"max_inflight_publishes": 2, "ping_interval_s": 0.5, "ping_timeout_s": 1.0},
            "auth": {"leeway_s": 0},
            # Commits wait 300 ms for their batch, so publishes stay in flight long enough.
            "store": {"batch_max_delay_ms": 300.0},
        },
    ).start()
    yield srv
    srv.kill()


def ws_open(server: Etherd, token: str) -> ClientConnection:
    return connect(f"{server.ws_url}?token={token}", proxy=None, open_timeout=5, legacy=True)


def send(ws: ClientConnection, **command: Any) -> None:
    ws.send(json.dumps(command))


def recv(ws: ClientConnection) -> dict[str, Any]:
    message: dict[str, Any] = json.loads(ws.recv(timeout=5))
    return message


def reply_to(ws: ClientConnection, rid: str) -> dict[str, Any]:
    """The reply with ``id`` ``rid`` (events and other replies in between are skipped)."""
    while True:
        message = recv(ws)
        if message.get("id") == rid:
            return message


def subscribe(ws: ClientConnection, topic: str) -> None:
    send(ws, action="subscribe", topics=[topic], id="sub")
    assert reply_to(ws, "sub")["type"] == "subscribed"


def test_publish_is_acknowledged_with_its_offset_and_delivered(server: Etherd) -> None:
    topic = f"ws/pub-{uid()}"
    with ws_open(server, SERVICE) as pub, ws_open(server, "test") as sub:
        subscribe(sub, topic)
        send(pub, action="publish", topic=topic, event="note", data={"n": 1}, id="p1")
        ack = reply_to(pub, "p1")
        assert ack == {"type": "published", "id": "p1", "topic": topic, "offset": 1}
        event = recv(sub)
        assert (event["event"], event["offset"], event["n"]) == ("note", 1, 1)
        send(pub, action="publish", topic=topic, event="tick", durable=False, id="p2")
        assert reply_to(pub, "p2") == {"type": "published", "id": "p2", "topic": topic}
        transient = recv(sub)
        assert transient["event"] == "tick" and "offset" not in transient


def test_publishes_share_commits_and_answer_in_order(server: Etherd) -> None:
    topic = f"ws/burst-{uid()}"
    with ws_open(server, SERVICE) as pub:
        for n in range(2):
            send(pub, action="publish", topic=topic, event="note", data={"n": n}, id=f"b{n}")
        # Both wait for the same 300 ms batch; a third finds the limit reached.
        send(pub, action="publish", topic=topic, event="note", id="b2")
        refused = reply_to(pub, "b2")
        assert refused["code"] == "rate_limited"
        assert "ws.max_inflight_publishes" in refused["message"]
        offsets = [reply_to(pub, f"b{n}")["offset"] for n in range(2)]
        assert offsets == [1, 2]


@pytest.mark.parametrize(
    ("token", "command", "code"),
    [
        (make_token("alice"), {"topic": "ws/x", "event": "note"}, "forbidden"),
        (SERVICE, {"topic": "ws/*", "event": "note"}, "unprocessable"),
        (SERVICE, {"topic": "ws//x", "event": "note"}, "unprocessable"),
        (SERVICE, {"topic": "ws/x", "event": "note", "data": {"offset": 3}}, "unprocessable"),
        (SERVICE, {"topic": "ws/x", "event": "bad name!"}, "bad_request"),
    ],
)
def test_refused_publishes_are_error_replies(
    server: Etherd, token: str, command: dict[str, Any], code: str
) -> None:
    with ws_open(server, token) as ws:
        send(ws, action="publish", id="r", **command)
        error = reply_to(ws, "r")
        assert (error["type"], error["code"]) == ("error", code), error
        send(ws, action="ping", id="alive")
        assert reply_to(ws, "alive")["type"] == "pong"


def test_refresh_replaces_the_token_before_it_expires(server: Etherd) -> None:
    sub = f"r-{uid()}"
    with ws_open(server, make_token(sub, role="service", ttl=1.5)) as ws:
        fresh = make_token(sub, role="service", ttl=3600)
        send(ws, action="refresh", token=fresh, id="f")
        refreshed = reply_to(ws, "f")
        assert refreshed["type"] == "refreshed" and refreshed["exp"] > time.time() + 3000
        # Past the first token's expiry the connection is still served.
        time.sleep(2.5)
        send(ws, action="ping", id="still")
        assert reply_to(ws, "still")["type"] == "pong"


def test_refused_refreshes_keep_the_old_token(server: Etherd) -> None:
    sub = f"k-{uid()}"
    with ws_open(server, make_token(sub, role="service", ttl=1.5)) as ws:
        send(ws, action="refresh", token="not-a-jwt", id="bad")
        assert reply_to(ws, "bad")["code"] == "unauthorized"
        send(ws, action="refresh", token=make_token("someone-else", role="service"), id="o")
        assert reply_to(ws, "o")["code"] == "forbidden"
        # The old token stays in force until its own expiry: then 4001.
        with pytest.raises(Exception) as info:
            while True:
                recv(ws)
        assert getattr(getattr(info.value, "rcvd", None), "code", None) == 4001


def test_presence_counts_subscribers_for_those_allowed(server: Etherd) -> None:
    topic = f"activity/p-{uid()}"
    user = topic.split("/")[1]
    with ws_open(server, "test") as a, ws_open(server, "test") as b:
        subscribe(a, topic)
        subscribe(b, topic)
        with ws_open(server, make_token(user)) as owner:
            send(owner, action="presence", topic=topic, id="q")
            assert reply_to(owner, "q") == {
                "type": "presence",
                "id": "q",
                "topic": topic,
                "subscribers": 2,
            }
        b.close()
        with ws_open(server, make_token("stranger")) as other:
            send(other, action="presence", topic=topic, id="no")
            assert reply_to(other, "no")["code"] == "forbidden"
        send(a, action="presence", topic=topic, id="one")
        deadline = time.monotonic() + 5
        while reply_to(a, "one")["subscribers"] != 1:
            assert time.monotonic() < deadline
            send(a, action="presence", topic=topic, id="one")
