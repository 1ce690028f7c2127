"""Locust load test for etherd: WebSocket subscribers watching tasks that harnesses run.

Two kinds of simulated users:

``Subscriber`` (a person with a task page open)
    Opens ``/api/realtime?token=...`` (websocket-client, which gevent makes cooperative),
    subscribes to ``activity/{owner}``, and follows one task at a time: when the activity
    topic announces a task that is queued or running, it subscribes to ``tasks/{id}`` with
    ``since: 0`` (a page load: replay, then live) and unsubscribes once the task is
    delivered or failed. Each live ``os.harness.step`` carries the harness's
    ``time.time_ns()`` in ``user_message``; the delay until it arrives is reported to locust
    as a request ``WS / event latency``, so the UI and the summary show its percentiles.
    When the connection drops it reconnects and resumes every topic from the last offset it
    saw (``since`` + ``epoch``): ``WS / resume`` times that and fails if the server could not
    recover the gap. Offsets are checked per topic: a gap or a duplicate is a failure of
    ``WS / offset order``. Steps replayed after a subscribe or a resume are reported apart as
    ``WS / replayed step`` (their age, not a latency), and ``WS / ping`` times a command
    round trip every few seconds.
``Harness`` (an agent harness, FastHttpUser)
    Creates a task, claims it with ``X-Ether-Harness-App``, posts ``ETHERD_LOCUST_STEPS``
    steps ``ETHERD_LOCUST_STEP_WAIT`` seconds apart, then posts a ``submitted`` result.

Install the bench extra (locust, websocket-client): ``pip install -e '.[bench]'``. Run
etherd with development auth (a loopback listener without keys accepts the token ``test``),
then, headless, from the repository root::

    .venv/bin/etherd serve --port 8080 --data-dir "$(mktemp -d)" &
    .venv/bin/locust -f bench/locustfile.py --headless -u 200 -r 50 -t 60s \\
        --host http://127.0.0.1:8080 --only-summary

or without ``--headless`` for the web UI on http://127.0.0.1:8089. Nine in ten users are
subscribers (class weights; pick one class by naming it after the options).

Environment (all optional):

==============================  =============================================================
``ETHERD_LOCUST_TOKEN``         token of subscribers and task creation (default ``test``)
``ETHERD_LOCUST_HARNESS_TOKEN`` token for the harness routes (default: the token above)
``ETHERD_LOCUST_OWNER``         whose ``activity/{owner}`` to follow (default: the token's
                                ``sub``; ``dev`` for the development token)
``ETHERD_LOCUST_HARNESS_APP``   ``X-Ether-Harness-App`` value (default ``locust``)
``ETHERD_LOCUST_STEPS``         steps per task (default 20)
``ETHERD_LOCUST_STEP_WAIT``     seconds between steps (default 0.25)
``ETHERD_LOCUST_CHURN``         share of subscribers that disconnect and resume each minute,
                                e.g. ``0.1`` (default 0: no churn)
==============================  =============================================================

Locust monkey-patches the process with gevent when it is imported. This file is therefore
never imported by etherd or by the test suite: it lives under ``bench/`` (pytest collects
``tests/`` only) and imports nothing from ``etherd``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import random
import time
from typing import Any
from urllib.parse import quote, urlsplit

import gevent  # type: ignore[import-untyped]  # gevent ships no type information
import websocket
from locust import FastHttpUser, User, between, constant, events, task
from locust.env import Environment

TOKEN = os.environ.get("ETHERD_LOCUST_TOKEN", "test")
HARNESS_TOKEN = os.environ.get("ETHERD_LOCUST_HARNESS_TOKEN", TOKEN)
HARNESS_APP = os.environ.get("ETHERD_LOCUST_HARNESS_APP", "locust")
STEPS = int(os.environ.get("ETHERD_LOCUST_STEPS", "20"))
STEP_WAIT = float(os.environ.get("ETHERD_LOCUST_STEP_WAIT", "0.25"))
CHURN = float(os.environ.get("ETHERD_LOCUST_CHURN", "0"))
PING_EVERY_S = 5.0
# A followed task that shows nothing for this long (its harness failed) is left.
FOLLOW_IDLE_S = 30.0
CHURN_PERIOD_S = 60.0
FINAL_EVENTS = frozenset({"task.delivered", "task.failed"})
LIVE_STATUSES = frozenset({"queued", "running"})
STEP_PREFIX = "t="


def token_subject(token: str) -> str:
    """The ``sub`` of a JWT (unverified: only to name the activity topic); ``dev`` for ``test``."""
    parts = token.split(".")
    if len(parts) != 3:
        return "dev"
    padded = parts[1] + "=" * (-len(parts[1]) % 4)
    claims = json.loads(base64.urlsafe_b64decode(padded))
    return str(claims["sub"])


OWNER = os.environ.get("ETHERD_LOCUST_OWNER") or token_subject(TOKEN)
ACTIVITY_TOPIC = f"activity/{OWNER}"


def ws_url(host: str) -> str:
    """``http://h:p`` -> ``ws://h:p/api/realtime?token=...``."""
    parts = urlsplit(host)
    scheme = "wss" if parts.scheme == "https" else "ws"
    return f"{scheme}://{parts.netloc}/api/realtime?token={quote(TOKEN, safe='')}"


class Dropped(Exception):
    """The connection closed or failed; the reader reconnects and resumes."""


class OffsetError(Exception):
    """An event arrived out of order: a gap or a duplicate on one topic."""


class CommandError(Exception):
    """The server answered a command with an ``error`` reply."""


class ResumeError(Exception):
    """The server could not replay what was missed (``recovered: false``)."""


class Subscriber(User):
    """A person watching their activity list and the task that is running (see the module)."""

    weight = 9
    wait_time = constant(PING_EVERY_S)

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        self.ws: websocket.WebSocket | None = None
        self.reader: Any = None
        self.stopping = False
        self.epoch: str | None = None
        # Per topic: the newest offset seen (resume position and order check).
        self.last: dict[str, int] = {}
        # Per topic: the newest offset when the current subscription was acknowledged;
        # events at or below it came from a replay.
        self.head: dict[str, int] = {}
        # Per topic: offset to resume after when no event was seen (the last ack's head).
        self.acked: dict[str, int] = {}
        self.task_topic: str | None = None
        self.task_seen = 0.0  # time.monotonic() of the followed task's last event
        self.ping_sent: dict[int, float] = {}
        self.next_id = 0
        self.next_churn = time.monotonic() + random.uniform(0, CHURN_PERIOD_S)

    # -- reporting ----------------------------------------------------------------------

    def report(self, name: str, ms: float, length: int = 0, exc: Exception | None = None) -> None:
        self.environment.events.request.fire(
            request_type="WS",
            name=name,
            response_time=ms,
            response_length=length,
            exception=exc,
            context={},
        )

    # -- lifecycle ------------------------------------------------------------------------

    def on_start(self) -> None:
        self.reader = gevent.spawn(self.read_forever)

    def on_stop(self) -> None:
        self.stopping = True
        if self.reader is not None:
            self.reader.kill(block=False)
        self.drop_socket()

    def drop_socket(self) -> None:
        ws, self.ws = self.ws, None
        if ws is not None:
            with contextlib.suppress(Exception):
                ws.shutdown()  # type: ignore[no-untyped-call]

    def send(self, command: dict[str, Any]) -> None:
        if self.ws is None:
            raise Dropped("not connected")
        self.ws.send(json.dumps(command))

    def request_id(self) -> int:
        self.next_id += 1
        return self.next_id

    def connect(self, *, resume: bool) -> None:
        """Open the socket and (re)subscribe; on a resume, from the last offsets seen."""
        name = "resume" if resume else "connect"
        start = time.perf_counter()
        try:
            ws = websocket.create_connection(
                ws_url(self.host or ""),
                timeout=10,
                enable_multithread=True,
                skip_utf8_validation=True,
            )
        except Exception as exc:
            self.report(name, (time.perf_counter() - start) * 1000, 0, exc)
            raise Dropped(str(exc)) from exc
        self.ws = ws
        topics = [ACTIVITY_TOPIC]
        if self.task_topic is not None:
            topics.append(self.task_topic)
        command: dict[str, Any] = {"action": "subscribe", "topics": topics, "id": "connect"}
        since: dict[str, int] = {}
        if resume:
            since = {t: self.last.get(t, self.acked.get(t, 0)) for t in topics}
            command["since"] = since
            if self.epoch is not None:
                command["epoch"] = self.epoch
        ws.send(json.dumps(command))
        # The reply arrives before any replayed event; live events may come first.
        while True:
            opcode, raw = ws.recv_data()
            if opcode != websocket.ABNF.OPCODE_TEXT:
                self.report(name, (time.perf_counter() - start) * 1000, 0, Dropped("closed"))
                raise Dropped("closed while subscribing")
            message = json.loads(raw)
            if message.get("type") == "subscribed" and message.get("id") == "connect":
                break
            self.on_message(message, len(raw))
        ws.settimeout(None)
        failed = self.on_subscribed(message, since)
        self.report(name, (time.perf_counter() - start) * 1000, len(raw), failed)

    def on_subscribed(self, reply: dict[str, Any], since: dict[str, int]) -> Exception | None:
        """Record where each topic stands; the error to report when a resume was not whole.

        ``since`` holds the resume positions sent (empty for a fresh subscribe).
        """
        lost = []
        for ack in reply["topics"]:
            topic = ack["topic"]
            self.epoch = ack["epoch"]
            self.head[topic] = ack["offset"]
            self.acked[topic] = ack["offset"]
            if topic not in since:
                # Live from about now: the order check starts at the first event.
                self.last.pop(topic, None)
            elif ack["recovered"]:
                # The replay starts right after the position: check from there.
                self.last[topic] = since[topic]
            else:
                # Nothing is replayed then: continue from the acknowledged head.
                lost.append(topic)
                self.last[topic] = ack["offset"]
        lost.extend(f"{e['topic']} refused: {e['code']}" for e in reply.get("errors", []))
        return ResumeError(", ".join(lost)) if lost else None

    # -- the reader greenlet ----------------------------------------------------------------

    def read_forever(self) -> None:
        """Connect, read until the connection drops, resume; until the user stops."""
        backoff = 0.5
        connected_once = False
        while not self.stopping:
            try:
                self.connect(resume=connected_once)
            except Exception:
                self.drop_socket()
                gevent.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            connected_once = True
            backoff = 0.5
            try:
                self.read_until_dropped()
            except (Dropped, OSError, websocket.WebSocketException):
                pass  # the connection went away: resume
            except Exception as exc:
                # A bug in this file, not the server's doing: show it, then resume.
                self.report("reader", 0, 0, exc)
            self.drop_socket()

    def read_until_dropped(self) -> None:
        ws = self.ws
        if ws is None:
            raise Dropped("not connected")
        while True:
            opcode, raw = ws.recv_data()
            if opcode != websocket.ABNF.OPCODE_TEXT:
                raise Dropped(f"opcode {opcode}")
            self.on_message(json.loads(raw), len(raw))

    def on_message(self, message: dict[str, Any], length: int) -> None:
        kind = message.get("type")
        if kind == "pong":
            sent = self.ping_sent.pop(message.get("id", -1), None)
            if sent is not None:
                self.report("ping", (time.perf_counter() - sent) * 1000, length)
            return
        if kind == "subscribed":
            current = self.task_topic
            if message.get("id") == "follow" and current is not None:
                # Only the ack of the task followed now (an older follow may answer late).
                acks = [a for a in message["topics"] if a["topic"] == current]
                failed = self.on_subscribed(
                    {"topics": acks, "errors": message.get("errors", [])}, {current: 0}
                )
                if failed is not None:
                    self.report("follow", 0, length, failed)
            return
        if kind == "error":
            self.report("command", 0, length, CommandError(f"{message}"))
            return
        topic = message.get("topic")
        offset = message.get("offset")
        if not isinstance(topic, str) or topic not in (self.task_topic, ACTIVITY_TOPIC):
            return  # an unsubscribed reply, or an event in flight when its task was left
        if isinstance(offset, int):
            self.check_order(topic, offset)
        if topic == self.task_topic:
            self.task_seen = time.monotonic()
        if kind == "os.harness.step":
            self.on_step(message, topic, offset, length)
        elif kind == "activity.list_updated":
            self.on_activity(message)
        elif kind in FINAL_EVENTS and topic == self.task_topic:
            self.unfollow()

    def check_order(self, topic: str, offset: int) -> None:
        last = self.last.get(topic)
        self.last[topic] = max(offset, last or 0)
        if last is None or offset == last + 1:
            return
        what = "duplicate" if offset <= last else "gap"
        self.report("offset order", 0, 0, OffsetError(f"{what} on {topic}: {last} -> {offset}"))

    def on_step(self, message: dict[str, Any], topic: str, offset: int | None, length: int) -> None:
        text = message.get("user_message", "")
        if not text.startswith(STEP_PREFIX):
            return
        sent_ns = int(text[len(STEP_PREFIX) :].split(" ", 1)[0])
        ms = (time.time_ns() - sent_ns) / 1e6
        replayed = offset is not None and offset <= self.head.get(topic, 0)
        self.report("replayed step" if replayed else "event latency", ms, length)

    def on_activity(self, message: dict[str, Any]) -> None:
        if self.task_topic is None and message.get("status") in LIVE_STATUSES:
            self.follow(f"tasks/{message['task_id']}")
        elif message.get("status") not in LIVE_STATUSES and (
            self.task_topic == f"tasks/{message.get('task_id')}"
        ):
            self.unfollow()

    def follow(self, topic: str) -> None:
        """Open a task page: replay the task's events from the start, then live."""
        self.task_topic = topic
        self.task_seen = time.monotonic()
        self.last[topic] = 0
        self.send({"action": "subscribe", "topics": [topic], "since": {topic: 0}, "id": "follow"})

    def unfollow(self) -> None:
        topic, self.task_topic = self.task_topic, None
        if topic is None:
            return
        for table in (self.last, self.head, self.acked):
            table.pop(topic, None)
        with contextlib.suppress(Exception):  # if the send fails the reader resumes without it
            self.send({"action": "unsubscribe", "topics": [topic]})

    # -- the task loop: pings and churn -----------------------------------------------------

    @task
    def ping_or_churn(self) -> None:
        if self.ws is None:
            return
        now = time.monotonic()
        if self.task_topic is not None and now - self.task_seen > FOLLOW_IDLE_S:
            self.unfollow()
        if CHURN > 0 and now >= self.next_churn:
            self.next_churn += CHURN_PERIOD_S
            if random.random() < CHURN:
                # A clean close; the reader sees the server's echo and resumes.
                try:
                    self.ws.send_close()
                except Exception:
                    self.drop_socket()
                return
        rid = self.request_id()
        self.ping_sent[rid] = time.perf_counter()
        try:
            self.send({"action": "ping", "id": rid})
        except Exception:
            self.ping_sent.pop(rid, None)


class Harness(FastHttpUser):
    """An agent harness: create, claim, ``STEPS`` steps, result (see the module)."""

    weight = 1
    wait_time = between(0.5, 1.5)

    @task
    def run_one_task(self) -> None:
        user = {"Authorization": f"Bearer {TOKEN}"}
        harness = {"Authorization": f"Bearer {HARNESS_TOKEN}", "X-Ether-Harness-App": HARNESS_APP}
        with self.client.post(
            "/api/tasks",
            json={"prompt": f"locust task from {id(self):x}", "title": "locust"},
            headers=user,
            name="POST /api/tasks",
            catch_response=True,
        ) as r:
            if r.status_code != 201:
                r.failure(f"create: {r.status_code} {r.text}")
                return
            task_id = r.json()["id"]
        base = f"/api/harness/tasks/{task_id}"
        with self.client.post(
            f"{base}/claim",
            json={},
            headers=harness,
            name="POST /api/harness/tasks/[id]/claim",
            catch_response=True,
        ) as r:
            if r.status_code != 200:
                r.failure(f"claim: {r.status_code} {r.text}")
                return
            run_id = r.json()["run_id"]
        for i in range(STEPS):
            gevent.sleep(STEP_WAIT)
            body = {
                "run_id": run_id,
                "phase": "locust",
                "user_message": f"{STEP_PREFIX}{time.time_ns()} step {i + 1} of {STEPS}",
                "internal_label": "",
            }
            self.client.post(
                f"{base}/steps",
                json=body,
                headers=harness,
                name="POST /api/harness/tasks/[id]/steps",
            )
        self.client.post(
            f"{base}/result",
            json={"run_id": run_id, "status": "submitted", "agent_status": "done"},
            headers=harness,
            name="POST /api/harness/tasks/[id]/result",
        )


@events.test_start.add_listener  # type: ignore[untyped-decorator]
def _announce(environment: Environment, **_: Any) -> None:
    print(
        f"etherd locust: owner {OWNER!r}, {STEPS} steps {STEP_WAIT}s apart, churn {CHURN:.0%}/min"
    )
