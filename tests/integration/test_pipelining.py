"""Pipelined requests on one keep-alive connection, against a real server: handled at once
(their events share group commits), answered in request order, committed in request order,
and a streaming route ends the pipeline without answering what followed it."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import pytest

from tests.conftest import Etherd

N = 60


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Etherd]:
    srv = Etherd(
        tmp_path_factory.mktemp("pipelining"),
        {"http": {"max_pipelined": 64}, "store": {"batch_max_delay_ms": 20.0}},
    ).start()
    yield srv
    srv.kill()


def post(path: str, body: dict[str, object]) -> bytes:
    data = json.dumps(body).encode()
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer test\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    ).encode() + data


def read_answers(sock: socket.socket, n: int) -> list[tuple[int, bytes]]:
    answers, _ = read_answers_and_rest(sock, n)
    return answers


def read_answers_and_rest(sock: socket.socket, n: int) -> tuple[list[tuple[int, bytes]], bytes]:
    """``n`` answers, and the bytes read past them (what came next in the same reads)."""
    buf = b""
    out: list[tuple[int, bytes]] = []
    while len(out) < n:
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed after {len(out)} answers"
            buf += chunk
        head, _, rest = buf.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        length = next(
            int(line.split(b":")[1]) for line in lines if line.lower().startswith(b"content-length")
        )
        while len(rest) < length:
            rest += sock.recv(65536)
        out.append((int(lines[0].split()[1]), rest[:length]))
        buf = rest[length:]
    return out, buf


def commits(server: Etherd) -> float:
    status, text = server.request("GET", "/metrics", token="test")
    assert status == 200
    for line in text.decode().splitlines():
        if line.startswith("etherd_store_commits_total "):
            return float(line.split()[1])
    raise AssertionError("no etherd_store_commits_total")


def test_pipelined_publishes_share_commits_and_keep_their_order(server: Etherd) -> None:
    before = commits(server)
    stream = b"".join(
        post("/api/publish", {"topic": "pipe/a", "event": "note", "data": {"n": n}})
        for n in range(N)
    )
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(stream)
        answers = read_answers(sock, N)
    assert all(status == 200 for status, _ in answers)
    offsets = [json.loads(body)["published"][0]["offset"] for _, body in answers]
    assert offsets == list(range(1, N + 1))
    # One at a time would take N commits; handled at once they share a few.
    assert commits(server) - before < N / 4


def test_a_stream_ends_the_pipeline(server: Etherd) -> None:
    stream = (
        post("/api/publish", {"topic": "pipe/b", "event": "note", "data": {}})
        + b"GET /api/events?topic=pipe/b&token=test HTTP/1.1\r\nHost: x\r\n\r\n"
        + post("/api/publish", {"topic": "pipe/b", "event": "after", "data": {}})
    )
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(stream)
        ((status, body),), rest = read_answers_and_rest(sock, 1)
        assert status == 200 and json.loads(body)["published"][0]["offset"] == 1
        sock.settimeout(1.0)
        try:
            while b": etherd stream" not in rest:
                rest += sock.recv(65536)
        except TimeoutError:
            pass
    assert rest.startswith(b"HTTP/1.1 200 OK") and b"text/event-stream" in rest
    # The request after the stream was neither answered nor handled: no "after" event.
    assert b"HTTP/1.1" not in rest[rest.index(b"\r\n\r\n") :]
    replay = server.request("GET", "/api/tasks/none/timeline", token="test")[0]
    assert replay == 404
    status, body = server.request(
        "POST", "/api/publish", {"topic": "pipe/b", "event": "probe", "data": {}}, token="test"
    )
    assert status == 200 and body["published"][0]["offset"] == 2
