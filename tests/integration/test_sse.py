"""Server-Sent Events through a real HTTP client: live events, resume, heartbeats, refusals."""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import Etherd, make_token


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Etherd]:
    s = Etherd(tmp_path_factory.mktemp("sse"), {"realtime": {"sse_heartbeat_s": 0.2}}).start()
    yield s
    s.kill()


class EventStream:
    """A minimal EventSource: parses fields per the HTML spec's event-stream format."""

    def __init__(self, server: Etherd, path: str, headers: dict[str, str] | None = None) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        self.conn.request("GET", path, headers=headers or {})
        self.resp = self.conn.getresponse()
        self.comments: list[str] = []

    def next_event(self) -> dict[str, Any]:
        fields: dict[str, Any] = {}
        while True:
            line = self.resp.readline().decode().rstrip("\n")
            if line == "":
                if fields:
                    if "data" in fields:
                        fields["data"] = json.loads(fields["data"])
                    return fields
                continue
            if line.startswith(":"):
                self.comments.append(line[1:].strip())
                continue
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")

    def close(self) -> None:
        self.conn.close()


def test_live_events_and_format(server: Etherd) -> None:
    stream = EventStream(server, "/api/events?topic=sse/live&token=test")
    try:
        assert stream.resp.status == 200
        assert stream.resp.getheader("Content-Type", "").startswith("text/event-stream")
        assert stream.resp.getheader("Transfer-Encoding") == "chunked"
        first = server.publish("sse/live", "progress", text="one")
        server.request(
            "POST",
            "/api/publish",
            {"topic": "sse/live", "event": "flash", "durable": False},
            token="test",
        )
        ev = stream.next_event()
        assert ev["event"] == "progress"
        assert ev["id"] == str(first["published"][0]["offset"])
        assert ev["data"]["text"] == "one" and ev["data"]["topic"] == "sse/live"
        flash = stream.next_event()
        assert flash["event"] == "flash" and "id" not in flash
    finally:
        stream.close()


def test_resume_with_last_event_id_and_since(server: Etherd) -> None:
    offsets = [server.publish("sse/r", "n", i=i)["published"][0]["offset"] for i in range(4)]
    stream = EventStream(
        server,
        "/api/events?topic=sse/r",
        {"Authorization": "Bearer test", "Last-Event-ID": str(offsets[1])},
    )
    try:
        got = [int(stream.next_event()["id"]) for _ in range(2)]
        assert got == offsets[2:]
        live = server.publish("sse/r", "n", i=9)["published"][0]["offset"]
        assert int(stream.next_event()["id"]) == live == offsets[-1] + 1
    finally:
        stream.close()
    stream = EventStream(server, "/api/events?topic=sse/r&since=0&token=test")
    try:
        assert [int(stream.next_event()["id"]) for _ in range(5)] == [*offsets, live]
    finally:
        stream.close()


def test_heartbeat_comments(server: Etherd) -> None:
    stream = EventStream(server, "/api/events?topic=sse/quiet&token=test")
    try:
        server.publish("sse/quiet", "n")
        # Reading the first event passes any comments sent before it; wait for one more.
        stream.next_event()
        time.sleep(0.5)
        server.publish("sse/quiet", "n")
        stream.next_event()
        assert "heartbeat" in stream.comments
    finally:
        stream.close()


@pytest.mark.parametrize(
    ("path", "headers", "status", "code"),
    [
        ("/api/events?topic=sse/a", {}, 401, "unauthorized"),
        ("/api/events?topic=activity/bob", {"Authorization": "Bearer USER"}, 403, "forbidden"),
        ("/api/events?topic=sse//a&token=test", {}, 422, "unprocessable"),
        ("/api/events?token=test", {}, 400, "bad_request"),
        ("/api/events?topic=sse/a&since=x&token=test", {}, 400, "bad_request"),
        ("/api/events?topic=sse/*&since=1&token=test", {}, 400, "bad_request"),
    ],
)
def test_refusals(
    server: Etherd, path: str, headers: dict[str, str], status: int, code: str
) -> None:
    if headers.get("Authorization") == "Bearer USER":
        headers = {"Authorization": "Bearer " + make_token("alice")}
    got_status, body = server.request("GET", path, headers=headers)
    assert got_status == status and body["error"]["code"] == code
