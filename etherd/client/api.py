"""``Client``: the HTTP API of one etherd, with retries that cannot do anything twice.

Every POST carries an ``Idempotency-Key`` (one per logical call, reused by its retries), so a
retry after a broken connection or a ``429``/``503`` answer returns the first answer instead
of publishing or narrating twice. Error answers raise the ``ApiError`` subclass of their code.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Final
from urllib.parse import quote, urlencode, urlsplit

import msgspec

from etherd.client.errors import TransportError, api_error
from etherd.client.http import HttpClient

__all__ = ["Client", "Published", "backoff_delay", "http_url", "websocket_url"]

# Answers worth retrying: the server is busy or not ready, nothing was done.
RETRY_STATUSES: Final = frozenset({429, 503})


class Published(msgspec.Struct, frozen=True):
    """One published event: its topic, its name and its offset (None when not durable)."""

    topic: str
    event: str
    offset: int | None = None


class _PublishAnswer(msgspec.Struct):
    published: list[Published]
    epoch: str


def backoff_delay(attempt: int, initial: float, maximum: float, rng: random.Random) -> float:
    """Seconds to wait before retry ``attempt`` (0-based): exponential, capped, with jitter.

    The delay is drawn between half and all of ``min(maximum, initial * 2**attempt)``, so
    clients that lost the server together do not come back together.
    """
    ceiling = min(maximum, initial * (1 << min(attempt, 32)))
    return ceiling * (0.5 + rng.random() / 2)


def websocket_url(url: str) -> str:
    """The WebSocket endpoint for an etherd URL: ``http://h:p`` -> ``ws://h:p/api/realtime``.

    A ``ws://`` or ``wss://`` URL is taken as it is (``/api/realtime`` added when it has no
    path).
    """
    parts = urlsplit(url)
    if parts.scheme in ("ws", "wss"):
        if parts.path not in ("", "/"):
            return url
        return f"{parts.scheme}://{parts.netloc}/api/realtime"
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"expected an http(s):// or ws(s):// URL, got {url!r}")
    scheme = "wss" if parts.scheme == "https" else "ws"
    return f"{scheme}://{parts.netloc}/api/realtime"


def http_url(url: str) -> str:
    """The HTTP origin for an etherd URL (a ``ws://`` URL maps back to ``http://``)."""
    parts = urlsplit(url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    return f"{scheme}://{parts.netloc}"


class Client:
    """The HTTP API of one etherd, for one token.

    Use it as ``async with Client(url, token) as client:`` or call ``close()``.
    """

    def __init__(
        self,
        url: str,
        token: str,
        *,
        timeout: float = 10.0,
        retries: int = 3,
        retry_initial_s: float = 0.2,
        retry_max_s: float = 5.0,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """
        Args:
            url: where etherd listens, e.g. ``http://127.0.0.1:8080``.
            token: the bearer token.
            timeout: seconds for connecting and for each answer.
            retries: further attempts after a transport error or a 429/503 answer.
            retry_initial_s, retry_max_s: the backoff between attempts.
            headers: sent with every request (e.g. ``X-Ether-Harness-App``).
        """
        self.url = http_url(url)
        self.token = token
        self.retries = retries
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self.headers = dict(headers or {})
        self._http = HttpClient(self.url, timeout=timeout)
        self._rng = random.Random()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the kept connections."""
        await self._http.close()

    async def call(
        self,
        method: str,
        path: str,
        body: object = None,
        *,
        query: Mapping[str, str | int | None] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        """One API call; returns the decoded JSON answer.

        POSTs get an ``Idempotency-Key`` unless ``headers`` has one, so retries are safe.

        Raises:
            ApiError: the server refused (the subclass of its code).
            TransportError: the server could not be reached, also after the retries.
        """
        if query:
            pairs = {k: str(v) for k, v in query.items() if v is not None}
            if pairs:
                path = f"{path}?{urlencode(pairs)}"
        sent = {"Authorization": f"Bearer {self.token}", **self.headers, **(headers or {})}
        data: bytes | None = None
        if body is not None:
            data = msgspec.json.encode(body)
            sent["Content-Type"] = "application/json"
        if method == "POST" and not any(k.lower() == "idempotency-key" for k in sent):
            sent["Idempotency-Key"] = uuid.uuid4().hex
        attempt = 0
        while True:
            try:
                response = await self._http.request(method, path, body=data, headers=sent)
            except TransportError:
                if attempt >= self.retries:
                    raise
            else:
                if response.status < 400:
                    return response.json()
                if response.status not in RETRY_STATUSES or attempt >= self.retries:
                    raise api_error(response.status, response.json())
            await asyncio.sleep(
                backoff_delay(attempt, self.retry_initial_s, self.retry_max_s, self._rng)
            )
            attempt += 1

    # -- publishing --------------------------------------------------------------------

    async def publish(
        self,
        topic: str,
        event: str,
        data: Mapping[str, Any] | None = None,
        *,
        durable: bool = True,
    ) -> Published:
        """``POST /api/publish`` one event; returns it with its offset once it is stored."""
        body = {"topic": topic, "event": event, "data": dict(data or {}), "durable": durable}
        answer = msgspec.convert(await self.call("POST", "/api/publish", body), _PublishAnswer)
        return answer.published[0]

    async def publish_many(self, events: Sequence[Mapping[str, Any]]) -> list[Published]:
        """``POST /api/publish`` a batch (``{"topic", "event", "data", "durable"}`` each),
        committed together; returns them with their offsets, in order."""
        answer = await self.call("POST", "/api/publish", {"events": [dict(e) for e in events]})
        return msgspec.convert(answer, _PublishAnswer).published

    # -- tasks (product API) -----------------------------------------------------------

    async def create_task(
        self,
        prompt: str,
        *,
        title: str | None = None,
        definition_of_done: str | None = None,
        scope: Mapping[str, Any] | None = None,
        context_refs: Sequence[Any] | None = None,
        owner: str | None = None,
    ) -> dict[str, Any]:
        """``POST /api/tasks``: the new task (its ``task_id``, ``status`` ``queued``, ...)."""
        optional = {
            "title": title,
            "definition_of_done": definition_of_done,
            "scope": dict(scope) if scope is not None else None,
            "context_refs": list(context_refs) if context_refs is not None else None,
            "owner": owner,
        }
        body = {"prompt": prompt, **{k: v for k, v in optional.items() if v is not None}}
        task: dict[str, Any] = await self.call("POST", "/api/tasks", body)
        return task

    async def task(self, task_id: str) -> dict[str, Any]:
        """``GET /api/tasks/{id}``: the task as a page shows it."""
        task: dict[str, Any] = await self.call("GET", f"/api/tasks/{_seg(task_id)}")
        return task

    async def tasks(self, *, limit: int = 50, cursor: str | None = None) -> dict[str, Any]:
        """``GET /api/activity``: the caller's tasks, newest change first
        (``{"tasks": [...], "next_cursor": ...}``)."""
        page: dict[str, Any] = await self.call(
            "GET", "/api/activity", query={"limit": limit, "cursor": cursor}
        )
        return page

    async def answer(self, task_id: str, answer: str, option: str | None = None) -> dict[str, Any]:
        """``POST /api/tasks/{id}/answer``: answer the pending question; the task after it."""
        body: dict[str, Any] = {"answer": answer}
        if option is not None:
            body["option"] = option
        task: dict[str, Any] = await self.call("POST", f"/api/tasks/{_seg(task_id)}/answer", body)
        return task

    async def cancel(self, task_id: str) -> dict[str, Any]:
        """``POST /api/tasks/{id}/cancel``: the task after it (``status`` ``cancelled``)."""
        task: dict[str, Any] = await self.call("POST", f"/api/tasks/{_seg(task_id)}/cancel", {})
        return task

    async def timeline(self, task_id: str, *, since: int = 0, limit: int = 100) -> dict[str, Any]:
        """``GET /api/tasks/{id}/timeline``: ``{"entries": [...], "next": offset}``."""
        page: dict[str, Any] = await self.call(
            "GET",
            f"/api/tasks/{_seg(task_id)}/timeline",
            query={"since": since, "limit": limit},
        )
        return page


def _seg(value: str) -> str:
    """A path segment, quoted."""
    return quote(value, safe="")
