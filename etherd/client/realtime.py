"""The realtime side: ``Subscriber`` (events, resumed across drops) and ``RealtimePublisher``
(the WebSocket ``publish`` action).

``Subscriber`` keeps the newest offset it delivered per topic. When the connection drops
(server restart, 1001/1012, 4000, 4008 slow consumer, a network error) it reconnects after
an exponential backoff with jitter and subscribes again with ``since`` those offsets and the
epoch they belong to, so the caller sees every stored event once, in order, with no gap.
When the server cannot honour a resume (``recovered: false``: the events were trimmed, the
log was reset, or too many were missed) the subscriber yields a ``Reset`` for the topic and
goes on from the server's newest offset; the caller should reload that state over HTTP.

Tokens: ``refresh(token)`` replaces the token of the live connection (the ``refresh``
action) and of later reconnects; with a ``token_provider`` the subscriber refreshes by
itself ``refresh_margin_s`` before the token's ``exp``, and after a 4001 close
(token expired) it reconnects with a fresh token.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, Final
from urllib.parse import quote

import msgspec
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from etherd.client.api import backoff_delay, websocket_url
from etherd.client.errors import (
    ApiError,
    SubscriptionRefused,
    TokenExpired,
    TransportError,
    api_error,
)

__all__ = ["Event", "RealtimePublisher", "Reset", "Subscriber", "token_expiry"]

# Close codes after which the client should come back with a fresh token rather than wait.
CLOSE_TOKEN_EXPIRED: Final = 4001
# Answers to the upgrade that no retry will change.
_FATAL_STATUSES: Final = frozenset({400, 401, 403, 404, 426})
_QUEUE_SIZE: Final = 1024


class Event(msgspec.Struct, frozen=True):
    """One event: its envelope fields, and ``data``, the whole message as received."""

    topic: str
    event: str
    offset: int | None
    ts: str
    data: dict[str, Any]


class Reset(msgspec.Struct, frozen=True):
    """A resume the server could not honour: reload the topic's state over HTTP; events
    continue after ``offset``."""

    topic: str
    offset: int
    epoch: str


def token_expiry(token: str) -> float | None:
    """The ``exp`` claim of a JWT (unverified), or None for an opaque token or no ``exp``."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        padded = parts[1] + "=" * (-len(parts[1]) % 4)
        claims = msgspec.json.decode(base64.urlsafe_b64decode(padded))
    except (ValueError, msgspec.DecodeError):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    return float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None


def _is_pattern(topic: str) -> bool:
    return "*" in topic or ">" in topic


class Subscriber:
    """Events of some topics, resumed across drops (see the module docstring).

    ``async with Subscriber(url, token, ["tasks/t1"]) as sub: async for item in sub: ...``
    yields ``Event`` and ``Reset`` items. Fatal problems are raised from the iteration:
    ``Unauthorized`` (token refused), ``SubscriptionRefused`` (a topic refused),
    ``TokenExpired``, and ``TransportError`` when the first connection fails and
    ``retry_first_connect`` is off.
    """

    def __init__(
        self,
        url: str,
        token: str,
        topics: Sequence[str],
        *,
        since: int | Mapping[str, int] | None = None,
        epoch: str | None = None,
        token_provider: Callable[[], Awaitable[str]] | None = None,
        refresh_margin_s: float = 60.0,
        retry_first_connect: bool = False,
        backoff_initial_s: float = 0.1,
        backoff_max_s: float = 10.0,
        open_timeout_s: float = 10.0,
        reply_timeout_s: float = 10.0,
    ) -> None:
        """
        Args:
            url: etherd's URL (``http://h:p``) or its WebSocket endpoint.
            token: the bearer token.
            topics: topics or patterns to follow (patterns resume live only).
            since: resume after this offset (one for every topic, or per topic); 0
                replays everything retained.
            epoch: the epoch ``since`` belongs to, when known.
            token_provider: called for a new token before expiry and after a 4001.
            refresh_margin_s: how long before ``exp`` the provider is asked.
            retry_first_connect: keep trying when the very first connection fails.
            backoff_initial_s, backoff_max_s: the reconnect backoff.
        """
        if not topics:
            raise ValueError("subscribe to at least one topic")
        self.url = websocket_url(url)
        self.token = token
        self.topics = list(dict.fromkeys(topics))
        if isinstance(since, int):
            since = {t: since for t in self.topics if not _is_pattern(t)}
        # Newest offset delivered per topic: where a reconnect resumes.
        self.offsets: dict[str, int] = dict(since or {})
        self.epoch = epoch
        self.token_provider = token_provider
        self.refresh_margin_s = refresh_margin_s
        self.retry_first_connect = retry_first_connect
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.open_timeout_s = open_timeout_s
        self.reply_timeout_s = reply_timeout_s
        # How many times the subscriber connected (1 after the first connection).
        self.connections = 0
        self._queue: asyncio.Queue[Event | Reset | BaseException] = asyncio.Queue(_QUEUE_SIZE)
        self._ws: ClientConnection | None = None
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._ids = 0
        self._runner: asyncio.Task[None] | None = None
        self._closed = False
        self._rng = random.Random()
        self._connected = asyncio.Event()

    async def __aenter__(self) -> Subscriber:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def start(self) -> None:
        """Connect in the background (``async with`` and iterating call it)."""
        if self._runner is None:
            self._runner = asyncio.get_running_loop().create_task(self._run())

    async def __aiter__(self) -> AsyncIterator[Event | Reset]:
        self.start()
        while True:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item

    async def next(self, timeout_s: float | None = None) -> Event | Reset:
        """The next item (or the fatal error), waiting at most ``timeout_s`` seconds."""
        self.start()
        item = await asyncio.wait_for(self._queue.get(), timeout_s)
        if isinstance(item, BaseException):
            raise item
        return item

    async def wait_connected(self, timeout_s: float | None = None) -> None:
        """Wait until the subscription is acknowledged (after a reconnect, too)."""
        self.start()
        await asyncio.wait_for(self._connected.wait(), timeout_s)

    @property
    def closed(self) -> bool:
        """Whether ``close`` was called."""
        return self._closed

    async def close(self) -> None:
        """Close the connection and stop reconnecting."""
        self._closed = True
        runner, self._runner = self._runner, None
        if self._ws is not None:
            await self._ws.close()
        if runner is not None:
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner

    async def refresh(self, token: str) -> float | None:
        """Replace the token of the live connection (and of later reconnects).

        Returns the new token's ``exp`` as the server read it.

        Raises:
            ApiError: the server refused the token; the old one stays in force.
            TransportError: there is no live connection right now.
        """
        reply = await self._request({"action": "refresh", "token": token})
        self.token = token
        exp = reply.get("exp")
        return float(exp) if isinstance(exp, int | float) else None

    # -- the connection loop -----------------------------------------------------------

    async def _request(self, command: dict[str, Any]) -> dict[str, Any]:
        ws = self._ws
        if ws is None:
            raise TransportError("not connected")
        self._ids += 1
        rid = f"c{self._ids}"
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = future
        try:
            await ws.send(msgspec.json.encode({**command, "id": rid}).decode())
            reply = await asyncio.wait_for(future, self.reply_timeout_s)
        except ConnectionClosed:
            raise TransportError("the connection closed before the reply") from None
        finally:
            self._pending.pop(rid, None)
        if reply.get("type") == "error":
            raise ApiError(0, str(reply.get("code", "")), str(reply.get("message", "")))
        return reply

    async def _run(self) -> None:
        attempt = 0
        try:
            while not self._closed:
                try:
                    await self._session()
                    attempt = 0
                except _Retry as retry:
                    if retry.fresh_token:
                        if self.token_provider is None:
                            raise TokenExpired(
                                "the token expired (close 4001) and no token_provider is set"
                            ) from None
                        self.token = await self.token_provider()
                        continue
                if self.closed:
                    break
                await asyncio.sleep(
                    backoff_delay(attempt, self.backoff_initial_s, self.backoff_max_s, self._rng)
                )
                attempt += 1
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            await self._queue.put(exc)

    async def _session(self) -> None:
        """One connection: connect, subscribe, deliver until it drops."""
        url = f"{self.url}?token={quote(self.token, safe='')}"
        try:
            ws = await connect(url, open_timeout=self.open_timeout_s, proxy=None, max_size=None)
        except InvalidStatus as exc:
            status = exc.response.status_code
            error = api_error(status, _json(exc.response.body))
            if status in _FATAL_STATUSES:
                raise error from None
            raise _Retry() from None
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            if self.connections == 0 and not self.retry_first_connect:
                raise TransportError(f"cannot reach {self.url}: {_reason(exc)}") from None
            raise _Retry() from None
        self._ws = ws
        refresher: asyncio.Task[None] | None = None
        try:
            await self._subscribe(ws)
            self.connections += 1
            self._connected.set()
            if self.token_provider is not None:
                refresher = asyncio.get_running_loop().create_task(self._refresh_forever())
            async for raw in ws:
                await self._handle(raw)
        except ConnectionClosed:
            pass
        finally:
            self._connected.clear()
            self._ws = None
            if refresher is not None:
                refresher.cancel()
            # Also when subscribing failed: the socket must not outlive the session.
            with contextlib.suppress(Exception):
                await ws.close()
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(TransportError("the connection dropped"))
        close = ws.protocol.close_rcvd
        if close is not None and close.code == CLOSE_TOKEN_EXPIRED:
            raise _Retry(fresh_token=True)

    async def _subscribe(self, ws: ClientConnection) -> None:
        command: dict[str, Any] = {"action": "subscribe", "topics": self.topics, "id": "sub"}
        since = {t: o for t, o in self.offsets.items() if t in self.topics}
        if since:
            command["since"] = since
            if self.epoch is not None:
                command["epoch"] = self.epoch
        await ws.send(msgspec.json.encode(command).decode())
        while True:
            reply = _json(await asyncio.wait_for(ws.recv(), self.reply_timeout_s))
            if isinstance(reply, dict) and reply.get("type") == "subscribed":
                break
            if isinstance(reply, dict) and reply.get("type") == "error":
                raise api_error(400, {"error": reply})
        errors = reply.get("errors") or []
        if errors:
            raise SubscriptionRefused(list(errors))
        for ack in reply.get("topics", []):
            topic, offset = str(ack["topic"]), int(ack["offset"])
            # The server compares the epoch we sent: another one comes back not recovered.
            epoch = str(ack["epoch"])
            self.epoch = epoch
            if _is_pattern(topic):
                continue
            if not ack.get("recovered", True):
                self.offsets[topic] = offset
                await self._queue.put(Reset(topic, offset, epoch))
            elif topic not in self.offsets:
                self.offsets[topic] = offset

    async def _handle(self, raw: str | bytes) -> None:
        message = _json(raw)
        if not isinstance(message, dict):
            return
        rid = message.get("id")
        if isinstance(rid, str) and rid in self._pending and "event" not in message:
            future = self._pending[rid]
            if not future.done():
                future.set_result(message)
            return
        if "event" not in message or "topic" not in message:
            return
        topic = str(message["topic"])
        offset = message.get("offset")
        if isinstance(offset, int):
            if offset <= self.offsets.get(topic, 0):
                return  # already delivered (belt and braces: the server sends none twice)
            self.offsets[topic] = offset
        await self._queue.put(
            Event(topic, str(message["event"]), offset, str(message.get("ts", "")), message)
        )

    async def _refresh_forever(self) -> None:
        assert self.token_provider is not None
        while True:
            exp = token_expiry(self.token)
            if exp is None:
                return
            await asyncio.sleep(max(0.0, exp - self.refresh_margin_s - time.time()))
            token = await self.token_provider()
            try:
                await self.refresh(token)
            except (ApiError, TransportError):
                await asyncio.sleep(1.0)


class _Retry(Exception):
    def __init__(self, fresh_token: bool = False) -> None:
        super().__init__()
        self.fresh_token = fresh_token


class RealtimePublisher:
    """Publishes over one WebSocket with the ``publish`` action; each ``publish`` returns
    once the event is stored (with its offset), like ``POST /api/publish``.

    The connection is opened on first use and again after a drop. A publish whose
    connection drops before the reply raises ``TransportError``: it may or may not have
    been stored (use ``Client.publish`` with its idempotent retries when that matters).
    """

    def __init__(self, url: str, token: str, *, timeout: float = 10.0) -> None:
        self.url = websocket_url(url)
        self.token = token
        self.timeout = timeout
        self._ws: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._ids = 0
        self._lock = asyncio.Lock()

    async def __aenter__(self) -> RealtimePublisher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _connection(self) -> ClientConnection:
        async with self._lock:
            if self._ws is not None:
                return self._ws
            url = f"{self.url}?token={quote(self.token, safe='')}"
            try:
                ws = await connect(url, open_timeout=self.timeout, proxy=None)
            except InvalidStatus as exc:
                raise api_error(exc.response.status_code, _json(exc.response.body)) from None
            except (OSError, TimeoutError, InvalidHandshake) as exc:
                raise TransportError(f"cannot reach {self.url}: {_reason(exc)}") from None
            self._ws = ws
            self._reader = asyncio.get_running_loop().create_task(self._read(ws))
            return ws

    async def _read(self, ws: ClientConnection) -> None:
        try:
            async for raw in ws:
                message = _json(raw)
                if isinstance(message, dict):
                    future = self._pending.get(str(message.get("id")))
                    if future is not None and not future.done():
                        future.set_result(message)
        except ConnectionClosed:
            pass
        finally:
            if self._ws is ws:
                self._ws = None
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(TransportError("the connection dropped"))

    async def publish(
        self,
        topic: str,
        event: str,
        data: Mapping[str, Any] | None = None,
        *,
        durable: bool = True,
    ) -> int | None:
        """Publish one event; returns its offset (None when not durable).

        Raises:
            ApiError: refused (``forbidden``, ``unprocessable``, ``rate_limited``, ...).
            TransportError: no connection, or it dropped before the reply.
        """
        ws = await self._connection()
        self._ids += 1
        rid = f"p{self._ids}"
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = future
        command = {
            "action": "publish",
            "topic": topic,
            "event": event,
            "data": dict(data or {}),
            "durable": durable,
            "id": rid,
        }
        try:
            await ws.send(msgspec.json.encode(command).decode())
            reply = await asyncio.wait_for(future, self.timeout)
        except ConnectionClosed:
            raise TransportError("the connection closed before the reply") from None
        except TimeoutError:
            raise TransportError(f"no reply within {self.timeout:g} s") from None
        finally:
            self._pending.pop(rid, None)
        if reply.get("type") == "error":
            raise ApiError(0, str(reply.get("code", "")), str(reply.get("message", "")))
        offset = reply.get("offset")
        return offset if isinstance(offset, int) else None

    async def close(self) -> None:
        """Close the connection."""
        ws, self._ws = self._ws, None
        if ws is not None:
            await ws.close()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader


def _json(raw: str | bytes | bytearray | None) -> Any:
    if not raw:
        return None
    try:
        return msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
