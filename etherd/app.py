"""The running application: the state every edge shares, and request dispatch.

``App`` holds the configuration, the authenticator, the hub, the store and its batcher, the
open sessions and the counters. The HTTP and WebSocket edges call into it; ``server.py``
builds it, starts it and stops it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import TYPE_CHECKING

import msgspec

from etherd.auth import Authenticator, TaskFacts, task_id_of
from etherd.config import Config
from etherd.errors import ApiError
from etherd.eventlog import Replay, StoredEvent, Write
from etherd.http import Handler, Request, Response, Stream, Upgrade, error_response
from etherd.hub import Hub
from etherd.metrics import LabelledRouter, Metrics
from etherd.store import Batcher, Overloaded, Store, StoreUnavailable, open_store

if TYPE_CHECKING:
    from etherd.http import HttpConnection
    from etherd.realtime import Session

__all__ = ["App"]


class _Facts(msgspec.Struct):
    """The two fields of a stored task that topic authorisation needs."""

    owner: str
    holder: str | None = None


_FACTS = msgspec.json.Decoder(_Facts)

log = logging.getLogger("etherd")


class App:
    """Shared state of one etherd process."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.loop = asyncio.get_running_loop()
        self.auth = Authenticator(config.auth, dev=config.dev_auth)
        self.hub = Hub(self.loop.call_soon, config.ws.fanout_slice)
        # A Router that also names the matched route template, for the metrics labels.
        self.router: LabelledRouter[Handler] = LabelledRouter()
        self.store: Store = open_store(config)
        self.batcher = Batcher(
            self.store,
            max_rows=config.store.batch_max_rows,
            max_delay_ms=config.store.batch_max_delay_ms,
            queue_max_rows=config.store.queue_max_rows,
            retry_max_delay_s=config.store.retry_max_delay_s,
            on_committed=self.hub.publish_stored,
        )
        self.sessions: set[Session] = set()
        self.subjects: Counter[str] = Counter()
        self.http_connections: set[HttpConnection] = set()
        self.sse_streams: set[HttpConnection] = set()
        self.inflight = 0
        self.draining = False
        self.started_at = time.time()
        # Counters read by /metrics.
        self.responses: Counter[tuple[str, int]] = Counter()
        self.connections_total = 0
        self.slow_consumer_closes = 0
        self.metrics = Metrics(self)
        self.batcher.on_commit = self.metrics.on_commit

    @property
    def epoch(self) -> str:
        """The event log's epoch (changes only when the log is reset)."""
        return self.store.epoch

    async def start(self) -> None:
        """Open the store and start the batcher."""
        await self.store.open()
        self.batcher.start()

    async def close(self) -> None:
        """Commit what is queued and close the store."""
        await self.batcher.drain()
        await self.store.close()

    # -- requests --------------------------------------------------------------------------

    async def dispatch(self, request: Request) -> Response | Stream | Upgrade:
        """Route a request and turn every refusal into its JSON error response."""
        try:
            handler, params = self.router.resolve(request.method, request.path)
            return await handler(request, params)
        except ApiError as exc:
            headers: tuple[tuple[bytes, bytes], ...] = ()
            if exc.code == "unauthorized":
                headers = ((b"WWW-Authenticate", b'Bearer realm="etherd"'),)
            elif exc.code == "upgrade_required":
                headers = ((b"Upgrade", b"websocket"), (b"Sec-WebSocket-Version", b"13"))
            return error_response(exc, headers)
        except Exception:
            log.exception("%s %s failed", request.method, request.path)
            return error_response(ApiError("internal", "the server failed this request"))

    def count_response(self, request: Request | None, status: int) -> None:
        """Count an answered request for metrics (by route template) and access-log it."""
        self.metrics.response(request, status)

    # -- event log -------------------------------------------------------------------------

    async def commit(self, write: Write) -> list[StoredEvent]:
        """Store events durably (group commit); the batcher fans them out on commit."""
        try:
            return await self.batcher.submit(write)
        except Overloaded:
            raise ApiError("overloaded", "the event log is behind; retry shortly") from None
        except StoreUnavailable as exc:
            raise ApiError("not_ready", f"the event log is unavailable: {exc}") from None

    async def head(self, topic: str) -> int:
        """Newest offset of a topic (0 if never written or the store cannot say)."""
        try:
            return await self.store.head(topic)
        except StoreUnavailable:
            return 0

    async def read(self, topic: str, after: int, limit: int) -> Replay:
        """Retained events of a topic after an offset."""
        try:
            return await self.store.read(topic, after, limit)
        except StoreUnavailable as exc:
            raise ApiError("not_ready", f"the event log is unavailable: {exc}") from None

    async def task_facts(self, topic: str) -> TaskFacts | None:
        """Owner and lease holder of the task behind a ``tasks/{id}`` topic, if any."""
        task_id = task_id_of(topic)
        if task_id is None:
            return None
        try:
            raw = await self.store.get_task(task_id)
        except StoreUnavailable:
            return None
        if raw is None:
            return None
        facts = _FACTS.decode(raw)
        return TaskFacts(owner=facts.owner, holder=facts.holder)

    # -- sessions --------------------------------------------------------------------------

    def session_opened(self, session: Session) -> None:
        """Track an accepted WebSocket session."""
        self.sessions.add(session)
        self.subjects[session.principal.sub] += 1
        self.connections_total += 1

    def session_closed(self, session: Session) -> None:
        """Forget a session (idempotent)."""
        if session in self.sessions:
            self.sessions.discard(session)
            sub = session.principal.sub
            self.subjects[sub] -= 1
            if self.subjects[sub] <= 0:
                del self.subjects[sub]
