"""Group commit: the asyncio edge between request handlers and the store.

Handlers ``await batcher.submit(write)``. One writer task takes everything queued (up to
``max_rows`` rows) and stores it with one ``store.commit``, so the more requests arrive
while a commit is running, the more share the next one. A submit returns only after its
events are committed; it never reports success for a write that was not stored.

When the store fails (``StoreUnavailable``) the writes of that batch and everything queued
behind it fail with ``StoreUnavailable``, the store is marked down and new submits fail at
once (nothing piles up in memory) while a probe pings the store with backoff (100 ms,
doubling up to ``retry_max_delay_s``). The first answered ping marks it up again.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from typing import NamedTuple

from etherd.core.events import StoredEvent, Write
from etherd.store.base import Store, StoreUnavailable

__all__ = ["Batcher", "Overloaded"]

log = logging.getLogger("etherd.store")

FIRST_RETRY_DELAY_S = 0.1


class Overloaded(Exception):
    """Too many rows are waiting for a commit; the caller should answer 503 and retry later."""


class _Pending(NamedTuple):
    write: Write
    future: asyncio.Future[list[StoredEvent]]
    rows: int
    queued_at: float


class Batcher:
    """Group commit of ``Write`` values into one ``Store``.

    Counters (plain ints and floats, for metrics): ``batches``, ``rows``,
    ``last_batch_rows``, ``commit_seconds_total``, ``errors`` (failed commits).
    ``on_commit(seconds, rows)`` is called after every successful commit.
    ``on_committed(events)`` receives each committed write's events, in commit order, before
    any submitter resumes: fan-out goes through it so subscribers see events in offset order
    and as soon as they are durable, even if the submitter has gone away.
    """

    def __init__(
        self,
        store: Store,
        *,
        max_rows: int,
        max_delay_ms: float,
        queue_max_rows: int,
        retry_max_delay_s: float,
        on_commit: Callable[[float, int], None] | None = None,
        on_committed: Callable[[list[StoredEvent]], object] | None = None,
    ) -> None:
        self.store = store
        self.max_rows = max_rows
        self.max_delay_s = max_delay_ms / 1000
        self.queue_max_rows = queue_max_rows
        self.retry_max_delay_s = retry_max_delay_s
        self.on_commit = on_commit
        self.on_committed = on_committed

        self.batches = 0
        self.rows = 0
        self.last_batch_rows = 0
        self.commit_seconds_total = 0.0
        self.errors = 0

        self._queue: collections.deque[_Pending] = collections.deque()
        self._queued_rows = 0
        self._wakeup = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._probe: asyncio.Task[None] | None = None
        self._down: StoreUnavailable | None = None
        self._closing = False

    @property
    def is_up(self) -> bool:
        """False from a failed commit until the store answers a ping again."""
        return self._down is None

    @property
    def queued_rows(self) -> int:
        """Rows submitted and not yet taken by a commit."""
        return self._queued_rows

    def start(self) -> None:
        """Start the writer task (on the running loop)."""
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(
                self._run(), name="etherd-store-batcher"
            )

    async def submit(self, write: Write) -> list[StoredEvent]:
        """Store one write with the next group commit; return its stored events.

        Equivalent to awaiting ``enqueue(write)``.

        Raises:
            Overloaded: the queue already holds ``queue_max_rows`` rows.
            StoreUnavailable: the store is down (known, or found during this commit), or
                the batcher is stopping. Nothing of the write was stored.
            TaskConflict: the write's task row is no longer at ``expected_version`` (or,
                for a create, already exists). Nothing of the write was stored.
            IdempotencyConflict: the write's idempotency key was already used.
            Anything else the store refused this write alone with (e.g. what ``respond``
            raised); the rest of its batch was stored.
        """
        return await self.enqueue(write)

    def enqueue(self, write: Write) -> asyncio.Future[list[StoredEvent]]:
        """Queue one write for the next group commit, now; the future is its outcome.

        Writes are committed in the order they were queued. Raises at once (nothing is
        queued) what ``submit`` raises before a commit: ``StoreUnavailable`` and
        ``Overloaded``; the rest comes through the future.
        """
        if self._down is not None:
            raise StoreUnavailable(str(self._down))
        if self._closing or self._writer is None:
            raise StoreUnavailable("the event log is not accepting writes (writer not running)")
        rows = max(1, len(write.events))
        # A write larger than the whole queue is still taken when the queue is empty.
        if self._queued_rows and self._queued_rows + rows > self.queue_max_rows:
            raise Overloaded(
                f"{self._queued_rows} rows are waiting for a commit (limit "
                f"store.queue_max_rows = {self.queue_max_rows}); retry shortly"
            )
        future: asyncio.Future[list[StoredEvent]] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(write, future, rows, time.monotonic()))
        self._queued_rows += rows
        self._wakeup.set()
        return future

    async def drain(self) -> None:
        """Commit everything queued, then stop. New submits fail from now on."""
        self._closing = True
        self._wakeup.set()
        if self._writer is not None:
            await self._writer
        if self._probe is not None:
            self._probe.cancel()
            await asyncio.gather(self._probe, return_exceptions=True)
            self._probe = None

    # -- writer ------------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self.max_delay_s > 0 and not self._closing:
                await self._wait_for_batch()
            batch = self._take()
            if batch:
                await self._commit(batch)

    async def _wait_for_batch(self) -> None:
        """Wait until ``max_rows`` rows are queued or the oldest is ``max_delay_ms`` old."""
        while self._queue and self._queued_rows < self.max_rows and not self._closing:
            left = self._queue[0].queued_at + self.max_delay_s - time.monotonic()
            if left <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), left)
            except TimeoutError:
                return

    def _take(self) -> list[_Pending]:
        """Up to ``max_rows`` rows from the queue (at least one write), skipping writes
        whose submitter gave up (cancelled) before the commit started."""
        batch: list[_Pending] = []
        rows = 0
        while self._queue:
            item = self._queue[0]
            if batch and rows + item.rows > self.max_rows:
                break
            self._queue.popleft()
            self._queued_rows -= item.rows
            if item.future.done():
                continue
            batch.append(item)
            rows += item.rows
        return batch

    async def _commit(self, batch: list[_Pending]) -> None:
        writes = [p.write for p in batch]
        started = time.perf_counter()
        try:
            results = await self.store.commit(writes)
        except asyncio.CancelledError:
            self._fail(batch, StoreUnavailable("the event log writer was stopped"))
            raise
        except StoreUnavailable as exc:
            self.errors += 1
            self._fail(batch, exc)
            self._mark_down(exc)
            return
        except Exception as exc:
            # A bug or a database error that is not an outage: this batch fails, the
            # next one is tried normally.
            self.errors += 1
            log.exception("commit of %d writes failed", len(writes))
            self._fail(batch, exc)
            return
        seconds = time.perf_counter() - started
        rows = sum(p.rows for p in batch)
        self.batches += 1
        self.rows += rows
        self.last_batch_rows = rows
        self.commit_seconds_total += seconds
        if self.on_commit is not None:
            self.on_commit(seconds, rows)
        if self.on_committed is not None:
            for result in results:
                if not isinstance(result, BaseException):
                    self.on_committed(result)
        for item, result in zip(batch, results, strict=True):
            if item.future.done():
                continue
            if isinstance(result, BaseException):
                item.future.set_exception(result)
            else:
                item.future.set_result(result)

    @staticmethod
    def _fail(batch: list[_Pending], exc: Exception) -> None:
        for item in batch:
            if not item.future.done():
                item.future.set_exception(exc)

    # -- outage ------------------------------------------------------------------------------

    def _mark_down(self, exc: StoreUnavailable) -> None:
        """Fail everything queued and probe the store until it answers again."""
        self._down = exc
        queued = list(self._queue)
        self._queue.clear()
        self._queued_rows = 0
        self._fail(queued, exc)
        log.warning("event log store is down: %s", exc)
        if self._probe is None and not self._closing:
            self._probe = asyncio.get_running_loop().create_task(
                self._probe_until_up(), name="etherd-store-probe"
            )

    async def _probe_until_up(self) -> None:
        delay = FIRST_RETRY_DELAY_S
        try:
            while True:
                await asyncio.sleep(delay)
                try:
                    await self.store.ping()
                except StoreUnavailable as exc:
                    self._down = exc
                    delay = min(delay * 2, self.retry_max_delay_s)
                    continue
                except Exception as exc:
                    log.warning("store ping failed unexpectedly: %r", exc)
                    delay = min(delay * 2, self.retry_max_delay_s)
                    continue
                self._down = None
                log.warning("event log store is up again")
                return
        finally:
            self._probe = None
