"""Several etherd nodes on one PostgreSQL log and one real nats-server (contract section 11):
every subscriber on every node gets each topic's stored events in offset order, with no
gap and no duplicate, whichever node committed them, also when a node is killed or the bus
restarts. Each node is a real ``etherd serve`` process.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster.conftest import Nats, Subscriber, bus_state, node, publish, wait_for
from tests.conftest import Etherd

DASHBOARD = Path(__file__).resolve().parents[2] / "conf" / "grafana-etherd.json"


def uid() -> str:
    return uuid.uuid4().hex[:8]


@pytest.fixture
def three(tmp_path: Path, pg_url: str, nats: Nats) -> Iterator[list[Etherd]]:
    nodes = [node(tmp_path, pg_url, nats.url, name) for name in ("a", "b", "c")]
    for n in nodes:
        n.start()
    for n in nodes:
        wait_for(lambda n=n: bus_state(n) == "connected", f"{n.workdir.name} on the bus")
    try:
        yield nodes
    finally:
        for n in nodes:
            n.kill()


def contiguous(offsets: list[int], first: int = 1) -> bool:
    return offsets == list(range(first, first + len(offsets)))


def test_a_subscriber_on_b_hears_what_a_publishes(three: list[Etherd]) -> None:
    a, b, _ = three
    topic = f"cluster/ab-{uid()}"
    sub = Subscriber(b, topic)
    try:
        assert sub.ack["offset"] == 0
        for n in range(1, 6):
            publish(a, topic, n)
        publish(a, topic, 99, durable=False)
        sub.wait_for(6)
        assert sub.offsets == [1, 2, 3, 4, 5]
        assert [e["n"] for e in sub.events] == [1, 2, 3, 4, 5, 99]
        assert "offset" not in sub.events[-1]
    finally:
        sub.close()


def test_publishes_through_three_nodes_reach_every_subscriber_in_order(
    three: list[Etherd],
) -> None:
    topic = f"cluster/abc-{uid()}"
    subs = [Subscriber(n, topic) for n in three for _ in range(2)]
    per_node = 40
    acked: list[int] = []

    def publisher(server: Etherd, base: int) -> None:
        for i in range(per_node):
            body = publish(server, topic, base + i)
            acked.append(body["published"][0]["offset"])

    threads = [threading.Thread(target=publisher, args=(n, i * 1000)) for i, n in enumerate(three)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    total = 3 * per_node
    assert sorted(acked) == list(range(1, total + 1))
    try:
        for sub in subs:
            sub.wait_for(total)
            assert sub.offsets == list(range(1, total + 1)), sub.offsets
    finally:
        for sub in subs:
            sub.close()


def test_resume_on_another_node_gets_exactly_what_was_missed(three: list[Etherd]) -> None:
    a, b, c = three
    topic = f"cluster/resume-{uid()}"
    first = Subscriber(a, topic)
    for n in range(1, 6):
        publish(c, topic, n)
    first.wait_for(5)
    first.close()
    for n in range(6, 11):
        publish(a if n % 2 else c, topic, n)
    again = Subscriber(b, topic, since=first.offsets[-1])
    try:
        assert again.ack["recovered"] is True
        again.wait_for(5)
        for n in range(11, 14):
            publish(c, topic, n)
        again.wait_for(8)
        assert again.offsets == list(range(6, 14))
    finally:
        again.close()


def test_kill_9_of_a_node_under_load_loses_nothing_acknowledged(three: list[Etherd]) -> None:
    a, b, c = three
    topic = f"cluster/kill-{uid()}"
    on_c = Subscriber(c, topic)
    on_b = Subscriber(b, topic)
    acked: list[int] = []
    stop = threading.Event()

    def publisher(server: Etherd) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            try:
                body = publish(server, topic, n)
            except Exception:
                return  # the node died: its unanswered publish may or may not be stored
            acked.append(body["published"][0]["offset"])

    threads = [threading.Thread(target=publisher, args=(s,)) for s in (a, b)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    b.kill()  # SIGKILL, mid-publish
    time.sleep(0.5)
    # b's subscriber resumes on a from where it got to.
    resumed = Subscriber(a, topic, since=on_b.offsets[-1] if on_b.offsets else 0)
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join(10)
    try:
        head = max(acked)
        for sub in (on_c, resumed):
            wait_for(lambda sub=sub: bool(sub.offsets) and sub.offsets[-1] >= head, "every offset")
        assert contiguous(on_c.offsets), on_c.offsets
        seen_b = on_b.offsets + resumed.offsets
        assert contiguous(seen_b), "gap or duplicate across the resume"
        assert set(acked) <= set(on_c.offsets) and set(acked) <= set(seen_b)
    finally:
        for sub in (on_c, on_b, resumed):
            sub.close()


def test_bus_restart_under_load_ends_with_every_event_in_order(
    tmp_path: Path, pg_url: str, nats: Nats
) -> None:
    nodes = [node(tmp_path, pg_url, nats.url, name) for name in ("a", "b")]
    for n in nodes:
        n.start()
    a, b = nodes
    try:
        for n in nodes:
            wait_for(lambda n=n: bus_state(n) == "connected", "the bus")
        topic = f"cluster/bus-{uid()}"
        subs = [Subscriber(a, topic), Subscriber(b, topic)]
        acked: list[int] = []
        for i in range(60):
            if i == 20:
                nats.stop()
                wait_for(lambda: bus_state(a) == "degraded", "a degraded", timeout=20)
                status, body = a.request("GET", "/readyz")
                assert status == 200 and body["cluster"]["reason"]
            if i == 40:
                nats.start()
            acked.append(publish(a if i % 2 else b, topic, i)["published"][0]["offset"])
            time.sleep(0.02)
        wait_for(lambda: bus_state(a) == "connected" and bus_state(b) == "connected", "bus back")
        for sub in subs:
            wait_for(lambda sub=sub: len(sub.offsets) >= 60, "every event after the restart", 20)
            assert sub.offsets == list(range(1, 61)), sub.offsets
        assert sorted(acked) == list(range(1, 61))
        for sub in subs:
            sub.close()
    finally:
        for n in nodes:
            n.kill()


def test_presence_counts_every_node(three: list[Etherd]) -> None:
    a, b, c = three
    wait_for(lambda: c.request("GET", "/readyz")[1]["cluster"]["peers"] == 2, "c to hear a and b")
    topic = f"activity/p{uid()}"
    subs = [Subscriber(a, topic), Subscriber(b, topic), Subscriber(b, topic)]
    try:
        path = "/api/topics/" + topic.replace("/", "%2F") + "/presence"
        status, body = c.request("GET", path, token="test")
        assert status == 200, body
        assert body["subscribers"] == 3
        assert body["nodes"] == {"a": 1, "b": 2, "c": 0}
        assert body["subjects"] == [f"etherd.t.activity.p{topic.split('/p')[1]}"]
        # Over the socket too, for anyone allowed to subscribe to the topic.
        import json

        from websockets.sync.client import connect

        with connect(f"{c.ws_url}?token=test", proxy=None, legacy=True) as ws:
            ws.send(json.dumps({"action": "presence", "topic": topic, "id": "q"}))
            assert json.loads(ws.recv(timeout=5))["subscribers"] == 3
    finally:
        for sub in subs:
            sub.close()


def test_leader_takeover_of_the_lease_sweep(tmp_path: Path, pg_url: str, nats: Nats) -> None:
    fast = {"tasks": {"lease_s": 1.0, "sweep_interval_s": 0.2}, "cluster": {"leader_retry_s": 0.3}}
    nodes = [node(tmp_path, pg_url, nats.url, name, **fast) for name in ("a", "b")]
    for n in nodes:
        n.start()
    try:

        def leaders() -> list[str]:
            return [
                n.workdir.name
                for n in nodes
                if n.proc is not None
                and n.proc.poll() is None
                and n.request("GET", "/readyz")[1]["cluster"]["leader"]
            ]

        wait_for(lambda: len(leaders()) == 1, "one leader")
        leader = next(n for n in nodes if n.workdir.name == leaders()[0])
        other = next(n for n in nodes if n is not leader)
        leader.kill()
        started = time.monotonic()
        wait_for(lambda: leaders() == [other.workdir.name], "the other node to lead", 10)
        assert time.monotonic() - started < 5
        # The new leader sweeps: a claimed task whose lease lapses goes back to the queue.
        status, task = other.request("POST", "/api/tasks", {"prompt": "p"}, token="test")
        assert status == 201
        headers = {"X-Ether-Harness-App": "t"}
        status, _ = other.request(
            "POST", f"/api/harness/tasks/{task['id']}/claim", {}, "test", headers=headers
        )
        assert status == 200
        wait_for(
            lambda: (
                other.request("GET", f"/api/tasks/{task['id']}", token="test")[1]["status"]
                == "queued"
            ),
            "the lease sweep on the new leader",
        )
    finally:
        for n in nodes:
            n.kill()


def test_a_bus_that_does_not_answer_at_start_is_retried(tmp_path: Path, pg_url: str) -> None:
    late = Nats()  # its port is free: nothing answers there yet
    server = node(tmp_path, pg_url, late.url, "lonely").start()
    try:

        def reason() -> str:
            status, body = server.request("GET", "/readyz")
            assert status == 200 and body["cluster"]["bus"] == "degraded"
            text: str = body["cluster"]["reason"]
            return text

        wait_for(lambda: "cannot reach the bus" in reason(), "the reason in /readyz")
        wait_for(lambda: "retrying" in server.log(), "the retry to be logged")
        # It still serves its own subscribers and commits.
        topic = f"cluster/alone-{uid()}"
        sub = Subscriber(server, topic)
        publish(server, topic, 1)
        sub.wait_for(1)
        late.start()
        wait_for(lambda: bus_state(server) == "connected", "the bus once it answers", 20)
        sub.close()
    finally:
        server.kill()
        late.stop()


def test_malformed_messages_on_our_subjects_are_counted_and_dropped(
    three: list[Etherd], nats: Nats
) -> None:
    import asyncio

    import nats as nats_client

    a, b, _ = three
    topic = f"cluster/bad-{uid()}"
    sub = Subscriber(b, topic)

    async def garbage() -> None:
        nc = await nats_client.connect(nats.url)
        subject = "etherd.t.cluster.bad-" + topic.split("bad-")[1]
        for payload in (b"", b"\x01", b"\x09" * 40, b"not an event at all", b"\x01" + b"\0" * 30):
            await nc.publish(subject, payload)
        await nc.flush()
        await nc.close()

    asyncio.run(garbage())
    publish(a, topic, 1)
    try:
        sub.wait_for(1)
        assert sub.offsets == [1]
        status, text = b.request("GET", "/metrics", token="test")
        assert status == 200
        line = next(
            x for x in text.decode().splitlines() if x.startswith("etherd_cluster_bad_messages")
        )
        assert float(line.split()[1]) >= 5
        assert b.proc is not None and b.proc.poll() is None
    finally:
        sub.close()


def test_sqlite_with_a_bus_is_refused_at_start(tmp_path: Path, nats: Nats) -> None:
    server = Etherd(tmp_path, {"cluster": {"nats_url": nats.url}})
    with pytest.raises(RuntimeError) as info:
        server.start()
    assert "PostgreSQL" in str(info.value)


def test_an_event_the_bus_never_brought_arrives_by_the_tail_check(
    tmp_path: Path, pg_url: str, nats: Nats
) -> None:
    # A node that commits into the shared log but is not on the bus stands for a node that
    # died between its commit and its publish: only the log has the event.
    a = node(
        tmp_path, pg_url, nats.url, "a", cluster={"tail_check_s": 0.3, "follow_audit_s": 0.0}
    ).start()
    (tmp_path / "solo").mkdir()
    solo = Etherd(tmp_path / "solo", {"store": {"url": pg_url}}).start()
    topic = f"tail/{uid()}"
    try:
        wait_for(lambda: bus_state(a) == "connected", "a on the bus")
        sub = Subscriber(a, topic)
        try:
            publish(solo, topic, 1)
            publish(solo, topic, 2)
            sub.wait_for(2, timeout=10)
            assert sub.offsets == [1, 2]
            status, body = a.request("GET", "/metrics", token="test")
            assert status == 200
            text = body.decode() if isinstance(body, bytes) else str(body)
            reads = [
                float(line.split()[-1])
                for line in text.splitlines()
                if line.startswith("etherd_cluster_tail_reads_total")
            ]
            assert reads and reads[0] >= 1
        finally:
            sub.close()
    finally:
        a.kill()
        solo.kill()


def test_the_dashboard_shows_every_cluster_metric(three: list[Etherd]) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    status, body = three[0].request("GET", "/metrics", token="test")
    assert status == 200
    text = body.decode() if isinstance(body, bytes) else str(body)
    families = {
        line.split("{")[0]
        .split(" ")[0]
        .removesuffix("_bucket")
        .removesuffix("_sum")
        .removesuffix("_count")
        for line in text.splitlines()
        if line.startswith("etherd_cluster")
    }
    assert len(families) >= 10
    missing = sorted(f for f in families if f not in queries)
    assert not missing, missing
