"""The browser UI's server side (``edge.api.web``, ``edge.api.ops``) against a real etherd:
static files and their headers, the operator's stats, who-am-I, and the development token
in the realtime config.
"""

from __future__ import annotations

import http.client
import json
import re
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
from websockets.sync.client import connect

from etherd.edge.api.ops import Stats
from etherd.edge.api.web import FILES
from etherd.services.stats import RateSampler
from tests.conftest import Etherd, make_token, raw_exchange

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; "
    "connect-src 'self' ws://{host} wss://{host}; img-src 'self' data:; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'"
)


def get(
    server: Etherd, path: str, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[http.client.HTTPResponse, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp, resp.read()
    finally:
        conn.close()


@pytest.mark.parametrize(
    ("path", "ctype"),
    [
        ("/", "text/html; charset=utf-8"),
        ("/client.js", "text/javascript; charset=utf-8"),
        ("/web/app.js", "text/javascript; charset=utf-8"),
        ("/web/style.css", "text/css; charset=utf-8"),
        ("/web/icon.svg", "image/svg+xml"),
    ],
)
def test_files_are_served_with_a_strict_policy(etherd: Etherd, path: str, ctype: str) -> None:
    resp, body = get(etherd, path)
    assert resp.status == 200 and body
    assert resp.getheader("Content-Type") == ctype
    assert resp.getheader("X-Content-Type-Options") == "nosniff"
    assert resp.getheader("Cache-Control") == "no-cache"
    assert resp.getheader("Content-Security-Policy") == CSP.format(host=f"127.0.0.1:{etherd.port}")


def test_the_page_has_no_inline_code_and_loads_nothing_from_elsewhere(etherd: Etherd) -> None:
    _, page = get(etherd, "/")
    html = page.decode()
    assert re.findall(r"<script\b[^>]*>", html) == ['<script type="module" src="/web/app.js">']
    assert "<style" not in html and " style=" not in html and " on" + "click=" not in html
    assert "://" not in html
    for name, found in FILES.items():
        text = found.body.decode(errors="replace")
        # No URL to another site in any file (documentation examples use the reserved
        # .example names), and every module import is served here.
        urls = re.findall(r"https?://[^\s\"'`)]+", text)
        assert all(
            re.match(r"https?://(127\.0\.0\.1[:/]|www\.w3\.org/2000/svg|[\w.-]+\.example\b)", u)
            for u in urls
        ), (name, urls)
        for imported in re.findall(r'from "(/[^"]+)"', text):
            resp, _ = get(etherd, imported)
            assert resp.status == 200, f"{name} imports {imported}, which is not served"
    referenced = re.findall(r'(?:src|href)="(/[^"]+)"', html)
    assert referenced
    for ref in referenced:
        assert get(etherd, ref)[0].status == 200, ref


def test_head_answers_without_a_body(etherd: Etherd) -> None:
    raw = raw_exchange(etherd.port, b"HEAD / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and body == b""
    assert b"Content-Length: %d" % len(FILES["index.html"].body) in head


@pytest.mark.parametrize(
    "path",
    [
        "/web/nope.js",
        "/web/..%2Fapi.py",
        "/web/%2e%2e%2f%2e%2e%2fpyproject.toml",
        "/web/..%5C__init__.py",
        "/web/.hidden.js",
        "/web/index.html%00.js",
        "/web/app.js/extra",
        "/web/",
        "/client.js/x",
    ],
)
def test_unknown_names_are_404_json_and_nothing_else_is_reachable(
    etherd: Etherd, path: str
) -> None:
    resp, body = get(etherd, path)
    assert resp.status == 404, (path, body)
    assert resp.getheader("Content-Type") == "application/json"
    assert json.loads(body)["error"]["code"] == "not_found"


def test_wrong_method_and_odd_host(etherd: Etherd) -> None:
    resp, body = get(etherd, "/", method="POST")
    assert resp.status == 405 and json.loads(body)["error"]["code"] == "method_not_allowed"
    # A Host header that is not a host:port only gets 'self'.
    resp, _ = get(etherd, "/", headers={"Host": "a b; script-src *"})
    csp = resp.getheader("Content-Security-Policy") or ""
    assert "connect-src 'self'; " in csp and "script-src *" not in csp


def test_stats_need_an_admin_token(etherd: Etherd) -> None:
    status, body = etherd.request("GET", "/api/admin/stats")
    assert status == 401 and body["error"]["code"] == "unauthorized"
    status, body = etherd.request("GET", "/api/admin/stats", token=make_token("alice"))
    assert status == 403 and body["error"]["code"] == "forbidden"
    assert "admin" in body["error"]["message"]
    status, body = etherd.request("GET", "/api/admin/stats", token="not-a-token")
    assert status == 401


def test_stats_describe_the_server(etherd: Etherd) -> None:
    topic = "stats/watched"
    with (
        connect(etherd.ws_url + "?token=test", proxy=None) as a,
        connect(etherd.ws_url + "?token=test", proxy=None) as b,
    ):
        for ws in (a, b):
            ws.send(json.dumps({"action": "subscribe", "topics": [topic, "stats/>"], "id": 1}))
            assert json.loads(ws.recv(timeout=5))["type"] == "subscribed"
        etherd.publish(topic, "note", n=1)
        assert json.loads(a.recv(timeout=5))["offset"] == 1
        status, raw = etherd.request(
            "GET", "/api/admin/stats", token=make_token("ops", role="admin")
        )
    assert status == 200
    stats = msgspec.convert(raw, Stats)
    assert set(raw) == {
        "node",
        "started_at",
        "connections",
        "subscriptions",
        "topics",
        "rates",
        "store",
    }
    assert stats.connections.websocket >= 2
    assert stats.subscriptions >= 4
    counts = {t.topic: t.subscribers for t in stats.topics}
    assert counts[topic] == 2 and counts["stats/>"] == 2
    assert [t.subscribers for t in stats.topics] == sorted(
        (t.subscribers for t in stats.topics), reverse=True
    )
    assert stats.rates.published_per_s > 0 and stats.rates.stored_per_s > 0
    assert stats.rates.delivered_per_s > 0 and stats.rates.commits_per_s > 0
    _, ready = etherd.request("GET", "/readyz")
    assert stats.store.up and stats.store.kind == "sqlite" and stats.store.epoch == ready["epoch"]
    assert stats.store.queue_rows == 0
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", stats.started_at)


def test_whoami(etherd: Etherd) -> None:
    status, me = etherd.request("GET", "/api/whoami", token=make_token("alice", ttl=600))
    assert status == 200
    assert (me["sub"], me["role"], me["dev"]) == ("alice", "user", False)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.000Z", me["expires_at"])
    status, me = etherd.request("GET", "/api/whoami", token="test")
    assert me == {"sub": "dev", "role": "admin", "expires_at": None, "dev": True}
    status, body = etherd.request("GET", "/api/whoami")
    assert status == 401 and body["error"]["code"] == "unauthorized"


@pytest.fixture(scope="module")
def no_dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Etherd]:
    server = Etherd(tmp_path_factory.mktemp("nodev"), {"auth": {"dev": False}}).start()
    yield server
    server.kill()


def test_the_development_token_is_offered_only_in_development_mode(
    etherd: Etherd, no_dev: Etherd
) -> None:
    status, config = etherd.request("GET", "/api/realtime/config")
    assert status == 200 and config["dev_token"] == "test"
    status, config = no_dev.request("GET", "/api/realtime/config")
    assert status == 200 and "dev_token" not in config
    status, body = no_dev.request("GET", "/api/whoami", token="test")
    assert status == 401 and body["error"]["code"] == "unauthorized"


def test_rates_span_the_last_five_seconds() -> None:
    now = [100.0]
    counters = [(0, 0, 0, 0)]
    sampler = RateSampler(lambda: counters[0], clock=lambda: now[0])
    # One sample a second, 10 events a second, 2 commits a second.
    for second in range(1, 11):
        now[0] = 100.0 + second
        counters[0] = (10 * second, 20 * second, 2 * second, 10 * second)
        sampler.sample()
    now[0] += 0.5
    rates = sampler.rates()
    assert rates.published_per_s == pytest.approx(10 * 5 / 5.5, rel=0.01)
    assert rates.delivered_per_s == pytest.approx(20 * 5 / 5.5, rel=0.01)
    assert rates.commits_per_s == pytest.approx(2 * 5 / 5.5, rel=0.01)
    # Right after start: the rate since the first sample.
    fresh = RateSampler(lambda: counters[0], clock=lambda: now[0])
    assert fresh.rates().published_per_s == 0.0
    now[0] += 2
    counters[0] = (counters[0][0] + 8, *counters[0][1:])
    assert fresh.rates().published_per_s == 4.0


def test_files_is_the_web_directory(tmp_path: Path) -> None:
    web = Path(__file__).resolve().parents[2] / "etherd" / "web"
    assert set(FILES) == {p.name for p in web.iterdir() if p.is_file()}
    assert {"index.html", "client.js", "app.js", "style.css"} <= set(FILES)
