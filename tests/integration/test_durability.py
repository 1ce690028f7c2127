"""Durability end to end, on SQLite and on PostgreSQL: kill -9, resume under load, outages,
retention and epochs, and two etherd processes sharing one PostgreSQL log."""

from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import connect

from tests.conftest import Etherd
from tests.pgcluster import PgCluster


def replay_all(
    server: Etherd, topic: str, since: int = 0, epoch: str | None = None
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Subscribe with ``since`` and collect the replay: (ack entry, events up to the head)."""
    with connect(server.ws_url + "?token=test", open_timeout=10) as ws:
        command: dict[str, Any] = {
            "action": "subscribe",
            "topics": [topic],
            "since": {topic: since},
            "id": "r",
        }
        if epoch is not None:
            command["epoch"] = epoch
        ws.send(json.dumps(command))
        ack = json.loads(ws.recv(timeout=10))
        assert ack["type"] == "subscribed", ack
        entry = ack["topics"][0]
        count = entry["offset"] - since if entry["recovered"] else 0
        return entry, [json.loads(ws.recv(timeout=10)) for _ in range(count)]


def publisher(
    server: Etherd, topic: str, acked: list[tuple[int, int]], stop: threading.Event, client: int
) -> None:
    """Publish durably until stopped or the server dies; record (offset, n) of each 200."""
    import http.client

    n = 0
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        while not stop.is_set():
            body = json.dumps({"topic": topic, "event": "n", "data": {"c": client, "n": n}})
            try:
                conn.request(
                    "POST",
                    "/api/publish",
                    body=body,
                    headers={"Authorization": "Bearer test", "Content-Type": "application/json"},
                )
                resp = conn.getresponse()
                data = resp.read()
            except (OSError, http.client.HTTPException):
                return
            if resp.status == 200:
                acked.append((json.loads(data)["published"][0]["offset"], n))
            n += 1
    finally:
        conn.close()


@pytest.mark.slow
def test_kill_9_loses_no_acknowledged_event(tmp_path: Path, store_url: str) -> None:
    rng = random.Random(20261129)
    topics = ["crash/a", "crash/b"]
    config = {"store": {"url": store_url}, "realtime": {"replay_max_events": 1_000_000}}
    acked: dict[tuple[str, int], list[tuple[int, int]]] = {}
    for round_ in range(3):
        server = Etherd(tmp_path, config).start()
        stop = threading.Event()
        threads = []
        for client in range(6):
            topic = topics[client % 2]
            key = (topic, round_ * 100 + client)
            acked[key] = []
            t = threading.Thread(target=publisher, args=(server, topic, acked[key], stop, key[1]))
            t.start()
            threads.append(t)
        time.sleep(rng.uniform(0.3, 1.2))
        server.kill()  # SIGKILL at a random moment, mid-commit for some publishes
        stop.set()
        for t in threads:
            t.join(10)
        assert sum(len(v) for k, v in acked.items() if k[1] >= round_ * 100) > 0
    server = Etherd(tmp_path, config).start()
    try:
        for topic in topics:
            entry, events = replay_all(server, topic)
            assert entry["recovered"] is True
            offsets = [e["offset"] for e in events]
            assert offsets == list(range(1, entry["offset"] + 1))  # gap-free, in order
            stored = [(e["c"], e["n"]) for e in events]
            assert len(stored) == len(set(stored))  # nothing stored twice
            by_offset = {e["offset"]: (e["c"], e["n"]) for e in events}
            for (acked_topic, client), items in acked.items():
                if acked_topic != topic:
                    continue
                for offset, n in items:
                    assert by_offset.get(offset) == (client, n), (topic, offset)
    finally:
        server.kill()


def test_resume_while_events_are_committed(tmp_path: Path, store_url: str) -> None:
    server = Etherd(tmp_path, {"store": {"url": store_url}}).start()
    stop = threading.Event()
    acked: list[tuple[int, int]] = []
    try:
        for i in range(50):
            server.publish("race/t", "n", c=0, n=-i)
        pub = threading.Thread(target=publisher, args=(server, "race/t", acked, stop, 1))
        pub.start()
        results: list[list[int]] = []
        errors: list[BaseException] = []

        def resumer(since: int) -> None:
            try:
                with connect(server.ws_url + "?token=test", open_timeout=10) as ws:
                    ws.send(
                        json.dumps(
                            {
                                "action": "subscribe",
                                "topics": ["race/t"],
                                "since": {"race/t": since},
                            }
                        )
                    )
                    ack = json.loads(ws.recv(timeout=10))
                    assert ack["topics"][0]["recovered"] is True
                    got: list[int] = []
                    target = ack["topics"][0]["offset"] + 30
                    while not got or got[-1] < target:
                        got.append(json.loads(ws.recv(timeout=10))["offset"])
                    results.append([since, *got])
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=resumer, args=(s,)) for s in range(0, 50, 5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        stop.set()
        pub.join(10)
        assert not errors, errors
        assert len(results) == 10
        for since, *got in results:
            assert got == list(range(since + 1, since + 1 + len(got))), since
    finally:
        stop.set()
        server.kill()


def test_not_recovered_past_retention_or_epoch(tmp_path: Path) -> None:
    config = {
        "store": {"retention": [{"prefix": "ret/", "max_count": 5}], "retention_interval_s": 0.1},
    }
    server = Etherd(tmp_path, config).start()
    try:
        for i in range(20):
            server.publish("ret/a", "n", i=i)
        time.sleep(0.5)
        entry, events = replay_all(server, "ret/a", since=2)
        assert entry["recovered"] is False and events == [] and entry["offset"] == 20
        entry, events = replay_all(server, "ret/a", since=15)
        assert entry["recovered"] is True and [e["offset"] for e in events] == [16, 17, 18, 19, 20]
        epoch = entry["epoch"]
    finally:
        server.kill()
    # A log reset (a new data directory) starts a new epoch: old positions cannot resume.
    for path in (tmp_path / "data").iterdir():
        path.unlink()
    server = Etherd(tmp_path, config).start()
    try:
        server.publish("ret/a", "n", i=0)
        entry, events = replay_all(server, "ret/a", since=0, epoch=epoch)
        assert entry["epoch"] != epoch and entry["recovered"] is False and events == []
    finally:
        server.kill()


def test_replay_cap_reports_not_recovered(tmp_path: Path) -> None:
    server = Etherd(tmp_path, {"realtime": {"replay_max_events": 10}}).start()
    try:
        server.request(
            "POST",
            "/api/publish",
            {"events": [{"topic": "cap/a", "event": "n"}] * 15},
            token="test",
        )
        entry, events = replay_all(server, "cap/a", since=0)
        assert entry["recovered"] is False and events == []
        entry, events = replay_all(server, "cap/a", since=5)
        assert entry["recovered"] is True and len(events) == 10
    finally:
        server.kill()


@pytest.mark.pg
def test_two_processes_share_one_postgres_log(tmp_path: Path, pg_url: str) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = Etherd(tmp_path / "a", {"store": {"url": pg_url}}).start()
    b = Etherd(tmp_path / "b", {"store": {"url": pg_url}}).start()
    stop = threading.Event()
    acked: list[list[tuple[int, int]]] = [[] for _ in range(6)]
    try:
        threads = [
            threading.Thread(
                target=publisher, args=(a if i % 2 else b, "shared/t", acked[i], stop, i)
            )
            for i in range(6)
        ]
        for t in threads:
            t.start()
        time.sleep(1.5)
        stop.set()
        for t in threads:
            t.join(10)
        entry, events = replay_all(a, "shared/t")
        total = sum(len(x) for x in acked)
        assert entry["offset"] == total > 0
        assert [e["offset"] for e in events] == list(range(1, total + 1))
        assert sorted(o for x in acked for o, _ in x) == list(range(1, total + 1))
    finally:
        a.kill()
        b.kill()


@pytest.mark.pg
@pytest.mark.slow
def test_postgres_outage_fails_fast_and_recovers(tmp_path: Path) -> None:
    cluster = PgCluster.create(fsync=True)
    cluster.start()
    server = Etherd(tmp_path, {"store": {"url": cluster.url, "retry_max_delay_s": 0.5}}).start()
    try:
        server.publish("out/a", "n", i=1)
        cluster.stop("immediate")
        started = time.monotonic()
        status, body = server.request(
            "POST", "/api/publish", {"topic": "out/a", "event": "n"}, token="test"
        )
        assert status == 503 and body["error"]["code"] == "not_ready"
        assert time.monotonic() - started < 5
        assert server.request("GET", "/readyz")[0] == 503
        status, _ = server.request(
            "POST", "/api/publish", {"topic": "out/a", "event": "n"}, token="test"
        )
        assert status == 503
        cluster.start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and server.request("GET", "/readyz")[0] != 200:
            time.sleep(0.1)
        assert server.request("GET", "/readyz")[0] == 200
        offset = server.publish("out/a", "n", i=2)["published"][0]["offset"]
        entry, events = replay_all(server, "out/a")
        assert next(e.get("i") for e in events if "i" in e) == 1
        assert events[-1]["offset"] == offset == entry["offset"]
    finally:
        server.kill()
        cluster.destroy()
