"""The pure parts of etherd.client: backoff, URLs, token expiry, error mapping, and the
HTTP/1.1 client against a scripted asyncio server (keep-alive, chunked bodies, a stale
connection)."""

from __future__ import annotations

import asyncio
import base64
import json
import random

import pytest

from etherd.client import (
    AlreadyClaimed,
    ApiError,
    Forbidden,
    LeaseExpired,
    NotFound,
    RunEnded,
    RunMismatch,
    TaskCancelled,
    TransportError,
    Unauthorized,
    backoff_delay,
    http_url,
    token_expiry,
    websocket_url,
)
from etherd.client.errors import api_error
from etherd.client.http import HttpClient


def test_backoff_grows_is_capped_and_jittered() -> None:
    rng = random.Random(7)
    for attempt in range(12):
        ceiling = min(5.0, 0.1 * 2**attempt)
        delays = [backoff_delay(attempt, 0.1, 5.0, rng) for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(set(delays)) > 1  # jitter: clients that dropped together spread out
    assert backoff_delay(10_000, 0.1, 5.0, rng) <= 5.0


@pytest.mark.parametrize(
    ("given", "ws", "http"),
    [
        ("http://127.0.0.1:8080", "ws://127.0.0.1:8080/api/realtime", "http://127.0.0.1:8080"),
        ("https://ether.example/", "wss://ether.example/api/realtime", "https://ether.example"),
        ("ws://h:1/api/realtime", "ws://h:1/api/realtime", "http://h:1"),
        ("wss://h", "wss://h/api/realtime", "https://h"),
    ],
)
def test_urls(given: str, ws: str, http: str) -> None:
    assert websocket_url(given) == ws
    assert http_url(given) == http


def test_a_url_of_another_scheme_is_refused() -> None:
    with pytest.raises(ValueError, match="expected an http"):
        websocket_url("ftp://h")


def jwt_with(claims: dict[str, object]) -> str:
    body = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"eyJhbGciOiJIUzI1NiJ9.{body}.sig"


def test_token_expiry() -> None:
    assert token_expiry(jwt_with({"sub": "a", "exp": 1700000000})) == 1700000000.0
    assert token_expiry(jwt_with({"sub": "a"})) is None
    assert token_expiry(jwt_with({"exp": True})) is None
    assert token_expiry("test") is None
    assert token_expiry("a.!!!.c") is None


@pytest.mark.parametrize(
    ("status", "code", "kind"),
    [
        (401, "unauthorized", Unauthorized),
        (403, "forbidden", Forbidden),
        (404, "not_found", NotFound),
        (409, "already_claimed", AlreadyClaimed),
        (409, "lease_expired", LeaseExpired),
        (409, "run_mismatch", RunMismatch),
        (409, "cancelled", TaskCancelled),
        (409, "invalid_transition", ApiError),
        (503, "not_ready", ApiError),
    ],
)
def test_error_answers_become_their_exception(status: int, code: str, kind: type) -> None:
    error = api_error(status, {"error": {"code": code, "message": "why"}})
    assert type(error) is kind
    assert (error.status, error.code, error.message) == (status, code, "why")
    if code in ("lease_expired", "run_mismatch", "cancelled"):
        assert isinstance(error, RunEnded)


def test_an_error_without_a_json_body() -> None:
    error = api_error(502, None)
    assert (type(error), error.code, error.message) == (ApiError, "", "HTTP 502")


class Scripted:
    """A TCP server answering each request with the next scripted bytes (None: hang up)."""

    def __init__(self, answers: list[bytes | None]) -> None:
        self.answers = answers
        self.connections = 0
        self.requests: list[bytes] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while self.answers:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                self.requests.append(head + await reader.readexactly(length))
                answer = self.answers.pop(0)
                if answer is None:
                    break
                writer.write(answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()


async def scripted(answers: list[bytes | None]) -> tuple[Scripted, asyncio.Server, str]:
    script = Scripted(answers)
    server = await asyncio.start_server(script.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return script, server, f"http://127.0.0.1:{port}"


OK = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{"a": true}'
CHUNKED = (
    b'HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{"b"\r\n4\r\n: 1}\r\n0\r\n\r\n'
)


def test_http_client_keeps_the_connection_and_reads_chunked_bodies() -> None:
    async def go() -> None:
        script, server, url = await scripted([OK, CHUNKED])
        async with server:
            client = HttpClient(url)
            first = await client.request("POST", "/x", body=b'{"q":1}', headers={"X-A": "1"})
            second = await client.request("GET", "/y")
            await client.close()
        assert (first.status, first.json(), first.headers["content-type"]) == (
            200,
            {"a": True},
            "application/json",
        )
        assert (second.status, second.json()) == (201, {"b": 1})
        assert script.connections == 1
        assert script.requests[0].startswith(b"POST /x HTTP/1.1\r\nHost: 127.0.0.1:")
        assert b'X-A: 1\r\nContent-Length: 7\r\n\r\n{"q":1}' in script.requests[0]

    asyncio.run(go())


def test_http_client_resends_on_a_connection_the_server_closed_while_idle() -> None:
    async def go() -> None:
        # The server takes the second request on the kept connection and hangs up without
        # answering: the client sends it again on a new connection.
        script, server, url = await scripted([OK, None, OK])
        async with server:
            client = HttpClient(url)
            await client.request("GET", "/a")
            again = await client.request("GET", "/b")
            await client.close()
        assert again.status == 200
        assert script.connections == 2
        assert [r.split(b" ")[1] for r in script.requests] == [b"/a", b"/b", b"/b"]

    asyncio.run(go())


def test_http_client_transport_errors_are_one_exception() -> None:
    async def go() -> None:
        _, server, url = await scripted([b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\nshort"])
        async with server:
            with pytest.raises(TransportError, match="closed the connection mid-answer"):
                await HttpClient(url).request("GET", "/")
        _, server, url = await scripted([b"NONSENSE\r\n\r\n"])
        async with server:
            with pytest.raises(TransportError, match="malformed answer"):
                await HttpClient(url).request("GET", "/")
        server.close()
        with pytest.raises(TransportError, match="cannot reach"):
            await HttpClient(url, timeout=2).request("GET", "/")
        with pytest.raises(ValueError, match="http:// or https://"):
            HttpClient("ws://h")

    asyncio.run(go())
