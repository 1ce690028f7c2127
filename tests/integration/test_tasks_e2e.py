"""The task lifecycle end to end: real ``etherd serve`` processes, real WebSocket and SSE
clients, on SQLite and on PostgreSQL.

Contract sections 2, 5, 6, 7 and 8 as a frontend and a harness see them. A user (``alice``)
creates tasks and watches ``tasks/{id}`` and ``activity/alice`` over WebSocket; a harness
(``h1``, role ``harness``, app ``acme``) claims, narrates, pauses, and delivers, calling
the callback URLs of the bundle verbatim. Every refusal is checked for its status, its
error code, and that nothing changed: the task as ``GET`` shows it and the head offset of
its topic are the same before and after.

One server per store serves most of the module (``server``); tests that need their own
configuration (short leases) or two processes start their own. Every receive has a
timeout, so a server bug fails a test instead of hanging the suite.
"""

from __future__ import annotations

import ast
import http.client
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import quote, urlsplit

import pytest
import tomli_w
from websockets.sync.client import ClientConnection, connect

from tests.conftest import Etherd, make_token

RECV_TIMEOUT = 5.0
APP = "acme"
ALICE = make_token("alice")
BOB = make_token("bob")
HARNESS = make_token("h1", role="harness")
SERVICE = make_token("svc", role="service")
ADMIN = "test"  # the development token: admin "dev"
USER_MESSAGE_LIMIT = 512
OUTSIDE_HARNESS = Path(__file__).with_name("outside_harness.py")
PR = {"number": 42, "branch": "ether/fix", "url": "https://github.com/org/repo/pull/42"}


def uid() -> str:
    return uuid.uuid4().hex[:10]


# -- servers -------------------------------------------------------------------------------


def make_server(workdir: Path, store_url: str, extra: dict[str, Any] | None = None) -> Etherd:
    """An etherd on ``store_url`` whose public URL differs from its listener.

    The public URL names ``localhost`` while the server listens on ``127.0.0.1``, so a
    callback URL built from the listener instead of ``server.public_url`` is caught.
    """
    config: dict[str, Any] = {
        "store": {"url": store_url},
        "tasks": {"max_user_message_bytes": USER_MESSAGE_LIMIT},
        "log": {"level": "warning"},
    }
    for section, values in (extra or {}).items():
        config.setdefault(section, {}).update(values)
    workdir.mkdir(parents=True, exist_ok=True)
    server = Etherd(workdir, config)
    server.config["server"]["public_url"] = f"http://localhost:{server.port}"
    server.config_path.write_bytes(tomli_w.dumps(server.config).encode())
    return server


def public(server: Etherd) -> str:
    url: str = server.config["server"]["public_url"]
    return url


def fresh_store(kind: str, request: pytest.FixtureRequest, workdir: Path) -> Iterator[str]:
    """A new, empty store of ``kind`` (the same two kinds as ``store_url``)."""
    if kind == "sqlite":
        yield f"sqlite:///{workdir / 'log' / 'etherd.db'}"
        return
    pg = request.getfixturevalue("pg_server")
    url: str = pg.create_database()
    try:
        yield url
    finally:
        pg.drop_database(url)


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.pg)])
def shared_store(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """``store_url`` at module scope: one store of each kind for the shared server."""
    yield from fresh_store(request.param, request, tmp_path_factory.mktemp("store"))


@pytest.fixture(scope="module")
def server(shared_store: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Etherd]:
    """One etherd per store kind, shared by the tests of this module."""
    srv = make_server(tmp_path_factory.mktemp("etherd"), shared_store).start()
    try:
        yield srv
    finally:
        srv.kill()


# -- HTTP ----------------------------------------------------------------------------------


class Reply(NamedTuple):
    status: int
    body: Any
    headers: dict[str, str]

    @property
    def code(self) -> str | None:
        """The error code of an error body."""
        if isinstance(self.body, dict) and isinstance(self.body.get("error"), dict):
            code: str = self.body["error"]["code"]
            return code
        return None


def api(
    server: Etherd,
    method: str,
    path: str,
    body: Any = None,
    *,
    token: str | None = ALICE,
    headers: dict[str, str] | None = None,
) -> Reply:
    """One request on a fresh connection; ``body`` bytes are sent as they are."""
    if path.startswith("http"):
        parts = urlsplit(path)
        assert f"{parts.scheme}://{parts.netloc}" == public(server), path
        path = parts.path + (f"?{parts.query}" if parts.query else "")
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        hdrs = dict(headers or {})
        data: bytes | None = None
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            hdrs.setdefault("Content-Type", "application/json")
        if token is not None:
            hdrs["Authorization"] = f"Bearer {token}"
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        raw = resp.read()
        got = {k.lower(): v for k, v in resp.getheaders()}
        if got.get("content-type", "").startswith("application/json") and raw:
            return Reply(resp.status, json.loads(raw), got)
        return Reply(resp.status, raw, got)
    finally:
        conn.close()


def harness(
    server: Etherd,
    method: str,
    path: str,
    body: Any = None,
    *,
    token: str = HARNESS,
    app: str | None = APP,
    key: str | None = None,
    headers: dict[str, str] | None = None,
) -> Reply:
    """A harness call: harness token and ``X-Ether-Harness-App`` unless told otherwise."""
    hdrs = dict(headers or {})
    if app is not None:
        hdrs["X-Ether-Harness-App"] = app
    if key is not None:
        hdrs["Idempotency-Key"] = key
    if not path.startswith(("http", "/")):
        path = f"/api/harness/tasks/{path}"
    return api(server, method, path, body, token=token, headers=hdrs)


def ok(reply: Reply, status: int = 200) -> Any:
    assert reply.status == status, reply
    return reply.body


def refused(reply: Reply, status: int, code: str) -> str:
    """Assert an error reply of the contract's shape; its message."""
    assert reply.status == status, reply
    assert isinstance(reply.body, dict) and set(reply.body) == {"error"}, reply
    assert reply.code == code, reply
    message: str = reply.body["error"]["message"]
    assert message, reply
    return message


def create(server: Etherd, token: str = ALICE, **fields: Any) -> dict[str, Any]:
    body = {"prompt": f"Fix the checkout bug {uid()}\nCoupons round the wrong way.", **fields}
    task: dict[str, Any] = ok(api(server, "POST", "/api/tasks", body, token=token), 201)
    return task


def claim(server: Etherd, task_id: str, token: str = HARNESS) -> dict[str, Any]:
    view: dict[str, Any] = ok(
        harness(server, "POST", f"{task_id}/claim", {"app_id": APP}, token=token)
    )
    return view


def get_task(server: Etherd, task_id: str) -> dict[str, Any]:
    task: dict[str, Any] = ok(api(server, "GET", f"/api/tasks/{task_id}", token=ADMIN))
    return task


def parse_ts(text: str) -> datetime:
    assert text.endswith("Z"), text
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


# -- WebSocket -----------------------------------------------------------------------------


class Watcher:
    """A WebSocket subscriber that records every event it receives, in order."""

    def __init__(self, server: Etherd, token: str) -> None:
        self.ws: ClientConnection = connect(
            server.ws_url + "?token=" + quote(token, safe=""),
            proxy=None,
            compression=None,
            open_timeout=RECV_TIMEOUT,
            close_timeout=2,
            max_queue=4096,
            legacy=True,  # a plain connection; close() ends it
        )
        self.events: list[dict[str, Any]] = []
        self._taken: set[int] = set()

    def __enter__(self) -> Watcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.ws.close()

    def _recv(self, timeout: float) -> dict[str, Any]:
        text = self.ws.recv(timeout=max(0.01, timeout))
        assert isinstance(text, str), text
        message = json.loads(text)
        assert isinstance(message, dict), message
        if "event" in message:
            self.events.append(message)
        return message

    def _control(self, kind: str, rid: str) -> dict[str, Any]:
        deadline = time.monotonic() + RECV_TIMEOUT
        while True:
            message = self._recv(deadline - time.monotonic())
            if message.get("type") == kind and message.get("id") == rid:
                return message
            assert "event" in message, message

    def subscribe(self, topics: list[str], since: dict[str, int] | None = None) -> dict[str, Any]:
        """The reply to a subscribe (refusals are in its ``errors``)."""
        rid = uid()
        command: dict[str, Any] = {"action": "subscribe", "topics": topics, "id": rid}
        if since is not None:
            command["since"] = since
        self.ws.send(json.dumps(command))
        return self._control("subscribed", rid)

    def flush(self) -> None:
        """Receive everything the server queued for this connection before now."""
        rid = "flush-" + uid()
        self.ws.send(json.dumps({"action": "ping", "id": rid}))
        self._control("pong", rid)

    def wait(self, event: str, timeout: float = RECV_TIMEOUT, **match: Any) -> dict[str, Any]:
        """The first event named ``event`` with fields ``match`` not yet returned by wait."""
        deadline = time.monotonic() + timeout
        while True:
            for i, ev in enumerate(self.events):
                if i not in self._taken and matches(ev, event, match):
                    self._taken.add(i)
                    return ev
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                seen = [(e["topic"], e["event"], e.get("offset")) for e in self.events]
                raise AssertionError(f"no {event} {match} within {timeout} s; saw {seen}")
            try:
                self._recv(remaining)
            except TimeoutError:
                continue

    def named(self, event: str, **match: Any) -> list[dict[str, Any]]:
        return [ev for ev in self.events if matches(ev, event, match)]

    def on(self, topic: str) -> list[dict[str, Any]]:
        return [ev for ev in self.events if ev["topic"] == topic]

    def replay(self, topic: str, since: int = 0) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Subscribe with ``since`` and read the replay up to the head the ack names."""
        reply = self.subscribe([topic], since={topic: since})
        assert reply["errors"] == [], reply
        (ack,) = reply["topics"]
        assert ack["recovered"] is True, ack
        deadline = time.monotonic() + RECV_TIMEOUT
        while len([e for e in self.on(topic) if e["offset"] <= ack["offset"]]) < (
            ack["offset"] - since
        ):
            self._recv(deadline - time.monotonic())
        return ack, [e for e in self.on(topic) if e["offset"] <= ack["offset"]]


def matches(ev: dict[str, Any], event: str, match: dict[str, Any]) -> bool:
    if ev.get("event") != event:
        return False
    for key, want in match.items():
        if key == "kind":
            if ev.get("entry", {}).get("kind") != want:
                return False
        elif ev.get(key) != want:
            return False
    return True


def head(server: Etherd, topic: str) -> int:
    """The newest offset of a topic (0 when nothing was stored)."""
    with Watcher(server, ADMIN) as w:
        reply = w.subscribe([topic])
        assert reply["errors"] == [], reply
        offset: int = reply["topics"][0]["offset"]
        return offset


class Frozen(NamedTuple):
    task: dict[str, Any]
    task_head: int
    activity_head: int


def freeze(server: Etherd, task_id: str) -> Frozen:
    """What must not change after a refusal: the task and the heads of its topics."""
    task = get_task(server, task_id)
    return Frozen(task, head(server, task["topic"]), head(server, f"activity/{task['owner']}"))


# -- SSE -----------------------------------------------------------------------------------


class EventStream:
    """A minimal EventSource (HTML event-stream format)."""

    def __init__(self, server: Etherd, path: str, token: str) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=RECV_TIMEOUT)
        self.conn.request("GET", path, headers={"Authorization": f"Bearer {token}"})
        self.resp = self.conn.getresponse()

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
                continue
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")

    def close(self) -> None:
        self.conn.close()


# ==========================================================================================
# 1. The full documented flow


def test_full_flow(server: Etherd) -> None:
    task = create(
        server,
        title="Fix the checkout bug",
        definition_of_done="The coupon tests pass",
        scope={"repo": "org/repo", "branch": "main"},
        context_refs=["profile.md", "project.md"],
    )
    tid, topic = task["id"], f"tasks/{task['id']}"
    assert task["status"] == "queued" and task["topic"] == topic and task["owner"] == "alice"
    other = create(server)

    with Watcher(server, ALICE) as alice, Watcher(server, HARNESS) as h1:
        reply = alice.subscribe([topic, "activity/alice"])
        assert reply["errors"] == [] and [t["topic"] for t in reply["topics"]] == [
            topic,
            "activity/alice",
        ]
        # Before the claim the harness holds nothing.
        refusal = h1.subscribe([topic])["errors"]
        assert [(e["topic"], e["code"]) for e in refusal] == [(topic, "forbidden")]

        listed = ok(harness(server, "GET", "/api/harness/tasks/claimable?limit=200"))["tasks"]
        mine = [t for t in listed if t["task_id"] == tid]
        assert len(mine) == 1 and mine[0]["title"] == "Fix the checkout bug", listed
        assert mine[0]["status"] == "queued"

        preview = ok(harness(server, "GET", f"{tid}/execution"))
        assert preview["schema_version"] == 2 and preview["task_id"] == tid
        assert preview["run_id"] is None
        assert get_task(server, tid)["status"] == "queued"  # a preview claims nothing

        claimed = claim(server, tid)
        run = claimed["run_id"]
        assert run.startswith("run_")
        lease_left = parse_ts(claimed["lease_expires_at"]) - datetime.now(UTC)
        assert 50 < lease_left.total_seconds() <= 61  # tasks.lease_s defaults to 60
        b = claimed["bundle"]
        assert b["schema_version"] == 2 and b["task_id"] == tid and b["run_id"] == run
        assert b["prompt"] == task["prompt"]
        assert b["definition_of_done"] == "The coupon tests pass"
        assert b["scope"] == {"repo": "org/repo", "branch": "main"}
        assert b["context_refs"] == ["profile.md", "project.md"]
        assert b["answers"] == []
        base = f"{public(server)}/api/harness/tasks/{tid}"
        assert b["callbacks"] == {
            "report_step_url": f"{base}/steps",
            "heartbeat_url": f"{base}/heartbeat",
            "interrupt_url": f"{base}/interrupt",
            "result_url": f"{base}/result",
            "websocket_topic": topic,
        }
        assert preview["callbacks"] == b["callbacks"]
        cb = b["callbacks"]
        alice.wait("activity.list_updated", topic="activity/alice", task_id=tid, status="running")
        alice.wait("task.timeline", topic=topic, kind="claimed")

        # Now it holds the task: it may follow it, but not someone else's.
        reply = h1.subscribe([topic, f"tasks/{other['id']}"])
        assert [t["topic"] for t in reply["topics"]] == [topic]
        assert [(e["topic"], e["code"]) for e in reply["errors"]] == [
            (f"tasks/{other['id']}", "forbidden")
        ]

        steps = [
            ("coding_agent", "Reading the checkout code…", "read_files"),
            ("coding_agent", "Making the changes…", "edit"),
        ]
        for phase, message, label in steps:
            body = {
                "run_id": run,
                "phase": phase,
                "user_message": message,
                "internal_label": label,
            }
            answer = ok(harness(server, "POST", cb["report_step_url"], body))
            assert answer["status"] == "running" and answer["run_id"] == run
            ev = alice.wait("os.harness.step", topic=topic, user_message=message)
            assert {k: ev[k] for k in ("task_id", "run_id", "phase", "internal_label")} == {
                "task_id": tid,
                "run_id": run,
                "phase": phase,
                "internal_label": label,
            }
            assert ev["type"] == ev["event"] == "os.harness.step"
            line = alice.wait("task.timeline", topic=topic, kind="step")
            assert line["task_id"] == tid and line["entry"]["summary"] == message
            assert line["entry"]["phase"] == phase and line["entry"]["run_id"] == run
            assert line["offset"] == ev["offset"] + 1
        # The harness sees its own narration on the topic the bundle named.
        h1.wait("os.harness.step", topic=topic, user_message=steps[-1][1])

        question, options = "Round coupon totals half-up or half-even?", ["half-up", "half-even"]
        parked = ok(
            harness(
                server,
                "POST",
                cb["interrupt_url"],
                {"run_id": run, "question": question, "options": options},
            )
        )
        assert parked["status"] == "interrupted" and parked["run_id"] == run
        ev = alice.wait("task.interrupted", topic=topic)
        assert (ev["task_id"], ev["run_id"], ev["question"], ev["options"]) == (
            tid,
            run,
            question,
            options,
        )
        grid = alice.wait("activity.list_updated", task_id=tid, status="interrupted")
        assert grid["title"] == "Fix the checkout bug"
        assert parse_ts(grid["updated_at"]) >= parse_ts(task["created_at"])
        alice.wait("task.timeline", topic=topic, kind="interrupted")
        on_load = get_task(server, tid)
        assert on_load["status"] == "interrupted"
        assert (on_load["question"], on_load["options"]) == (question, options)
        # While parked the run lives on: its heartbeat says so, with no answer yet.
        beat = ok(harness(server, "POST", cb["heartbeat_url"], {"run_id": run}))
        assert beat["status"] == "interrupted" and "answer" not in beat

        resumed = ok(
            api(server, "POST", f"/api/tasks/{tid}/answer", {"answer": "", "option": "half-up"})
        )
        assert resumed["status"] == "running" and resumed["question"] is None
        ev = alice.wait("task.resumed", topic=topic)
        assert (ev["task_id"], ev["answer"], ev["status"]) == (tid, "half-up", "running")
        alice.wait("activity.list_updated", task_id=tid, status="running")
        alice.wait("task.timeline", topic=topic, kind="answered")

        beat = ok(harness(server, "POST", cb["heartbeat_url"], {"run_id": run}))
        assert beat["status"] == "running"
        assert parse_ts(beat["lease_expires_at"]) >= parse_ts(claimed["lease_expires_at"])
        assert beat["answer"]["answer"] == "half-up" and beat["answer"]["option"] == "half-up"
        assert beat["answer"]["question"] == question
        # The next step moves on from the answer: later heartbeats no longer carry it.
        ok(harness(server, "POST", cb["report_step_url"], step_body(run, "Using half-up")))
        beat = ok(harness(server, "POST", cb["heartbeat_url"], {"run_id": run}))
        assert beat["status"] == "running" and "answer" not in beat

        result = {
            "run_id": run,
            "status": "submitted",
            "agent_status": "Opened PR #42",
            "artifact": {"pr": PR, "agent_status": "Opened PR #42"},
            "working_summary": "Rounded coupon totals half-up, as the tests expect.",
        }
        done = ok(harness(server, "POST", cb["result_url"], result))
        assert done["task_id"] == tid and done["status"] == "completed"
        delivered = alice.wait("task.delivered", topic=topic)
        assert delivered["task_id"] == tid and delivered["run_id"] == run
        assert delivered["type"] == delivered["event"] == "task.delivered"
        blocks = delivered["blocks"]
        assert [blk["type"] for blk in blocks] == ["outcome", "hero", "summary", "actions"]
        assert blocks[0] == {
            "type": "outcome",
            "status": "completed",
            "title": "Fix the checkout bug",
            "summary": "The task is complete.",
        }
        assert blocks[1] == {"type": "hero", "kind": "pull_request", **PR}
        assert blocks[2] == {"type": "summary", "text": result["working_summary"]}
        assert [item["id"] for item in blocks[3]["items"]] == ["open_pr", "reply", "run_again"]
        assert blocks[3]["items"][0]["url"] == PR["url"]
        assert done["delivery"]["blocks"] == blocks
        alice.wait("activity.list_updated", task_id=tid, status="completed")
        alice.wait("task.timeline", topic=topic, kind="delivered")
        alice.flush()
        live = alice.on(topic)

    # Page load: the task, the delivery and the timeline from HTTP, as alice.
    page = ok(api(server, "GET", f"/api/tasks/{tid}"))
    assert page["status"] == "completed" and page["run_id"] is None
    assert page["question"] is None and page["lease_expires_at"] is None
    assert page["last_step"]["user_message"] == "Using half-up"
    assert page["last_step"]["phase"] == "coding_agent" and page["last_step"]["run_id"] == run
    assert page["delivery"]["blocks"] == blocks and page["delivery"]["status"] == "completed"
    assert [a["answer"] for a in page["answers"]] == ["half-up"]
    card = ok(api(server, "GET", f"/api/tasks/{tid}/delivery"))
    assert card["task_id"] == tid and card["blocks"] == blocks and card["status"] == "completed"
    assert parse_ts(card["at"]) >= parse_ts(task["created_at"])
    timeline = ok(api(server, "GET", f"/api/tasks/{tid}/timeline"))
    kinds = [e["kind"] for e in timeline["entries"]]
    assert kinds == [
        "created",
        "claimed",
        "step",
        "step",
        "interrupted",
        "answered",
        "step",
        "delivered",
    ]
    offsets = [e["offset"] for e in timeline["entries"]]
    assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets)
    # Paged two at a time from ?since=, the same entries come back.
    paged: list[dict[str, Any]] = []
    since = 0
    while True:
        page_ = ok(api(server, "GET", f"/api/tasks/{tid}/timeline?since={since}&limit=2"))
        if not page_["entries"]:
            break
        assert len(page_["entries"]) <= 2
        paged.extend(page_["entries"])
        since = page_["next"]
    assert paged == timeline["entries"]

    # A late subscriber replays everything, in offset order, ending with the card.
    with Watcher(server, ALICE) as late:
        ack, replay = late.replay(topic, 0)
    assert [e["offset"] for e in replay] == list(range(1, ack["offset"] + 1))
    # It ends with the card, then the card's timeline line (contract section 6 order:
    # task.delivered, timeline; activity goes to activity/alice).
    assert [e["event"] for e in replay[-2:]] == ["task.delivered", "task.timeline"]
    assert replay[-2]["blocks"] == blocks and replay[-1]["entry"]["kind"] == "delivered"
    assert [e["entry"]["kind"] for e in replay if e["event"] == "task.timeline"] == kinds
    # What alice saw live is exactly the tail of the replay.
    assert live == replay[len(replay) - len(live) :]
    assert live[0]["offset"] > 1  # she subscribed after the task was created

    # And the SSE stream replays the same offsets with the same events.
    stream = EventStream(server, f"/api/tasks/{tid}/events?since=0", ALICE)
    try:
        assert stream.resp.status == 200
        sse = [stream.next_event() for _ in replay]
    finally:
        stream.close()
    assert [int(e["id"]) for e in sse] == [e["offset"] for e in replay]
    assert [e["event"] for e in sse] == [e["event"] for e in replay]
    assert [e["data"] for e in sse] == replay


# ==========================================================================================
# 2. blocked, answer, re-claim


def test_blocked_then_answer_then_reclaim(server: Etherd) -> None:
    task = create(server)
    tid, topic = task["id"], task["topic"]
    with Watcher(server, ALICE) as alice, Watcher(server, HARNESS) as pool:
        assert alice.subscribe([topic, "activity/alice"])["errors"] == []
        assert pool.subscribe(["harness"])["errors"] == []
        first = claim(server, tid)
        run1 = first["run_id"]
        ok(harness(server, "POST", f"{tid}/steps", step_body(run1, "Looking around")))
        blocked = ok(
            harness(
                server,
                "POST",
                f"{tid}/result",
                {
                    "run_id": run1,
                    "status": "blocked",
                    "agent_status": "Need credentials",
                    "question": "Which staging account should I use?",
                    "options": ["staging-eu", "staging-us"],
                },
            )
        )
        assert blocked["status"] == "interrupted" and "delivery" not in blocked
        ev = alice.wait("task.interrupted", topic=topic)
        assert ev["run_id"] == run1 and ev["question"] == "Which staging account should I use?"
        assert ev["options"] == ["staging-eu", "staging-us"]
        alice.wait("activity.list_updated", task_id=tid, status="interrupted")
        line = alice.wait("task.timeline", topic=topic, kind="blocked")
        assert line["entry"]["result"] == "blocked"
        parked = get_task(server, tid)
        assert parked["status"] == "interrupted" and parked["run_id"] is None
        assert parked["delivery"] is None

        # The run has ended: its heartbeat is refused and changes nothing.
        before = freeze(server, tid)
        refused(harness(server, "POST", f"{tid}/heartbeat", {"run_id": run1}), 409, "run_mismatch")
        assert freeze(server, tid) == before

        answered = ok(
            api(server, "POST", f"/api/tasks/{tid}/answer", {"answer": "Use staging-eu please"})
        )
        assert answered["status"] == "queued"
        ev = alice.wait("task.resumed", topic=topic)
        assert ev["answer"] == "Use staging-eu please" and ev["status"] == "queued"
        alice.wait("activity.list_updated", task_id=tid, status="queued")
        ready = pool.wait("task.harness.ready", topic="harness", task_id=tid)
        assert ready["title"] == task["title"] and ready["created_at"] == task["created_at"]

        second = claim(server, tid)
        run2 = second["run_id"]
        assert run2 != run1
        (entry,) = second["bundle"]["answers"]
        assert entry["question"] == "Which staging account should I use?"
        assert entry["answer"] == "Use staging-eu please" and entry["option"] is None
        # The old run stays dead under the new one.
        refused(
            harness(server, "POST", f"{tid}/steps", step_body(run1, "late")), 409, "run_mismatch"
        )
        assert get_task(server, tid)["attempts"] == 2


def step_body(run_id: str, message: str, phase: str = "coding_agent") -> dict[str, Any]:
    return {"run_id": run_id, "phase": phase, "user_message": message, "internal_label": phase}


# ==========================================================================================
# 3. Lease expiry


@pytest.fixture
def short_lease(store_url: str, tmp_path: Path) -> Iterator[Etherd]:
    """An etherd whose leases last one second and are swept five times a second."""
    srv = make_server(
        tmp_path, store_url, {"tasks": {"lease_s": 1.0, "sweep_interval_s": 0.2}}
    ).start()
    try:
        yield srv
    finally:
        srv.kill()


def test_lease_expiry_returns_the_task_to_the_queue(short_lease: Etherd) -> None:
    server = short_lease
    task = create(server)
    tid, topic = task["id"], task["topic"]
    with Watcher(server, ALICE) as alice, Watcher(server, HARNESS) as pool:
        assert alice.subscribe([topic, "activity/alice"])["errors"] == []
        assert pool.subscribe(["harness"])["errors"] == []

        # Heartbeats keep a lease alive well past its length.
        kept = claim(server, tid)["run_id"]
        for _ in range(6):
            time.sleep(0.3)
            ok(harness(server, "POST", f"{tid}/heartbeat", {"run_id": kept}))
        assert get_task(server, tid)["status"] == "running"
        ok(harness(server, "POST", f"{tid}/result", {"run_id": kept, "status": "no_changes"}))

        task = create(server)
        tid, topic = task["id"], task["topic"]
        assert alice.subscribe([topic])["errors"] == []
        pool.wait("task.harness.ready", topic="harness", task_id=tid)
        run1 = claim(server, tid)["run_id"]
        # No heartbeat: the sweeper ends the run and queues the task again.
        line = alice.wait("task.timeline", timeout=5, topic=topic, kind="lease_expired")
        assert line["entry"]["run_id"] == run1 and line["entry"]["status"] == "queued"
        alice.wait("activity.list_updated", task_id=tid, status="queued")
        pool.wait("task.harness.ready", topic="harness", task_id=tid)
        queued = get_task(server, tid)
        assert queued["status"] == "queued" and queued["run_id"] is None
        assert queued["lease_expires_at"] is None

        # The expired run's calls are refused as stale-run calls and change nothing.
        before = freeze(server, tid)
        stale_step = harness(server, "POST", f"{tid}/steps", step_body(run1, "still here?"))
        stale_beat = harness(server, "POST", f"{tid}/heartbeat", {"run_id": run1})
        assert freeze(server, tid) == before

        run2 = claim(server, tid)["run_id"]
        assert run2 != run1
        # Under the new run too, the run whose lease lapsed hears why it lost the task.
        refused(
            harness(server, "POST", f"{tid}/steps", step_body(run1, "late")), 409, "lease_expired"
        )
        refused(
            harness(server, "POST", f"{tid}/steps", step_body("run_other", "x")),
            409,
            "run_mismatch",
        )
        ok(harness(server, "POST", f"{tid}/steps", step_body(run2, "fresh run")))
        ok(harness(server, "POST", f"{tid}/result", {"run_id": run2, "status": "no_changes"}))
        assert get_task(server, tid)["status"] == "completed"

        # A live interrupt whose lease lapses stays parked; the answer then queues it.
        task = create(server)
        tid, topic = task["id"], task["topic"]
        assert alice.subscribe([topic])["errors"] == []
        run3 = claim(server, tid)["run_id"]
        ok(harness(server, "POST", f"{tid}/interrupt", {"run_id": run3, "question": "Sure?"}))
        alice.wait("task.timeline", timeout=5, topic=topic, kind="lease_expired")
        parked = get_task(server, tid)
        assert parked["status"] == "interrupted" and parked["question"] == "Sure?"
        assert parked["run_id"] is None
        answered = ok(api(server, "POST", f"/api/tasks/{tid}/answer", {"answer": "yes"}))
        assert answered["status"] == "queued"
        assert claim(server, tid)["bundle"]["answers"][0]["answer"] == "yes"

    # Checked last so the rest of the test runs either way: a run whose lease expired and
    # was swept must be told exactly that, not that the task is in the wrong status.
    assert stale_step.status == 409 and stale_step.code == "lease_expired", stale_step
    assert stale_beat.status == 409 and stale_beat.code == "lease_expired", stale_beat


# ==========================================================================================
# 4. no_changes and failed


def test_no_changes_completes_with_a_no_changes_card(server: Etherd) -> None:
    task = create(server, title="Tidy the README")
    tid, topic = task["id"], task["topic"]
    with Watcher(server, ALICE) as alice:
        assert alice.subscribe([topic, "activity/alice"])["errors"] == []
        run = claim(server, tid)["run_id"]
        done = ok(
            harness(
                server,
                "POST",
                f"{tid}/result",
                {"run_id": run, "status": "no_changes", "agent_status": "Already tidy"},
            )
        )
        assert done["status"] == "completed"
        ev = alice.wait("task.delivered", topic=topic)
        assert ev["run_id"] == run
        assert [b["type"] for b in ev["blocks"]] == ["outcome", "hero", "actions"]
        assert ev["blocks"][0] == {
            "type": "outcome",
            "status": "no_changes",
            "title": "Tidy the README",
            "summary": "The task is complete; no changes were needed.",
        }
        assert ev["blocks"][1] == {"type": "hero", "kind": "text", "text": "Already tidy"}
        assert [i["id"] for i in ev["blocks"][2]["items"]] == ["reply", "run_again"]
        alice.wait("activity.list_updated", task_id=tid, status="completed")
    card = ok(api(server, "GET", f"/api/tasks/{tid}/delivery"))
    assert card["status"] == "no_changes" and card["blocks"] == ev["blocks"]
    assert get_task(server, tid)["status"] == "completed"


def test_failed_result_fails_the_task_with_a_card(server: Etherd) -> None:
    task = create(server, title="Make the tests pass")
    tid, topic = task["id"], task["topic"]
    with Watcher(server, ALICE) as alice:
        assert alice.subscribe([topic, "activity/alice"])["errors"] == []
        run = claim(server, tid)["run_id"]
        done = ok(
            harness(
                server,
                "POST",
                f"{tid}/result",
                {
                    "run_id": run,
                    "status": "failed",
                    "agent_status": "Could not make the tests pass",
                    "error": "3 tests fail after the change",
                },
            )
        )
        assert done["status"] == "failed"
        ev = alice.wait("task.failed", topic=topic)
        assert ev["task_id"] == tid and ev["run_id"] == run
        assert ev["blocks"] == [
            {
                "type": "outcome",
                "status": "failed",
                "title": "Make the tests pass",
                "summary": "The task failed: 3 tests fail after the change",
            },
            {"type": "hero", "kind": "text", "text": "Could not make the tests pass"},
            {
                "type": "actions",
                "items": [
                    {"id": "run_again", "label": "Try again"},
                    {"id": "reply", "label": "Reply"},
                ],
            },
        ]
        alice.wait("activity.list_updated", task_id=tid, status="failed")
        alice.wait("task.timeline", topic=topic, kind="failed")
        alice.flush()
        assert alice.named("task.delivered", task_id=tid) == []
    page = get_task(server, tid)
    assert page["status"] == "failed" and page["error"] == "3 tests fail after the change"
    assert page["delivery"]["blocks"] == ev["blocks"] and page["delivery"]["status"] == "failed"


# ==========================================================================================
# 5. Concurrent claims


def race(calls: list[Callable[[], Reply]]) -> list[Reply]:
    """Run the calls at once from one thread each (released by a barrier)."""
    barrier = threading.Barrier(len(calls))
    out: list[Reply | BaseException | None] = [None] * len(calls)

    def run(i: int) -> None:
        try:
            barrier.wait(timeout=10)
            out[i] = calls[i]()
        except BaseException as exc:
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    replies = []
    for item in out:
        assert isinstance(item, Reply), item
        replies.append(item)
    return replies


def claim_call(server: Etherd, tid: str) -> Reply:
    return harness(server, "POST", f"{tid}/claim", {"app_id": APP})


def check_one_winner(server: Etherd, tid: str, replies: list[Reply]) -> None:
    wins = [r for r in replies if r.status == 200]
    assert len(wins) == 1, [(r.status, r.code) for r in replies]
    for r in replies:
        if r is not wins[0]:
            refused(r, 409, "already_claimed")
    task = get_task(server, tid)
    assert task["status"] == "running" and task["run_id"] == wins[0].body["run_id"]
    assert task["attempts"] == 1
    lines = ok(api(server, "GET", f"/api/tasks/{tid}/timeline", token=ADMIN))["entries"]
    assert [e["kind"] for e in lines] == ["created", "claimed"]


def test_concurrent_claims_have_one_winner(server: Etherd) -> None:
    tid = create(server)["id"]
    replies = race([partial(claim_call, server, tid) for _ in range(10)])
    check_one_winner(server, tid, replies)


@pytest.mark.pg
def test_two_processes_on_one_postgres_claim_once(tmp_path: Path, pg_url: str) -> None:
    a = make_server(tmp_path / "a", pg_url).start()
    b = make_server(tmp_path / "b", pg_url).start()
    try:
        tids = [create(a if i % 2 else b)["id"] for i in range(20)]
        for tid in tids:
            replies = race([partial(claim_call, srv, tid) for srv in (a, b, a, b)])
            check_one_winner(a, tid, replies)
            assert get_task(b, tid) == get_task(a, tid)
    finally:
        a.kill()
        b.kill()


# ==========================================================================================
# 6. Idempotent retries


def test_retried_step_narrates_once(server: Etherd) -> None:
    task = create(server)
    tid, topic = task["id"], task["topic"]
    run = claim(server, tid)["run_id"]
    with Watcher(server, ALICE) as alice:
        assert alice.subscribe([topic])["errors"] == []
        body = step_body(run, "Running the tests once")
        key = "step-" + uid()
        first = harness(server, "POST", f"{tid}/steps", body, key=key)
        again = harness(server, "POST", f"{tid}/steps", body, key=key)
        assert first.status == again.status == 200
        assert first.body == again.body
        assert again.headers.get("idempotent-replayed") == "true"
        before = freeze(server, tid)
        other = harness(server, "POST", f"{tid}/steps", step_body(run, "something else"), key=key)
        refused(other, 409, "idempotency_conflict")
        assert freeze(server, tid) == before
        # A later step is a marker: once it arrived, everything before it did too.
        ok(harness(server, "POST", f"{tid}/steps", step_body(run, "marker")))
        alice.wait("os.harness.step", topic=topic, user_message="marker")
        assert len(alice.named("os.harness.step", user_message="Running the tests once")) == 1
        assert len(alice.named("os.harness.step", user_message="something else")) == 0

        # A retried result delivers once and answers the same.
        result = {"run_id": run, "status": "submitted", "artifact": {"pr": PR}}
        key = "result-" + uid()
        first = harness(server, "POST", f"{tid}/result", result, key=key)
        again = harness(server, "POST", f"{tid}/result", result, key=key)
        assert first.status == again.status == 200 and first.body == again.body
        alice.wait("task.delivered", topic=topic)
        alice.flush()
        assert len(alice.named("task.delivered", task_id=tid)) == 1


def test_retried_claim_returns_the_same_run(server: Etherd) -> None:
    """A harness that lost the claim's answer retries and gets its run, not a 409."""
    tid = create(server)["id"]
    key = "claim-" + uid()
    first = harness(server, "POST", f"{tid}/claim", {"app_id": APP}, key=key)
    again = harness(server, "POST", f"{tid}/claim", {"app_id": APP}, key=key)
    assert first.status == again.status == 200 and first.body == again.body
    assert get_task(server, tid)["attempts"] == 1
    refused(harness(server, "POST", f"{tid}/claim", {"app_id": APP}), 409, "already_claimed")


def test_concurrent_retries_with_one_key_narrate_once(
    server: Etherd, running: tuple[str, str]
) -> None:
    tid, run = running
    with Watcher(server, ALICE) as alice:
        assert alice.subscribe([f"tasks/{tid}"])["errors"] == []
        key = "burst-" + uid()
        body = step_body(run, "Said once, sent five times")
        replies = race(
            [partial(harness, server, "POST", f"{tid}/steps", body, key=key) for _ in range(5)]
        )
        assert {r.status for r in replies} == {200}, replies
        assert len({json.dumps(r.body, sort_keys=True) for r in replies}) == 1
        ok(harness(server, "POST", f"{tid}/steps", step_body(run, "marker")))
        alice.wait("os.harness.step", user_message="marker")
        assert len(alice.named("os.harness.step", user_message=body["user_message"])) == 1


def test_retried_create_makes_one_task(server: Etherd) -> None:
    owner = "ida-" + uid()
    token = make_token(owner)
    key = "create-" + uid()
    body = {"prompt": "Summarize this quarter"}
    first = api(server, "POST", "/api/tasks", body, token=token, headers={"Idempotency-Key": key})
    again = api(server, "POST", "/api/tasks", body, token=token, headers={"Idempotency-Key": key})
    assert first.status == again.status == 201 and first.body == again.body
    grid = ok(api(server, "GET", "/api/activity", token=token))["tasks"]
    assert [t["task_id"] for t in grid] == [first.body["id"]]


# ==========================================================================================
# 7. Bad input: status, error code, and nothing changed


@pytest.fixture
def running(server: Etherd) -> tuple[str, str]:
    """A task of alice's that h1 holds: (task_id, run_id)."""
    tid = create(server)["id"]
    return tid, claim(server, tid)["run_id"]


def test_unknown_task_is_404(server: Etherd) -> None:
    refused(api(server, "GET", "/api/tasks/task_nope"), 404, "not_found")
    refused(api(server, "GET", "/api/tasks/task_nope/delivery"), 404, "not_found")
    refused(api(server, "POST", "/api/tasks/task_nope/answer", {"answer": "x"}), 404, "not_found")
    refused(api(server, "POST", "/api/tasks/task_nope/cancel", {}), 404, "not_found")
    refused(harness(server, "GET", "task_nope/execution"), 404, "not_found")
    refused(harness(server, "POST", "task_nope/claim", {"app_id": APP}), 404, "not_found")
    refused(harness(server, "POST", "task_nope/heartbeat", {"run_id": "run_x"}), 404, "not_found")
    assert head(server, "tasks/task_nope") == 0


def test_someone_elses_task_is_404(server: Etherd) -> None:
    task = create(server)
    tid = task["id"]
    ok(
        harness(
            server,
            "POST",
            f"{tid}/interrupt",
            {"run_id": claim(server, tid)["run_id"], "question": "Q?"},
        )
    )
    before = freeze(server, tid)
    refused(api(server, "GET", f"/api/tasks/{tid}", token=BOB), 404, "not_found")
    refused(api(server, "GET", f"/api/tasks/{tid}/timeline", token=BOB), 404, "not_found")
    refused(
        api(server, "POST", f"/api/tasks/{tid}/answer", {"answer": "x"}, token=BOB),
        404,
        "not_found",
    )
    refused(api(server, "POST", f"/api/tasks/{tid}/cancel", {}, token=BOB), 404, "not_found")
    refused(api(server, "GET", f"/api/tasks/{tid}/delivery", token=BOB), 404, "not_found")
    # The event stream must not tell someone else's task from a missing one either.
    theirs = api(server, "GET", f"/api/tasks/{tid}/events?since=0", token=BOB)
    missing = api(server, "GET", "/api/tasks/task_nope/events?since=0", token=BOB)
    assert theirs.status in (403, 404) and (theirs.status, theirs.code) == (
        missing.status,
        missing.code,
    )
    # A user token on the harness API works only for the user's own tasks.
    refused(harness(server, "GET", f"{tid}/execution", token=BOB), 404, "not_found")
    with Watcher(server, BOB) as bob:
        errors = bob.subscribe([task["topic"]])["errors"]
        assert [e["code"] for e in errors] == ["forbidden"]
    assert freeze(server, tid) == before


def test_delivery_before_a_result_is_404(server: Etherd, running: tuple[str, str]) -> None:
    tid, _ = running
    message = refused(api(server, "GET", f"/api/tasks/{tid}/delivery"), 404, "not_found")
    assert "running" in message


def test_missing_harness_app_header_is_400(server: Etherd, running: tuple[str, str]) -> None:
    tid, run = running
    queued = create(server)["id"]
    before, waiting = freeze(server, tid), freeze(server, queued)
    refused(harness(server, "GET", "/api/harness/tasks/claimable", app=None), 400, "bad_request")
    refused(harness(server, "POST", f"{queued}/claim", {}, app=None), 400, "bad_request")
    refused(
        harness(server, "POST", f"{tid}/steps", step_body(run, "no app"), app=None),
        400,
        "bad_request",
    )
    assert freeze(server, tid) == before and freeze(server, queued) == waiting


def test_service_token_on_harness_routes_is_403(server: Etherd, running: tuple[str, str]) -> None:
    tid, run = running
    queued = create(server)["id"]
    before, waiting = freeze(server, tid), freeze(server, queued)
    refused(harness(server, "GET", "/api/harness/tasks/claimable", token=SERVICE), 403, "forbidden")
    refused(harness(server, "POST", f"{queued}/claim", {}, token=SERVICE), 403, "forbidden")
    refused(
        harness(server, "POST", f"{tid}/steps", step_body(run, "svc"), token=SERVICE),
        403,
        "forbidden",
    )
    assert freeze(server, tid) == before and freeze(server, queued) == waiting


def test_wrong_run_id_is_409(server: Etherd, running: tuple[str, str]) -> None:
    tid, run = running
    before = freeze(server, tid)
    for path, body in [
        ("steps", step_body("run_wrong", "hi")),
        ("heartbeat", {"run_id": "run_wrong"}),
        ("interrupt", {"run_id": "run_wrong", "question": "Q?"}),
        ("result", {"run_id": "run_wrong", "status": "submitted"}),
    ]:
        message = refused(harness(server, "POST", f"{tid}/{path}", body), 409, "run_mismatch")
        assert "run_wrong" in message and run in message
    refused(harness(server, "POST", f"{tid}/claim", {"app_id": APP}), 409, "already_claimed")
    assert freeze(server, tid) == before


def test_result_for_a_completed_task_is_409(server: Etherd, running: tuple[str, str]) -> None:
    tid, run = running
    ok(harness(server, "POST", f"{tid}/result", {"run_id": run, "status": "no_changes"}))
    before = freeze(server, tid)
    message = refused(
        harness(server, "POST", f"{tid}/result", {"run_id": run, "status": "submitted"}),
        409,
        "invalid_transition",
    )
    assert "completed" in message
    refused(harness(server, "POST", f"{tid}/claim", {"app_id": APP}), 409, "invalid_transition")
    assert freeze(server, tid) == before


def test_answer_to_a_task_that_asks_nothing_is_409(
    server: Etherd, running: tuple[str, str]
) -> None:
    tid, _ = running
    queued = create(server)["id"]
    for task_id in (tid, queued):
        before = freeze(server, task_id)
        message = refused(
            api(server, "POST", f"/api/tasks/{task_id}/answer", {"answer": "yes"}),
            409,
            "invalid_transition",
        )
        assert "asks no question" in message
        assert freeze(server, task_id) == before


def test_answer_with_an_option_not_offered_is_422(server: Etherd, running: tuple[str, str]) -> None:
    tid, run = running
    ok(
        harness(
            server,
            "POST",
            f"{tid}/interrupt",
            {"run_id": run, "question": "Which?", "options": ["a", "b"]},
        )
    )
    before = freeze(server, tid)
    refused(api(server, "POST", f"/api/tasks/{tid}/answer", {"option": "c"}), 422, "unprocessable")
    refused(api(server, "POST", f"/api/tasks/{tid}/answer", {"answer": " "}), 422, "unprocessable")
    assert freeze(server, tid) == before


def test_malformed_bodies(server: Etherd, running: tuple[str, str]) -> None:
    tid, run = running
    before = freeze(server, tid)
    steps = f"{tid}/steps"
    refused(harness(server, "POST", steps, b'{"run_id": "'), 400, "bad_request")
    refused(
        harness(server, "POST", steps, b"run_id=x", headers={"Content-Type": "text/plain"}),
        415,
        "unsupported_media_type",
    )
    refused(
        harness(server, "POST", steps, b"", headers={"Content-Type": "application/x-www-form"}),
        415,
        "unsupported_media_type",
    )
    refused(harness(server, "POST", steps, [step_body(run, "a list")]), 422, "unprocessable")
    refused(harness(server, "POST", steps, {"run_id": run, "phase": "x"}), 422, "unprocessable")
    refused(
        harness(server, "POST", steps, {**step_body(run, "x"), "phase": 7}), 422, "unprocessable"
    )
    refused(
        harness(server, "POST", f"{tid}/result", {"run_id": run, "status": "done"}),
        422,
        "unprocessable",
    )
    refused(harness(server, "POST", f"{tid}/result", {"status": "submitted"}), 422, "unprocessable")
    refused(harness(server, "POST", f"{tid}/heartbeat", {}), 422, "unprocessable")
    refused(
        harness(server, "POST", f"{tid}/interrupt", {"run_id": run, "question": "  "}),
        422,
        "unprocessable",
    )
    refused(api(server, "POST", "/api/tasks", {"title": "no prompt"}), 422, "unprocessable")
    refused(api(server, "POST", "/api/tasks", b"{not json"), 400, "bad_request")
    assert freeze(server, tid) == before


def test_oversized_user_message_is_413(server: Etherd, running: tuple[str, str]) -> None:
    tid, run = running
    with Watcher(server, ALICE) as alice:
        assert alice.subscribe([f"tasks/{tid}"])["errors"] == []
        before = freeze(server, tid)
        # Bytes count, not characters: 257 two-byte characters are 514 bytes.
        too_big = "é" * (USER_MESSAGE_LIMIT // 2 + 1)
        message = refused(
            harness(server, "POST", f"{tid}/steps", step_body(run, too_big)),
            413,
            "payload_too_large",
        )
        assert "max_user_message_bytes" in message
        assert freeze(server, tid) == before
        just_fits = "é" * (USER_MESSAGE_LIMIT // 2)
        ok(harness(server, "POST", f"{tid}/steps", step_body(run, just_fits)))
        alice.wait("os.harness.step", user_message=just_fits)


def test_owner_is_for_service_tokens(server: Etherd) -> None:
    carol = "carol-" + uid()
    refused(
        api(server, "POST", "/api/tasks", {"prompt": "Email the vendor", "owner": carol}),
        403,
        "forbidden",
    )
    assert ok(api(server, "GET", "/api/activity", token=make_token(carol)))["tasks"] == []
    refused(api(server, "POST", "/api/tasks", {"prompt": "x"}, token=HARNESS), 403, "forbidden")
    made = ok(
        api(
            server,
            "POST",
            "/api/tasks",
            {"prompt": "Email the vendor", "owner": carol},
            token=SERVICE,
        ),
        201,
    )
    assert made["owner"] == carol
    grid = ok(api(server, "GET", "/api/activity", token=make_token(carol)))["tasks"]
    assert [(t["task_id"], t["status"], t["title"]) for t in grid] == [
        (made["id"], "queued", "Email the vendor")
    ]
    seen = ok(api(server, "GET", f"/api/tasks/{made['id']}", token=make_token(carol)))
    assert seen["owner"] == carol
    refused(api(server, "GET", f"/api/tasks/{made['id']}"), 404, "not_found")


# ==========================================================================================
# 8. Activity and realtime config


def test_activity_is_newest_first_with_cursor_pagination(server: Etherd) -> None:
    owner = "dora-" + uid()
    token = make_token(owner)
    made = []
    for i in range(5):
        made.append(create(server, token=token, title=f"Task {i}")["id"])
        time.sleep(0.005)  # distinct update times, so "newest first" has one answer
    # Touch the second task: it becomes the newest change.
    ok(api(server, "POST", f"/api/tasks/{made[1]}/cancel", {}, token=token))
    expected = [made[1], made[4], made[3], made[2], made[0]]

    seen: list[dict[str, Any]] = []
    cursor: str | None = None
    pages = 0
    while True:
        path = "/api/activity?limit=2" + (f"&cursor={quote(cursor)}" if cursor else "")
        page = ok(api(server, "GET", path, token=token))
        pages += 1
        assert len(page["tasks"]) <= 2
        seen.extend(page["tasks"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
        assert pages < 10
    assert pages == 3
    assert [t["task_id"] for t in seen] == expected
    stamps = [parse_ts(t["updated_at"]) for t in seen]
    assert stamps == sorted(stamps, reverse=True)
    assert seen[0]["status"] == "cancelled" and seen[0]["title"] == "Task 1"
    assert {t["status"] for t in seen[1:]} == {"queued"}
    assert all(t["last_step_message"] is None for t in seen)
    refused(api(server, "GET", "/api/activity?cursor=garbage", token=token), 400, "bad_request")


def test_activity_shows_the_last_step(server: Etherd, running: tuple[str, str]) -> None:
    tid, run = running
    ok(harness(server, "POST", f"{tid}/steps", step_body(run, "Halfway there")))
    grid = ok(api(server, "GET", "/api/activity?limit=1"))["tasks"]
    assert grid[0]["task_id"] == tid and grid[0]["status"] == "running"
    assert grid[0]["last_step_message"] == "Halfway there"


def test_realtime_config(server: Etherd) -> None:
    config = ok(api(server, "GET", "/api/realtime/config"))
    assert config["prefer_websocket"] is True
    assert config["websocket_url"] == "ws" + public(server)[4:] + "/api/realtime"


# ==========================================================================================
# 9. Cancel


def test_cancel(server: Etherd, running: tuple[str, str]) -> None:
    task = create(server)
    tid, topic = task["id"], task["topic"]
    with Watcher(server, ALICE) as alice:
        assert alice.subscribe([topic, "activity/alice"])["errors"] == []
        cancelled = ok(api(server, "POST", f"/api/tasks/{tid}/cancel", {}))
        assert cancelled["status"] == "cancelled"
        alice.wait("activity.list_updated", task_id=tid, status="cancelled")
        alice.wait("task.timeline", topic=topic, kind="cancelled")
    before = freeze(server, tid)
    refused(harness(server, "POST", f"{tid}/claim", {"app_id": APP}), 409, "invalid_transition")
    refused(api(server, "POST", f"/api/tasks/{tid}/cancel", {}), 409, "invalid_transition")
    assert freeze(server, tid) == before

    # A running task is cancelled too; its harness hears it on its next call.
    busy, run_id = running
    with Watcher(server, ALICE) as alice:
        assert alice.subscribe([f"tasks/{busy}"])["errors"] == []
        assert ok(api(server, "POST", f"/api/tasks/{busy}/cancel", {}))["status"] == "cancelled"
        line = alice.wait("task.timeline", topic=f"tasks/{busy}", kind="cancelled")
        assert line["entry"]["run_id"] == run_id
    before = freeze(server, busy)
    for path, body in (
        ("heartbeat", {"run_id": run_id}),
        ("steps", step_body(run_id, "still going")),
        ("interrupt", {"run_id": run_id, "question": "Go on?"}),
        ("result", {"run_id": run_id, "status": "submitted"}),
    ):
        message = refused(harness(server, "POST", f"{busy}/{path}", body), 409, "cancelled")
        assert "cancelled by its owner" in message
    assert freeze(server, busy) == before


# ==========================================================================================
# The outside harness: written only against the public contract


def test_outside_harness_uses_only_public_shapes() -> None:
    tree = ast.parse(OUTSIDE_HARNESS.read_text())
    roots: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import"
            roots.add((node.module or "").split(".")[0])
    outside = roots - set(sys.stdlib_module_names) - {"__future__"}
    assert outside == {"websockets"}, outside


@pytest.mark.parametrize("who", ["harness", "user"])
def test_outside_harness_against_the_server(server: Etherd, who: str) -> None:
    """The harness runs with a harness token, or with the user's own token (the public
    docs' "user JWT" pattern of a local harness)."""
    task = create(server, title="Fix the checkout bug", scope={"repo": "org/repo"})
    tid, topic = task["id"], task["topic"]
    env = {
        **os.environ,
        "ETHER_API_BASE_URL": public(server),
        "ETHER_TOKEN": HARNESS if who == "harness" else ALICE,
        "ETHER_HARNESS_APP": APP,
    }
    with Watcher(server, ALICE) as alice:
        assert alice.subscribe([topic, "activity/alice"])["errors"] == []
        proc = subprocess.Popen(
            [
                sys.executable,
                "-I",
                str(OUTSIDE_HARNESS),
                "run",
                tid,
                "--question",
                "Open a pull request or push to main?",
                "--option",
                "pull request",
                "--option",
                "push",
                "--pr",
                json.dumps(PR),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            parked = alice.wait("task.interrupted", timeout=15, topic=topic)
            assert parked["options"] == ["pull request", "push"]
            ok(api(server, "POST", f"/api/tasks/{tid}/answer", {"option": "pull request"}))
            delivered = alice.wait("task.delivered", timeout=15, topic=topic)
            out, err = proc.communicate(timeout=15)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0, err.decode()
        summary = json.loads(out)
        narration = [e["user_message"] for e in alice.named("os.harness.step", task_id=tid)]
    assert narration == summary["narrated"] and len(narration) >= 3
    assert all(e["run_id"] == summary["run_id"] for e in alice.named("os.harness.step"))
    assert summary["answer"] == "pull request" and summary["was_claimable"] is True
    assert summary["status"] == "completed"
    assert summary["heard_own_narration"] is True
    assert delivered["run_id"] == summary["run_id"]
    assert [b["type"] for b in delivered["blocks"]][:2] == ["outcome", "hero"]
    assert delivered["blocks"][1] == {"type": "hero", "kind": "pull_request", **PR}
    assert get_task(server, tid)["delivery"]["blocks"] == delivered["blocks"]
