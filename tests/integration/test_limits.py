"""Limits that used to be constants in the code, now configuration keys: each one set low on
a real server and gone over.

``server.listen_backlog``, ``server.drain_batches``, ``http.max_idempotency_key_chars``,
``ws.close_grace_s``, ``tasks.max_page_size``, ``tasks.max_timeline_page`` and
``tasks.timeline_scan_events``. (``tasks.sweep_batch`` and ``tasks.cache_size`` are
covered by the task service's unit tests.)
"""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from tests.conftest import Etherd, make_token

APP = "acme"
ALICE = make_token("alice")
HARNESS = make_token("h1", role="harness")


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Etherd]:
    """One server with every limit of this module set low."""
    server = Etherd(
        tmp_path_factory.mktemp("limits"),
        {
            "server": {"listen_backlog": 7},
            "http": {"max_idempotency_key_chars": 8},
            "ws": {"close_grace_s": 0.4},
            "tasks": {"max_page_size": 2, "max_timeline_page": 2, "timeline_scan_events": 3},
            "log": {"level": "warning"},
        },
    ).start()
    yield server
    server.kill()


def ok(reply: tuple[int, Any], status: int = 200) -> Any:
    code, body = reply
    assert code == status, body
    return body


def create(server: Etherd, prompt: str = "p") -> str:
    task_id: str = ok(server.request("POST", "/api/tasks", {"prompt": prompt}, ALICE), 201)["id"]
    return task_id


def test_listen_backlog_is_the_listen_queue(small: Etherd) -> None:
    out = subprocess.run(
        ["ss", "-lntH", f"sport = :{small.port}"], capture_output=True, text=True, check=True
    ).stdout.split()
    # For a listening socket ss shows the backlog as Send-Q (the third column).
    assert out[0] == "LISTEN" and out[2] == "7", out


def test_idempotency_key_longer_than_the_limit_is_refused(small: Etherd) -> None:
    body = {"topic": "limits/idem", "event": "note", "data": {}}
    status, err = small.request(
        "POST", "/api/publish", body, "test", headers={"Idempotency-Key": "123456789"}
    )
    assert status == 400, err
    assert "http.max_idempotency_key_chars" in err["error"]["message"]
    first = ok(small.request("POST", "/api/publish", body, "test", {"Idempotency-Key": "12345678"}))
    again = ok(small.request("POST", "/api/publish", body, "test", {"Idempotency-Key": "12345678"}))
    assert again == first


def test_page_sizes_are_clamped(small: Etherd) -> None:
    for _ in range(3):
        create(small)
    page = ok(small.request("GET", "/api/activity?limit=50", token=ALICE))
    assert len(page["tasks"]) == 2 and page["next_cursor"] is not None
    claimable = ok(
        small.request(
            "GET",
            "/api/harness/tasks/claimable?limit=50",
            token=HARNESS,
            headers={"X-Ether-Harness-App": APP},
        )
    )
    assert len(claimable["tasks"]) == 2


def test_timeline_page_and_scan_are_bounded(small: Etherd) -> None:
    task_id = create(small)
    headers = {"X-Ether-Harness-App": APP}
    claimed = ok(
        small.request("POST", f"/api/harness/tasks/{task_id}/claim", {}, HARNESS, headers=headers)
    )
    for n in range(3):
        ok(
            small.request(
                "POST",
                f"/api/harness/tasks/{task_id}/steps",
                {"run_id": claimed["run_id"], "phase": "p", "user_message": f"m{n}"},
                HARNESS,
                headers=headers,
            )
        )
    # create, claim and three steps: five timeline entries among the task's events.
    page = ok(small.request("GET", f"/api/tasks/{task_id}/timeline?limit=100", token=ALICE))
    assert len(page["entries"]) <= 2  # tasks.max_timeline_page
    # Three events read at most (tasks.timeline_scan_events): "next" says where it stopped.
    assert page["next"] <= 3
    seen = [e["offset"] for e in page["entries"]]
    after = page["next"]
    while True:
        more = ok(small.request("GET", f"/api/tasks/{task_id}/timeline?since={after}", token=ALICE))
        if not more["entries"] and more["next"] == after:
            break
        seen += [e["offset"] for e in more["entries"]]
        after = more["next"]
    assert len(seen) == 5 and seen == sorted(set(seen))


def _raw_upgrade(port: int, token: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET /api/realtime?token={token} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        f"Sec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def test_a_peer_that_never_answers_close_is_cut_after_the_grace(small: Etherd) -> None:
    sock = _raw_upgrade(small.port, "test")
    with sock:
        # A masked binary frame: etherd answers CLOSE 1003 and waits for the peer's CLOSE.
        sock.sendall(bytes((0x82, 0x80 | 1)) + b"\0\0\0\0" + b"x")
        started = time.monotonic()
        got = b""
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                break
            got += chunk
        elapsed = time.monotonic() - started
    assert got[:1] == b"\x88" and int.from_bytes(got[2:4], "big") == 1003, got
    # Cut after ws.close_grace_s (0.4 s), not the default 2 s.
    assert 0.3 <= elapsed < 1.5, elapsed


def _subscriber(server: Etherd, topic: str) -> ClientConnection:
    ws = connect(server.ws_url + "?token=test", proxy=None, open_timeout=5, legacy=True)
    ws.send(f'{{"action":"subscribe","topics":["{topic}"]}}')
    ws.recv(timeout=5)
    return ws


def test_one_drain_batch_closes_every_session_at_once(tmp_path: Path) -> None:
    server = Etherd(tmp_path, {"server": {"drain_window_s": 1.2, "drain_batches": 1}}).start()
    try:
        clients = [_subscriber(server, "limits/drain") for _ in range(4)]
        server.signal(signal.SIGTERM)
        closed_at = []
        for ws in clients:
            with pytest.raises(ConnectionClosed):
                while True:
                    ws.recv(timeout=5)
            closed_at.append(time.monotonic())
        # With the default (20 batches) four sessions are closed 0.3 s apart; one batch
        # closes them together.
        assert max(closed_at) - min(closed_at) < 0.25, closed_at
        assert server.proc is not None and server.proc.wait(10) == 0
    finally:
        server.kill()
