"""A small harness for the browser tests: drives tasks over the real HTTP API
(``http.client``, through ``Etherd.request``) the way an agent runner would.
"""

from __future__ import annotations

import time
from typing import Any

from tests.conftest import Etherd

APP_ID = "browser-tests"


def create_task(
    server: Etherd, prompt: str, title: str | None = None, token: str = "test", **fields: Any
) -> dict[str, Any]:
    """``POST /api/tasks``; the created task."""
    body: dict[str, Any] = {"prompt": prompt, **fields}
    if title is not None:
        body["title"] = title
    status, task = server.request("POST", "/api/tasks", body, token=token)
    assert status == 201, task
    result: dict[str, Any] = task
    return result


class Harness:
    """One run of one task: claim, then steps, questions and a result through its callbacks."""

    def __init__(self, server: Etherd, task_id: str, token: str = "test") -> None:
        self.server = server
        self.task_id = task_id
        self.token = token
        self.run_id = ""

    def _post(self, action: str, body: dict[str, Any]) -> dict[str, Any]:
        status, answer = self.server.request(
            "POST",
            f"/api/harness/tasks/{self.task_id}/{action}",
            body,
            token=self.token,
            headers={"X-Ether-Harness-App": APP_ID},
        )
        assert status == 200, (action, status, answer)
        result: dict[str, Any] = answer
        return result

    def claim(self) -> Harness:
        self.run_id = self._post("claim", {"app_id": APP_ID})["run_id"]
        return self

    def step(self, message: str, label: str = "", phase: str = "coding_agent") -> None:
        self._post(
            "steps",
            {
                "run_id": self.run_id,
                "phase": phase,
                "user_message": message,
                "internal_label": label,
            },
        )

    def heartbeat(self) -> dict[str, Any]:
        return self._post("heartbeat", {"run_id": self.run_id})

    def interrupt(self, question: str, options: list[str]) -> None:
        self._post("interrupt", {"run_id": self.run_id, "question": question, "options": options})

    def result(self, status: str, **fields: Any) -> dict[str, Any]:
        return self._post("result", {"run_id": self.run_id, "status": status, **fields})

    def wait_for_answer(self, timeout: float = 15.0) -> dict[str, Any]:
        """Heartbeat, as a parked harness does, until the heartbeat carries the answer."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            beat = self.heartbeat()
            if beat.get("answer") is not None:
                return beat
            time.sleep(0.05)
        raise AssertionError(f"no answer reached the harness of {self.task_id} in {timeout} s")
