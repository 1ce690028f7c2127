"""Running etherd as a service, against real ``etherd serve`` processes.

systemd's notify protocol (a real unix datagram socket stands in for systemd), socket
activation (a socket the test binds and passes as descriptor 3), the graceful drain on
SIGTERM, reload on SIGHUP, ``/metrics``, ``/readyz``, JSON logs and ``check-config``, and
the unit files (``systemd-analyze verify`` when it is installed, a structural check always).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import tomli_w
from prometheus_client.parser import text_string_to_metric_families
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from tests.conftest import SECRET, Etherd, free_port, make_token
from tests.pgcluster import PgCluster

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "systemd"
RECV_TIMEOUT = 5.0


def wait_for(check: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    """Poll ``check`` until it is true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def ws_subscribe(server: Etherd, topic: str, token: str = "test") -> ClientConnection:
    """A WebSocket client subscribed to one topic."""
    ws = connect(
        f"{server.ws_url}?token={token}",
        proxy=None,
        open_timeout=RECV_TIMEOUT,
        close_timeout=2,
        legacy=True,  # a plain connection; the test closes it
    )
    ws.send(json.dumps({"action": "subscribe", "topics": [topic], "id": "s"}))
    reply = json.loads(ws.recv(timeout=RECV_TIMEOUT))
    assert reply["type"] == "subscribed", reply
    return ws


def scrape(server: Etherd, token: str | None = "test") -> dict[str, dict[tuple[Any, ...], float]]:
    """``GET /metrics`` parsed: sample name -> {sorted label items: value}."""
    status, body = server.request("GET", "/metrics", token=token)
    assert status == 200, body
    assert isinstance(body, bytes)
    samples: dict[str, dict[tuple[Any, ...], float]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict[str, dict[tuple[Any, ...], float]], name: str, **labels: str) -> float:
    return samples.get(name, {}).get(tuple(sorted(labels.items())), 0.0)


def readyz(server: Etherd) -> int:
    try:
        return server.request("GET", "/readyz", timeout=2.0)[0]
    except OSError:
        return 0


def in_flight(server: Etherd) -> float:
    return value(scrape(server), "etherd_http_requests_in_flight")


# -- unit files ----------------------------------------------------------------------------


def parse_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """A systemd unit file as {section: [(key, value), ...]}; fails on malformed lines."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        assert not line.endswith("\\"), f"{path.name}:{number}: no continuation lines"
        if line.startswith("["):
            assert re.fullmatch(r"\[[A-Za-z]+\]", line), f"{path.name}:{number}: {line!r}"
            current = sections.setdefault(line[1:-1], [])
            continue
        key, eq, val = line.partition("=")
        assert eq and re.fullmatch(r"[A-Za-z][A-Za-z0-9]*", key.strip()), (
            f"{path.name}:{number}: not KEY=VALUE: {line!r}"
        )
        assert current is not None, f"{path.name}:{number}: key outside a section"
        current.append((key.strip(), val.strip()))
    return sections


def settings(unit: dict[str, list[tuple[str, str]]], section: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for key, val in unit.get(section, []):
        out.setdefault(key, []).append(val)
    return out


def test_service_unit_declares_notify_hardening_and_limits() -> None:
    unit = parse_unit(UNITS / "etherd.service")
    assert set(unit) == {"Unit", "Service", "Install"}
    svc = {k: v[-1] for k, v in settings(unit, "Service").items()}
    assert svc["Type"] == "notify"
    assert svc["User"] == "etherd" and svc["Group"] == "etherd"
    assert svc["Restart"] == "on-failure"
    assert int(svc["LimitNOFILE"]) >= 262144
    pre = svc["ExecStartPre"].split()
    assert pre[0].endswith("/etherd") and pre[1] == "check-config"
    start = svc["ExecStart"].split()
    assert start[0] == pre[0] and start[1] == "serve"
    assert "$MAINPID" in svc["ExecReload"] and "-HUP" in svc["ExecReload"]
    # The stop timeout covers the default drain (delay + window + grace) with room to spare.
    from etherd.core.config import ServerConfig

    defaults = ServerConfig()
    drain = defaults.shutdown_delay_s + defaults.drain_window_s + defaults.shutdown_grace_s
    assert float(svc["TimeoutStopSec"].rstrip("s")) > drain + 5
    for key, expected in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    }.items():
        assert svc.get(key) == expected, f"{key}={svc.get(key)!r}"
    assert svc["ReadWritePaths"] == svc["WorkingDirectory"] == "/var/lib/etherd"
    assert "WatchdogSec" in (UNITS / "etherd.service").read_text()
    assert settings(unit, "Install")["WantedBy"] == ["multi-user.target"]


def test_socket_unit_listens_on_one_stream() -> None:
    unit = parse_unit(UNITS / "etherd.socket")
    sock = settings(unit, "Socket")
    assert len(sock["ListenStream"]) == 1
    assert sock.get("Accept", ["no"]) == ["no"]
    assert settings(unit, "Install")["WantedBy"] == ["sockets.target"]


def test_systemd_analyze_verify_accepts_the_units(tmp_path: Path) -> None:
    """``systemd-analyze verify`` when installed (it must print nothing); else the
    structural checks above stand in for it."""
    tool = shutil.which("systemd-analyze")
    service = (UNITS / "etherd.service").read_text()
    etherd_bin = Path(sys.executable).with_name("etherd")
    assert etherd_bin.exists(), etherd_bin
    # verify checks that the commands exist: point them at this checkout's etherd.
    (tmp_path / "etherd.service").write_text(re.sub(r"/\S+/bin/etherd\b", str(etherd_bin), service))
    shutil.copy(UNITS / "etherd.socket", tmp_path / "etherd.socket")
    if tool is None:
        for name in ("etherd.service", "etherd.socket"):
            assert parse_unit(tmp_path / name)
        return
    done = subprocess.run(
        [
            tool,
            "verify",
            "--man=no",
            str(tmp_path / "etherd.service"),
            str(tmp_path / "etherd.socket"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0 and not done.stdout.strip() and not done.stderr.strip(), (
        done.stdout + done.stderr
    )


# -- systemd protocols ---------------------------------------------------------------------


def test_notify_ready_watchdog_reload_stopping_in_order(tmp_path: Path) -> None:
    name = f"etherd-test-{uuid.uuid4().hex[:12]}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as fake_systemd:
        fake_systemd.bind("\0" + name)  # abstract: NOTIFY_SOCKET=@name
        fake_systemd.settimeout(RECV_TIMEOUT)
        server = Etherd(tmp_path, env={"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "200000"})
        server.start()
        try:
            messages: list[dict[str, str]] = []

            def receive() -> dict[str, str]:
                data = fake_systemd.recv(4096).decode()
                msg = dict(line.split("=", 1) for line in data.split("\n") if line)
                messages.append(msg)
                return msg

            first = receive()
            assert first["READY"] == "1", messages
            assert f":{server.port}" in first["STATUS"]
            # Pings every WATCHDOG_USEC / 2 = 0.1 s.
            started = time.monotonic()
            pings = [receive() for _ in range(3)]
            assert all(m == {"WATCHDOG": "1"} for m in pings), messages
            assert time.monotonic() - started < 1.5

            server.signal(signal.SIGHUP)
            wait_for(lambda: "RELOADING" in receive(), what="RELOADING=1")
            assert "MONOTONIC_USEC" in messages[-1]
            wait_for(lambda: "READY" in receive(), what="READY=1 after the reload")

            server.signal(signal.SIGTERM)
            wait_for(lambda: "STOPPING" in receive(), what="STOPPING=1")
            stopping = messages[-1]
            assert int(stopping["EXTEND_TIMEOUT_USEC"]) > 0
            assert server.proc is not None
            assert server.proc.wait(10) == 0
        finally:
            server.kill()


LISTEN_WRAPPER = """
import os, sys
fd = int(sys.argv[1])
os.dup2(fd, 3)
if fd != 3:
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.environ["LISTEN_FDS"] = "1"
os.execv(sys.executable, [sys.executable, "-m", "etherd", *sys.argv[2:]])
"""


def test_serves_on_an_inherited_socket(tmp_path: Path) -> None:
    """Socket activation: etherd serves on descriptor 3, not on its configured port."""
    server = Etherd(tmp_path)
    configured = server.port
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    server.port = listener.getsockname()[1]
    with server.log_path.open("ab") as log:
        server.proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                LISTEN_WRAPPER,
                str(listener.fileno()),
                "serve",
                "--config",
                str(server.config_path),
            ],
            pass_fds=[listener.fileno()],
            stdout=log,
            stderr=log,
            env=server.env,
            cwd=tmp_path,
        )
    listener.close()  # the child holds it now
    try:
        wait_for(lambda: readyz(server) == 200, timeout=15, what="ready on the inherited socket")
        body = server.publish("ops/inherited", text="hi")
        assert body["published"][0]["offset"] == 1
        with pytest.raises(OSError), socket.create_connection(("127.0.0.1", configured), 0.5):
            pass
        assert f"127.0.0.1:{server.port}" in server.log()
        assert server.stop() == 0
    finally:
        server.kill()


# -- graceful drain ------------------------------------------------------------------------


def test_sigterm_drains_readiness_then_1001_in_batches_then_inflight_then_exit_0(
    tmp_path: Path,
) -> None:
    server = Etherd(
        tmp_path,
        {
            "server": {"shutdown_delay_s": 1.0, "drain_window_s": 1.2, "shutdown_grace_s": 5.0},
            # Every commit waits 1.5 s for its batch to fill: a publish stays in flight.
            "store": {"batch_max_delay_ms": 1500.0},
        },
    ).start()
    try:
        clients = [ws_subscribe(server, "ops/drain") for _ in range(4)]
        answer: dict[str, Any] = {}

        def slow_publish() -> None:
            answer["reply"] = server.request(
                "POST",
                "/api/publish",
                {"topic": "ops/drain", "event": "note", "data": {"n": 1}},
                token="test",
            )

        publisher = threading.Thread(target=slow_publish)
        publisher.start()
        wait_for(lambda: in_flight(server) >= 2, what="the publish to be in flight")
        assert readyz(server) == 200

        stop_sent = time.monotonic()
        server.signal(signal.SIGTERM)
        # Readiness turns false first, while the listener still accepts.
        wait_for(lambda: readyz(server) == 503, timeout=0.9, what="/readyz 503 while draining")

        closed_at: list[float] = []
        codes: list[int | None] = []
        for ws in clients:
            with pytest.raises(ConnectionClosed) as info:
                while True:  # the in-flight event may arrive first
                    ws.recv(timeout=RECV_TIMEOUT)
            closed_at.append(time.monotonic())
            assert info.value.rcvd is not None
            codes.append(info.value.rcvd.code)
            assert "reconnect" in info.value.rcvd.reason
        assert codes == [1001, 1001, 1001, 1001]
        # The listener closed after the delay, and the closes were spread over the window.
        assert min(closed_at) - stop_sent >= 0.9
        assert max(closed_at) - min(closed_at) >= 0.5

        publisher.join(10)
        status, body = answer["reply"]
        assert status == 200, body
        assert body["published"][0]["offset"] == 1

        assert server.proc is not None
        assert server.proc.wait(10) == 0
        log = server.log()
        assert "Traceback" not in log
        assert "stopped" in log
    finally:
        server.kill()


def test_second_sigterm_exits_at_once(tmp_path: Path) -> None:
    server = Etherd(tmp_path, {"server": {"shutdown_delay_s": 30.0}}).start()
    try:
        server.signal(signal.SIGTERM)
        wait_for(lambda: readyz(server) == 503, what="the drain to begin")
        started = time.monotonic()
        server.signal(signal.SIGTERM)
        assert server.proc is not None
        assert server.proc.wait(5) == 1
        assert time.monotonic() - started < 2.0
        assert "second SIGTERM" in server.log()
    finally:
        server.kill()


# -- reload --------------------------------------------------------------------------------


NEW_SECRET = "a-rotated-secret-that-is-also-long-enough-for-hs256"


def test_sighup_reloads_keys_and_log_level_without_dropping_connections(
    tmp_path: Path,
) -> None:
    server = Etherd(tmp_path, {"log": {"level": "info"}}).start()
    try:
        ws = ws_subscribe(server, "ops/reload", token=make_token("u1", "admin"))
        new_token = jwt.encode(
            {"sub": "ops", "role": "admin", "exp": int(time.time() + 600)},
            NEW_SECRET,
            algorithm="HS256",
        )
        assert server.request("GET", "/metrics", token=new_token)[0] == 401

        config = json.loads(json.dumps(server.config))
        config["auth"]["secret"] = NEW_SECRET
        config["log"]["level"] = "debug"
        config["http"] = {"max_body_bytes": 2048}
        config["server"]["port"] = free_port()  # needs a restart: kept, with a warning
        server.config_path.write_bytes(tomli_w.dumps(config).encode())
        server.signal(signal.SIGHUP)

        wait_for(
            lambda: server.request("GET", "/metrics", token=new_token)[0] == 200,
            what="a token signed with the new secret to be accepted",
        )
        assert server.request("GET", "/metrics", token=make_token("ops", "admin"))[0] == 401
        log = server.log()
        applied = next(line for line in log.splitlines() if "reload: applied" in line)
        assert "auth.secret changed (masked)" in applied and "log.level" in applied
        assert '"info" -> "debug"' in applied
        assert "http.max_body_bytes 1048576 -> 2048" in applied
        assert NEW_SECRET not in log and SECRET not in log
        assert "server.port changed" in log and "needs a restart" in log
        assert "reload complete" in log  # a debug line: the new level is in force
        # The new limit is read at use time.
        big = {"topic": "ops/reload", "event": "e", "data": {"x": "y" * 4000}}
        assert server.request("POST", "/api/publish", big, token=new_token)[0] == 413

        # The WebSocket opened before the reload still works.
        ws.send(json.dumps({"action": "ping"}))
        assert json.loads(ws.recv(timeout=RECV_TIMEOUT))["type"] == "pong"
        server.publish("ops/reload", token=new_token, n=1)
        event = json.loads(ws.recv(timeout=RECV_TIMEOUT))
        assert event["topic"] == "ops/reload" and event["n"] == 1

        # A configuration that does not load is logged and ignored.
        server.config_path.write_text("[server]\nprot = 1\n")
        server.signal(signal.SIGHUP)
        wait_for(lambda: "reload refused" in server.log(), what="the refusal to be logged")
        assert "prot" in server.log().split("reload refused", 1)[1]
        assert server.request("GET", "/metrics", token=new_token)[0] == 200
        ws.send(json.dumps({"action": "ping"}))
        assert json.loads(ws.recv(timeout=RECV_TIMEOUT))["type"] == "pong"
        ws.close()
        assert server.stop() == 0
    finally:
        server.kill()


# -- metrics -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def metered(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Etherd]:
    server = Etherd(
        tmp_path_factory.mktemp("metered"), {"metrics": {"task_count_interval_s": 0.1}}
    ).start()
    yield server
    server.kill()


def test_metrics_need_an_admin_token(metered: Etherd) -> None:
    status, body = metered.request("GET", "/metrics")
    assert status == 401, body
    status, body = metered.request("GET", "/metrics", token=make_token("u", "user"))
    assert status == 403 and body["error"]["code"] == "forbidden"
    assert "metrics.require_admin" in body["error"]["message"]
    status, body = metered.request("GET", "/metrics", token=make_token("svc", "service"))
    assert status == 403
    status, body = metered.request("GET", "/metrics", token=make_token("ops", "admin"))
    assert status == 200 and isinstance(body, bytes)


def test_tasks_by_status_gauge(metered: Etherd) -> None:
    for _ in range(2):
        status, _ = metered.request("POST", "/api/tasks", {"prompt": "count me"}, token="test")
        assert status == 201
    status, body = metered.request("POST", "/api/tasks", {"prompt": "cancel me"}, token="test")
    assert metered.request("POST", f"/api/tasks/{body['id']}/cancel", token="test")[0] == 200
    deadline = time.monotonic() + 5
    while True:
        samples = scrape(metered)
        queued = value(samples, "etherd_tasks", status="queued")
        cancelled = value(samples, "etherd_tasks", status="cancelled")
        if (queued, cancelled) == (2, 1) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert (queued, cancelled) == (2, 1)


def test_metrics_parse_and_counters_move(metered: Etherd) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", metered.port, timeout=5)
    conn.request("GET", "/metrics", headers={"Authorization": "Bearer test"})
    resp = conn.getresponse()
    resp.read()
    assert resp.getheader("Content-Type", "").startswith("text/plain; version=0.0.4")
    conn.close()

    before = scrape(metered)
    ws = ws_subscribe(metered, "ops/metrics")
    for n in range(3):
        metered.publish("ops/metrics", n=n)
    for n in range(3):
        assert json.loads(ws.recv(timeout=RECV_TIMEOUT))["n"] == n
    assert metered.request("GET", "/api/nope/123")[0] == 404
    time.sleep(0.6)  # one event-loop lag measurement at least
    after = scrape(metered)

    def grew(name: str, by: float = 1, **labels: str) -> None:
        delta = value(after, name, **labels) - value(before, name, **labels)
        assert delta >= by, f"{name}{labels} grew by {delta}, expected >= {by}"

    grew("etherd_messages_published_total", 3)
    grew("etherd_messages_delivered_total", 3)
    grew("etherd_writes_total")
    grew("etherd_bytes_written_total", 3 * len("ops/metrics"))
    grew("etherd_store_commits_total")
    grew("etherd_store_rows_total", 3)
    grew("etherd_store_batch_rows_count")
    grew("etherd_store_commit_duration_seconds_count")
    grew("etherd_websocket_connections_accepted_total")
    grew("etherd_http_requests_total", 3, route="/api/publish", status="200")
    grew("etherd_http_request_duration_seconds_count", 3, route="/api/publish")
    grew("etherd_http_request_duration_seconds_bucket", 3, route="/api/publish", le="+Inf")
    # Unknown paths share one label value: no unbounded cardinality.
    grew("etherd_http_requests_total", 1, route="other", status="404")
    assert not any("/api/nope" in str(k) for k in after["etherd_http_requests_total"])
    assert value(after, "etherd_websocket_connections_open") >= 1
    assert value(after, "etherd_subscriptions") >= 1
    assert value(after, "etherd_topics") >= 1
    assert value(after, "etherd_event_loop_lag_seconds_count") >= 1
    assert value(after, "etherd_store_up") == 1
    assert value(after, "etherd_draining") == 0
    assert value(after, "etherd_store_queue_rows") == 0
    assert "etherd_store_errors_total" in after
    assert "etherd_sse_streams" in after
    assert "etherd_slow_consumer_closes_total" in after
    assert value(after, "process_resident_memory_bytes") > 0
    assert value(after, "etherd_build_info", version=_version()) == 1
    ws.close()


def _version() -> str:
    from etherd import __version__

    return __version__


# -- readiness -----------------------------------------------------------------------------


@pytest.mark.pg
def test_readyz_follows_the_store(tmp_path: Path) -> None:
    cluster = PgCluster.create(fsync=False)
    cluster.start()
    server = Etherd(tmp_path, {"store": {"url": cluster.url, "connect_timeout_s": 1.0}})
    try:
        server.start()
        assert readyz(server) == 200
        cluster.stop("immediate")
        wait_for(lambda: readyz(server) == 503, what="/readyz 503 with the store down")
        body = server.request("GET", "/readyz")[1]
        assert body["error"]["code"] == "not_ready"
        assert server.request("GET", "/healthz")[0] == 200  # alive all the same
        cluster.start()
        wait_for(lambda: readyz(server) == 200, timeout=10, what="/readyz 200 again")
        assert server.stop() == 0
    finally:
        server.kill()
        cluster.destroy()


# -- logs and check-config -----------------------------------------------------------------


def test_json_logs_with_access_log(tmp_path: Path) -> None:
    server = Etherd(
        tmp_path,
        {"log": {"format": "json", "access_log": True}, "metrics": {"require_admin": False}},
    ).start()
    try:
        assert server.request("GET", "/healthz")[0] == 200
        assert server.request("GET", "/metrics")[0] == 200  # open when not required
        assert server.request("GET", "/nope?token=very-secret-token")[0] == 404
        assert server.stop() == 0
        lines = [line for line in server.log().splitlines() if line.strip()]
        entries = [json.loads(line) for line in lines]  # every line is one JSON object
        for entry in entries:
            assert {"ts", "level", "logger", "message"} <= set(entry), entry
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["ts"])
        access = [e for e in entries if e["logger"] == "etherd.access"]
        # The fixture polled /healthz while etherd started; these are the test's three.
        assert [(e["method"], e["path"], e["status"]) for e in access[-3:]] == [
            ("GET", "/healthz", 200),
            ("GET", "/metrics", 200),
            ("GET", "/nope", 404),
        ]
        for e in access:
            assert isinstance(e["duration_ms"], float) and e["duration_ms"] >= 0
            assert e["peer"].startswith("127.0.0.1:")
        assert "very-secret-token" not in server.log()
        assert any("listening" in e["message"] and e.get("port") == server.port for e in entries)
        assert any(e["message"] == "stopped" for e in entries)
    finally:
        server.kill()


def test_check_config_prints_effective_config_with_secrets_masked(tmp_path: Path) -> None:
    path = tmp_path / "etherd.toml"
    path.write_text(
        '[server]\nport = 9123\n[store]\nurl = "postgresql://etherd:db-password@db:5432/etherd"\n'
    )
    env = {**os.environ, "ETHERD_AUTH_SECRET": SECRET, "ETHERD_HTTP_MAX_HEADERS": "50"}
    env.pop("ETHERD_CONFIG", None)
    done = subprocess.run(
        [sys.executable, "-m", "etherd", "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    effective = json.loads(done.stdout)
    assert effective["server"]["port"] == 9123  # file
    assert effective["http"]["max_headers"] == 50  # environment
    assert effective["server"]["drain_window_s"] == 1.0  # default
    assert effective["auth"]["secret"] == "********"
    assert effective["store"]["url"] == "postgresql://etherd:********@db:5432/etherd"
    assert SECRET not in done.stdout and "db-password" not in done.stdout

    # ExecStartPre relies on a bad file failing with a message naming the key.
    path.write_text("[server]\nprot = 1\n")
    done = subprocess.run(
        [sys.executable, "-m", "etherd", "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert "prot" in done.stderr
