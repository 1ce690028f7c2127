"""A small harness written only against the public Ether contract, as an outside integrator
would write it: the standard library for HTTP and JSON, the ``websockets`` library for the
realtime hub, and nothing from etherd.

What it relies on is what the public documentation and our published contract show:

- ``Authorization: Bearer <token>`` and ``X-Ether-Harness-App: <app id>`` on every harness
  call; ``Idempotency-Key`` on every POST, so a retry after a network error cannot narrate
  twice;
- ``GET /api/harness/tasks/claimable`` and ``POST /api/harness/tasks/{id}/claim``
  (``{"app_id": ...}`` -> ``run_id``, ``lease_expires_at``, ``bundle``); after the claim,
  only the callback URLs of the bundle, used verbatim;
- ``GET /api/realtime/config`` for the WebSocket URL, ``?token=`` on the upgrade, and
  ``{"action": "subscribe", "topics": [websocket_topic]}``;
- the heartbeat tells the answer to a question the run asked (``answer.answer``).

Run it as a program (the environment variables are the ones the public docs use for the
reference harness)::

    ETHER_API_BASE_URL=http://127.0.0.1:8080 ETHER_TOKEN=... ETHER_HARNESS_APP=acme \\
        python outside_harness.py run task_abc --question "PR or push?" --option PR

It prints a JSON summary of the run on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from typing import Any

from websockets.sync.client import ClientConnection, connect

__all__ = ["Harness", "HarnessError", "main", "run"]

RETRIES = 3


class HarnessError(Exception):
    """The API refused a call: HTTP status, error code and message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class Harness:
    """One harness identity (token and app id) talking to one Ether API."""

    def __init__(self, base_url: str, token: str, app_id: str, timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.app_id = app_id
        self.timeout = timeout
        self.run_id: str | None = None
        self.bundle: dict[str, Any] = {}
        # Every event the subscription delivered, in order.
        self.events: list[dict[str, Any]] = []

    # -- transport -------------------------------------------------------------------------

    def _request(self, method: str, url: str, body: Any = None) -> Any:
        headers = {
            "Authorization": f"Bearer {self.token}",
            "X-Ether-Harness-App": self.app_id,
            "Accept": "application/json",
        }
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
            # One key per logical call, reused by its retries.
            headers["Idempotency-Key"] = str(uuid.uuid4())
        for attempt in range(RETRIES):
            request = urllib.request.Request(url, data=data, headers=headers, method=method)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as resp:
                    raw = resp.read()
                    return json.loads(raw) if raw else None
            except urllib.error.HTTPError as exc:
                raw = exc.read()
                try:
                    error = json.loads(raw)["error"]
                    code, message = str(error["code"]), str(error["message"])
                except (ValueError, KeyError, TypeError):
                    code, message = "http_error", raw.decode(errors="replace")[:200]
                if exc.code in (429, 503) and attempt + 1 < RETRIES:
                    time.sleep(0.2 * (attempt + 1))
                    continue
                raise HarnessError(exc.code, code, message) from None
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if attempt + 1 == RETRIES:
                    raise
                time.sleep(0.2 * (attempt + 1))
        raise AssertionError("unreachable")

    def _callback(self, name: str, body: dict[str, Any]) -> Any:
        return self._request("POST", self.bundle["callbacks"][name], body)

    # -- the harness API -------------------------------------------------------------------

    def claimable(self) -> list[dict[str, Any]]:
        answer = self._request("GET", f"{self.base_url}/api/harness/tasks/claimable")
        tasks: list[dict[str, Any]] = answer["tasks"]
        return tasks

    def claim(self, task_id: str) -> dict[str, Any]:
        quoted = urllib.parse.quote(task_id, safe="")
        url = f"{self.base_url}/api/harness/tasks/{quoted}/claim"
        answer = self._request("POST", url, {"app_id": self.app_id})
        self.run_id = answer["run_id"]
        self.bundle = answer["bundle"]
        if self.bundle.get("schema_version") != 2:
            raise RuntimeError(f"unexpected bundle schema {self.bundle.get('schema_version')}")
        return self.bundle

    def heartbeat(self) -> dict[str, Any]:
        answer: dict[str, Any] = self._callback("heartbeat_url", {"run_id": self.run_id})
        return answer

    def step(self, phase: str, user_message: str, internal_label: str = "") -> dict[str, Any]:
        body = {
            "run_id": self.run_id,
            "phase": phase,
            "user_message": user_message,
            "internal_label": internal_label or phase,
        }
        answer: dict[str, Any] = self._callback("report_step_url", body)
        return answer

    def interrupt(self, question: str, options: list[str]) -> dict[str, Any]:
        body = {"run_id": self.run_id, "question": question, "options": options}
        answer: dict[str, Any] = self._callback("interrupt_url", body)
        return answer

    def result(self, status: str, **fields: Any) -> dict[str, Any]:
        answer: dict[str, Any] = self._callback(
            "result_url", {"run_id": self.run_id, "status": status, **fields}
        )
        return answer

    # -- realtime --------------------------------------------------------------------------

    def watch(self) -> ClientConnection:
        """A WebSocket subscribed to the bundle's ``websocket_topic``."""
        config = self._request("GET", f"{self.base_url}/api/realtime/config")
        url = config["websocket_url"] + "?token=" + urllib.parse.quote(self.token, safe="")
        ws = connect(url, open_timeout=self.timeout, proxy=None, legacy=True)
        topic = self.bundle["callbacks"]["websocket_topic"]
        ws.send(json.dumps({"action": "subscribe", "topics": [topic], "id": "watch"}))
        while True:
            reply = json.loads(ws.recv(timeout=self.timeout))
            if reply.get("type") == "subscribed":
                break
        if reply.get("errors"):
            ws.close()
            raise RuntimeError(f"cannot follow {topic}: {reply['errors']}")
        return ws

    def wait_for_answer(self, ws: ClientConnection, timeout: float = 30.0) -> str:
        """Heartbeat while parked until the heartbeat tells the user's answer."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            beat = self.heartbeat()
            if beat.get("answer") and beat.get("status") == "running":
                answer: str = beat["answer"]["answer"]
                return answer
            # The hub announces the answer too (task.resumed): listen until then.
            self.listen(ws, 0.2)
        raise TimeoutError(f"no answer within {timeout} s")

    def listen(self, ws: ClientConnection, timeout: float) -> dict[str, Any] | None:
        """The next event on the subscription (recorded in ``events``), or None."""
        try:
            message: dict[str, Any] = json.loads(ws.recv(timeout=timeout))
        except TimeoutError:
            return None
        if "event" in message:
            self.events.append(message)
        return message

    def narration(self) -> list[str]:
        """The ``user_message`` of every step heard on the subscription."""
        return [e["user_message"] for e in self.events if e["event"] == "os.harness.step"]

    def heard(self, ws: ClientConnection, messages: list[str], timeout: float) -> bool:
        """Whether ``messages`` came back as steps on the subscription, in order."""
        deadline = time.monotonic() + timeout
        while self.narration() != messages and time.monotonic() < deadline:
            self.listen(ws, max(0.01, deadline - time.monotonic()))
        return self.narration() == messages


def run(
    base_url: str,
    token: str,
    app_id: str,
    task_id: str,
    *,
    question: str | None = None,
    options: list[str] | None = None,
    pr: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Claim ``task_id``, narrate, optionally ask, and deliver; a summary of the run."""
    harness = Harness(base_url, token, app_id)
    listed = [t["task_id"] for t in harness.claimable()]
    bundle = harness.claim(task_id)
    narrated: list[str] = []

    def say(message: str, label: str) -> None:
        harness.step("coding_agent", message, label)
        narrated.append(message)

    ws = harness.watch()
    try:
        harness.heartbeat()
        repo = bundle.get("scope", {}).get("repo", "the repository")
        say(f"Reading {repo}…", "read_files")
        say("Planning the change…", "plan")
        answer = None
        if question:
            harness.interrupt(question, options or [])
            answer = harness.wait_for_answer(ws)
            say(f"Going ahead: {answer}", "resume")
        say("Opening the pull request…" if pr else "Checking the result…", "finish")
        fields: dict[str, Any] = {
            "agent_status": f"Opened PR #{pr['number']}" if pr else "Nothing to change",
            "working_summary": "Changed what the prompt asked for.",
        }
        if pr:
            fields["artifact"] = {"pr": pr, "agent_status": fields["agent_status"]}
        final = harness.result("submitted" if pr else "no_changes", **fields)
        heard = harness.heard(ws, narrated, timeout=5.0)
    finally:
        ws.close()
    return {
        "task_id": task_id,
        "was_claimable": task_id in listed,
        "run_id": harness.run_id,
        "narrated": narrated,
        "answer": answer,
        "status": final["status"],
        "heard_own_narration": heard,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    go = sub.add_parser("run", help="claim a task and run it to a result")
    go.add_argument("task_id")
    go.add_argument("--question", help="ask the user this before finishing")
    go.add_argument("--option", action="append", default=[], help="an answer to offer")
    go.add_argument("--pr", help='the pull request to deliver, JSON {"number","branch","url"}')
    args = parser.parse_args(argv)
    try:
        base = os.environ["ETHER_API_BASE_URL"]
        token = os.environ["ETHER_TOKEN"]
    except KeyError as exc:
        parser.error(f"set {exc.args[0]}")
    app_id = os.environ.get("ETHER_HARNESS_APP", "outside-harness")
    try:
        summary = run(
            base,
            token,
            app_id,
            args.task_id,
            question=args.question,
            options=args.option,
            pr=json.loads(args.pr) if args.pr else None,
        )
    except HarnessError as exc:
        print(f"harness: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
