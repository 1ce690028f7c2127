"""CORS against a real etherd: ``http.cors_origins`` on answers, SSE streams and preflights."""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from etherd.core.config import ConfigError
from etherd.edge.ops.configfile import load
from tests.conftest import Etherd

ALLOWED = "http://app.example:3000"
OTHER = "http://elsewhere.example"


@pytest.fixture(scope="module")
def cors(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Etherd]:
    server = Etherd(
        tmp_path_factory.mktemp("cors"),
        {"http": {"cors_origins": [ALLOWED, "https://other.example"]}},
    ).start()
    yield server
    server.kill()


def exchange(
    server: Etherd,
    method: str,
    path: str,
    headers: dict[str, str],
    body: bytes | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One request; the status, the headers (lower-cased names) and the body."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def preflight(
    server: Etherd, origin: str, path: str, method: str = "POST"
) -> tuple[int, dict[str, str], bytes]:
    return exchange(
        server,
        "OPTIONS",
        path,
        {
            "Origin": origin,
            "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": "authorization, content-type, idempotency-key",
        },
    )


def sse_head(server: Etherd, origin: str | None) -> dict[str, str]:
    """The response head of an SSE stream (the stream itself is left unread)."""
    request = (
        "GET /api/events?topic=tasks/cors_sse&token=test HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        "Accept: text/event-stream\r\n"
    )
    if origin is not None:
        request += f"Origin: {origin}\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall((request + "\r\n").encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(4096)
            assert chunk, data
            data += chunk
    lines = data.split(b"\r\n\r\n", 1)[0].decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 200 OK", lines
    return {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}


def assert_cors(headers: dict[str, str], origin: str) -> None:
    assert headers["access-control-allow-origin"] == origin
    assert headers["vary"] == "Origin"
    assert "Idempotent-Replayed" in headers["access-control-expose-headers"]
    assert "access-control-allow-credentials" not in headers


def assert_no_cors(headers: dict[str, str]) -> None:
    assert not [name for name in headers if name.startswith("access-control-")], headers
    assert "vary" not in headers


def test_allowed_origin_can_read_answers_and_errors(cors: Etherd) -> None:
    status, headers, body = exchange(cors, "GET", "/healthz", {"Origin": ALLOWED})
    assert status == 200 and json.loads(body) == {"status": "ok"}
    assert_cors(headers, ALLOWED)
    # A refusal is readable too, so a page can show why.
    status, headers, body = exchange(
        cors,
        "POST",
        "/api/publish",
        {"Origin": ALLOWED, "Content-Type": "application/json"},
        b'{"topic":"tasks/x","event":"e"}',
    )
    assert status == 401 and json.loads(body)["error"]["code"] == "unauthorized"
    assert_cors(headers, ALLOWED)
    assert "Bearer" in headers["www-authenticate"]


def test_allowed_origin_publishes_with_a_bearer_token(cors: Etherd) -> None:
    status, headers, body = exchange(
        cors,
        "POST",
        "/api/publish",
        {
            "Origin": "https://other.example",
            "Content-Type": "application/json",
            "Authorization": "Bearer test",
        },
        b'{"topic":"tasks/cors_pub","event":"hello"}',
    )
    assert status == 200 and json.loads(body)["published"][0]["offset"] == 1
    assert_cors(headers, "https://other.example")


def test_allowed_origin_gets_the_header_on_sse(cors: Etherd) -> None:
    headers = sse_head(cors, ALLOWED)
    assert headers["content-type"] == "text/event-stream; charset=utf-8"
    assert_cors(headers, ALLOWED)
    assert_no_cors(sse_head(cors, OTHER))
    assert_no_cors(sse_head(cors, None))


@pytest.mark.parametrize(
    ("path", "methods"),
    [
        ("/api/publish", "POST"),
        ("/api/tasks", "POST"),
        ("/api/tasks/task_abc/answer", "POST"),
        ("/api/events", "GET"),
    ],
)
def test_preflight_from_an_allowed_origin(cors: Etherd, path: str, methods: str) -> None:
    status, headers, body = preflight(cors, ALLOWED, path)
    assert status == 204 and body == b""
    assert "content-length" not in headers
    assert headers["access-control-allow-methods"] == methods
    allowed = {h.strip().lower() for h in headers["access-control-allow-headers"].split(",")}
    assert allowed == {
        "authorization",
        "content-type",
        "idempotency-key",
        "x-ether-harness-app",
        "last-event-id",
    }
    assert int(headers["access-control-max-age"]) > 0
    assert_cors(headers, ALLOWED)


def test_preflight_then_request_on_one_connection(cors: Etherd) -> None:
    """A 204 has no body and no Content-Length; the connection stays usable."""
    conn = http.client.HTTPConnection("127.0.0.1", cors.port, timeout=5)
    try:
        conn.request(
            "OPTIONS",
            "/api/publish",
            headers={"Origin": ALLOWED, "Access-Control-Request-Method": "POST"},
        )
        resp = conn.getresponse()
        assert resp.status == 204 and resp.read() == b""
        conn.request("GET", "/healthz", headers={"Origin": ALLOWED})
        resp = conn.getresponse()
        assert resp.status == 200 and json.loads(resp.read()) == {"status": "ok"}
    finally:
        conn.close()


def test_preflight_on_an_unknown_route_is_404(cors: Etherd) -> None:
    status, _, body = preflight(cors, ALLOWED, "/api/nothing-here")
    assert status == 404 and json.loads(body)["error"]["code"] == "not_found"


def test_disallowed_origin_gets_no_header_and_a_403_preflight(cors: Etherd) -> None:
    status, headers, _ = exchange(cors, "GET", "/healthz", {"Origin": OTHER})
    assert status == 200
    assert_no_cors(headers)
    status, headers, body = preflight(cors, OTHER, "/api/publish")
    assert status == 403
    error = json.loads(body)["error"]
    assert error["code"] == "forbidden" and "http.cors_origins" in error["message"]
    assert_no_cors(headers)
    # Origins are compared exactly, as browsers serialise them.
    status, headers, _ = exchange(cors, "GET", "/healthz", {"Origin": ALLOWED + "/"})
    assert_no_cors(headers)


def test_no_origin_no_cors_headers(cors: Etherd) -> None:
    status, headers, _ = exchange(cors, "GET", "/healthz", {})
    assert status == 200
    assert_no_cors(headers)
    # An OPTIONS that is not a preflight is an ordinary request for a method nobody serves.
    status, headers, body = exchange(cors, "OPTIONS", "/api/publish", {})
    assert status == 405 and json.loads(body)["error"]["code"] == "method_not_allowed"


def test_default_config_adds_nothing(etherd: Etherd) -> None:
    status, headers, _ = exchange(etherd, "GET", "/healthz", {"Origin": ALLOWED})
    assert status == 200
    assert_no_cors(headers)
    assert_no_cors(sse_head(etherd, ALLOWED))
    status, headers, body = preflight(etherd, ALLOWED, "/api/publish")
    assert status == 403 and json.loads(body)["error"]["code"] == "forbidden"
    assert_no_cors(headers)


def test_any_origin_is_echoed_never_a_wildcard(tmp_path: Path) -> None:
    server = Etherd(tmp_path, {"http": {"cors_origins": ["*"]}}).start()
    try:
        status, headers, _ = exchange(server, "GET", "/healthz", {"Origin": OTHER})
        assert status == 200
        assert_cors(headers, OTHER)
        status, headers, _ = preflight(server, OTHER, "/api/publish")
        assert status == 204
        assert_cors(headers, OTHER)
    finally:
        server.kill()


@pytest.mark.parametrize(
    "origin", ["http://localhost:3000/", "localhost:3000", "http://app.example/path", "HTTP://X"]
)
def test_config_refuses_what_is_not_an_origin(tmp_path: Path, origin: str) -> None:
    path = tmp_path / "e.toml"
    path.write_text(f'[http]\ncors_origins = ["{origin}"]\n')
    with pytest.raises(ConfigError, match=r"http\.cors_origins"):
        load(path, env={})


def test_config_takes_origins_from_the_environment() -> None:
    env = {"ETHERD_HTTP_CORS_ORIGINS": "http://localhost:3000, https://app.example"}
    config = load(None, env=env)
    assert config.http.cors_origins == ["http://localhost:3000", "https://app.example"]
    assert load(None, env={}).http.cors_origins == []
