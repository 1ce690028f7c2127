"""``Harness`` and ``Run``: the harness side of the task API, with the lease kept for you.

``Harness.claim`` (or ``next_run``, which waits for a claimable task) returns a ``Run``. Use
it as ``async with run:``: while inside, a background task heartbeats often enough to keep
the lease (a third of the lease's length), and learns the user's answer after an
``interrupt``. Every call of a run raises ``LeaseExpired``, ``RunMismatch`` or
``TaskCancelled`` (all ``RunEnded``) once the server says the run is over, whether the
background heartbeat or the call itself heard it first; ``run.ended`` holds that exception.

Every POST goes through ``Client.call``: an ``Idempotency-Key`` per call and retries on
transport errors, 429 and 503, so a retried step is never narrated twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Literal
from urllib.parse import quote

import msgspec

from etherd.client.api import Client
from etherd.client.errors import AlreadyClaimed, RunEnded, TransportError

__all__ = ["Answer", "Harness", "Run"]

ResultStatus = Literal["submitted", "no_changes", "blocked", "failed"]


class Answer(msgspec.Struct, frozen=True):
    """The user's answer to a question the run asked."""

    question: str
    answer: str
    option: str | None = None
    at: str = ""


def _seconds_until(rfc3339: str | None) -> float | None:
    if not rfc3339:
        return None
    at = datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()
    return at - time.time()


class Harness:
    """One harness identity (token and app id) on one etherd."""

    def __init__(
        self,
        url: str,
        token: str,
        app_id: str,
        *,
        client: Client | None = None,
        answer_poll_s: float = 0.5,
    ) -> None:
        """
        Args:
            url: where etherd listens, e.g. ``http://127.0.0.1:8080``.
            token: a ``harness`` (or ``admin``) token, or a user's for its own tasks.
            app_id: sent as ``X-Ether-Harness-App`` and as the claim's ``app_id``.
            client: an existing ``Client`` to use (its token and URL win).
            answer_poll_s: how often a run waiting for an answer heartbeats.
        """
        self.app_id = app_id
        self.client = client or Client(url, token)
        self.client.headers["X-Ether-Harness-App"] = app_id
        self.answer_poll_s = answer_poll_s

    async def __aenter__(self) -> Harness:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the client's connections."""
        await self.client.close()

    async def claimable(self, limit: int = 50) -> list[dict[str, Any]]:
        """Queued tasks, oldest first: ``[{task_id, title, status, created_at, updated_at}]``."""
        page = await self.client.call("GET", "/api/harness/tasks/claimable", query={"limit": limit})
        tasks: list[dict[str, Any]] = page["tasks"]
        return tasks

    async def claim(self, task_id: str) -> Run:
        """Claim a task: a ``Run`` with its ``run_id``, lease and bundle.

        Raises:
            AlreadyClaimed: another run holds it. ``NotFound``, ``ApiError`` as usual.
        """
        answer = await self.client.call("POST", f"{_base(task_id)}/claim", {"app_id": self.app_id})
        return Run(self, task_id, answer)

    async def next_run(self, poll_s: float = 1.0, timeout_s: float | None = None) -> Run:
        """Wait for a claimable task and claim it (skipping tasks another harness won)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            for item in await self.claimable():
                try:
                    return await self.claim(item["task_id"])
                except AlreadyClaimed:
                    continue
            if deadline is not None and time.monotonic() + poll_s > deadline:
                raise TimeoutError(f"no claimable task within {timeout_s:g} s")
            await asyncio.sleep(poll_s)


class Run:
    """One claimed attempt at a task (see the module docstring)."""

    def __init__(self, harness: Harness, task_id: str, claim: Mapping[str, Any]) -> None:
        self.harness = harness
        self.client = harness.client
        self.task_id = task_id
        self.run_id: str = claim["run_id"]
        self.bundle: dict[str, Any] = dict(claim["bundle"])
        self.lease_expires_at: str | None = claim.get("lease_expires_at")
        lease = _seconds_until(self.lease_expires_at)
        # Heartbeat three times per lease, so one lost heartbeat costs nothing.
        self.heartbeat_every_s = max(0.1, (lease or 30.0) / 3)
        # The reason the run is over, once the server said so.
        self.ended: RunEnded | None = None
        self.status: str = "running"
        self._answer: asyncio.Future[Answer] | None = None
        self._ack = False
        self._keeper: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._done = False

    async def __aenter__(self) -> Run:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def start(self) -> None:
        """Start heartbeating in the background."""
        if self._keeper is None and not self._done:
            self._keeper = asyncio.get_running_loop().create_task(self._keep())

    async def stop(self) -> None:
        """Stop heartbeating (the lease then lapses unless a result ended the run)."""
        keeper, self._keeper = self._keeper, None
        if keeper is not None:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper

    # -- calls -------------------------------------------------------------------------

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        if self.ended is not None:
            raise self.ended
        try:
            answer: dict[str, Any] = await self.client.call(
                "POST", f"{_base(self.task_id)}/{path}", {"run_id": self.run_id, **body}
            )
        except RunEnded as exc:
            self._end(exc)
            raise
        return answer

    async def heartbeat(self) -> dict[str, Any]:
        """Extend the lease now: ``{status, lease_expires_at, answer?}``."""
        body: dict[str, Any] = {"answer_seen": True} if self._ack else {}
        beat = await self._post("heartbeat", body)
        if self._ack and "answer" not in beat:
            self._ack = False
        self.status = str(beat.get("status", self.status))
        self.lease_expires_at = beat.get("lease_expires_at", self.lease_expires_at)
        told = beat.get("answer")
        if told is not None and beat.get("status") == "running":
            # Acknowledged on the next heartbeat, so the server stops repeating it.
            self._ack = True
            waiter = self._answer
            if waiter is not None and not waiter.done():
                waiter.set_result(msgspec.convert(told, Answer))
        return beat

    async def step(self, user_message: str, phase: str = "coding_agent", label: str = "") -> None:
        """Report a step (``os.harness.step``); ``label`` is the ``internal_label``."""
        await self._post(
            "steps", {"phase": phase, "user_message": user_message, "internal_label": label}
        )

    async def interrupt(
        self, question: str, options: Sequence[str] = (), timeout_s: float | None = None
    ) -> Answer:
        """Ask the user and wait for the answer (the lease is kept meanwhile).

        Raises:
            TimeoutError: no answer within ``timeout_s`` seconds (the task stays parked).
            RunEnded: the run ended while waiting (cancelled, lease lapsed, ...).
        """
        loop = asyncio.get_running_loop()
        self._answer = loop.create_future()
        await self._post("interrupt", {"question": question, "options": list(options)})
        self.status = "interrupted"
        return await self.wait_for_answer(timeout_s)

    async def wait_for_answer(self, timeout_s: float | None = None) -> Answer:
        """The answer to the question asked last (heartbeating every ``answer_poll_s``)."""
        if self._answer is None:
            self._answer = asyncio.get_running_loop().create_future()
        waiter = self._answer
        owned = self._keeper is None
        if owned:
            self.start()
        self._wake.set()
        try:
            return await asyncio.wait_for(asyncio.shield(waiter), timeout_s)
        finally:
            if waiter.done():
                self._answer = None
            if owned:
                await self.stop()

    async def result(
        self,
        status: ResultStatus,
        *,
        agent_status: str = "",
        artifact: Mapping[str, Any] | None = None,
        working_summary: str | None = None,
        question: str | None = None,
        options: Sequence[str] = (),
        error: str | None = None,
    ) -> dict[str, Any]:
        """Post the result; ``{task_id, status, delivery?}``. The run is over after it."""
        body: dict[str, Any] = {"status": status, "agent_status": agent_status}
        if artifact is not None:
            body["artifact"] = dict(artifact)
        if working_summary is not None:
            body["working_summary"] = working_summary
        if question is not None:
            body["question"] = question
        if options:
            body["options"] = list(options)
        if error is not None:
            body["error"] = error
        answer = await self._post("result", body)
        self._done = True
        self.status = str(answer.get("status", self.status))
        keeper, self._keeper = self._keeper, None
        if keeper is not None and keeper is not asyncio.current_task():
            keeper.cancel()
        return answer

    # -- the lease keeper --------------------------------------------------------------

    @property
    def finished(self) -> bool:
        """Whether a result ended the run."""
        return self._done

    def _end(self, exc: RunEnded) -> None:
        if self.ended is None:
            self.ended = exc
        waiter = self._answer
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    async def _keep(self) -> None:
        while not self._done:
            waiting = self._answer is not None and not self._answer.done()
            interval = self.harness.answer_poll_s if waiting else self.heartbeat_every_s
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), interval)
            if self.finished:
                return
            try:
                await self.heartbeat()
            except RunEnded:
                return  # recorded by _post; every later call raises it
            except TransportError:
                continue  # the client already retried; the next beat may get through


def _base(task_id: str) -> str:
    return f"/api/harness/tasks/{quote(task_id, safe='')}"
