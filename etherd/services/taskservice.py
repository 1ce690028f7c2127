"""Changing tasks: one path for every change, a row cache in front of the store, and the
lease sweep.

Every change follows one path, ``mutate``: read the task, ``tasks.apply`` the action (pure,
raises the refusal), then commit the new row and its events in ONE write with optimistic
concurrency on the row's version. Task state and event history therefore never disagree,
and a 2xx means both are stored. Two claims racing for one task, on one process or on two
sharing a PostgreSQL database, both read version v; one commit wins, the other gets a
``TaskConflict``, re-reads, and is refused by the table (``already_claimed``).

The read is usually free: each process keeps the last row it committed or read of up to
``tasks.cache_size`` tasks that are not final (least recently used dropped first), and
``mutate`` starts from that row instead of reading the store. The row may be stale when
another process changed the task since, and that is safe because nothing is decided on a
cached row alone: an accepted change still has to pass the commit's version check (a stale
row gets ``TaskConflict``, which drops it and reads the store), and a refusal computed from
a cached row is computed again from a fresh read before it is answered (another process
may have claimed, answered or expired the task meanwhile). Reads for display (``load``)
always go to the store, so they show another process's change at once.

Who may change what is decided by the ``check`` the caller passes; what the change answers
by its ``view`` (both come from the API edge, which owns the response shapes).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Final

import msgspec

from etherd.core.errors import Refusal
from etherd.core.events import Idempotency, IdempotentAnswer, StoredEvent, TaskWrite, Write
from etherd.core.tasks import TERMINAL, Action, Expire, Task, apply
from etherd.services.eventlog import AlreadyAnswered, EventLog, TaskConflict
from etherd.services.state import ServerState
from etherd.services.turns import Turn

__all__ = ["Answer", "TaskCache", "TaskService", "View", "now_ms"]

log = logging.getLogger("etherd.tasks")

TASK_DECODER: Final = msgspec.json.Decoder(Task)
# Optimistic writes retried before answering 409: only a burst of concurrent changes to one
# task exhausts this. A constant, not a limit: no client input can raise the work it bounds.
MAX_ATTEMPTS: Final = 5

# An answer to a change: (HTTP status, JSON body).
Answer = tuple[int, bytes]
View = Callable[[Task], Answer]


def now_ms() -> int:
    """Server time in milliseconds."""
    return int(time.time() * 1000)


class TaskCache:
    """The latest row this process committed or read of recently changed tasks.

    A hint, never the truth: ``mutate`` uses a row from here only where the store's version
    check (or a fresh read) confirms what it decides. Final tasks are not kept (nothing
    changes them any more). A row never replaces a newer one of the same task, so a slow
    read cannot undo what a faster commit put here.
    """

    __slots__ = ("rows", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self.rows: OrderedDict[str, Task] = OrderedDict()

    def get(self, task_id: str) -> Task | None:
        """The cached row of a task, marked as recently used."""
        task = self.rows.get(task_id)
        if task is not None:
            self.rows.move_to_end(task_id)
        return task

    def put(self, task: Task) -> None:
        """Remember a row unless it is final or older than the one held."""
        rows = self.rows
        if task.status in TERMINAL:
            rows.pop(task.id, None)
            return
        held = rows.get(task.id)
        if held is not None and held.version > task.version:
            return
        rows[task.id] = task
        rows.move_to_end(task.id)
        while len(rows) > self.size:
            rows.popitem(last=False)

    def drop(self, task_id: str) -> None:
        """Forget a task's row."""
        self.rows.pop(task_id, None)


def _row(task: Task, expected: int) -> TaskWrite:
    return TaskWrite(
        id=task.id,
        owner=task.owner,
        status=str(task.status),
        created_ms=task.created_ms,
        updated_ms=task.updated_ms,
        lease_expires_ms=task.lease_expires_ms,
        holder=task.holder,
        version=task.version,
        expected_version=expected,
        data=msgspec.json.encode(task),
    )


def _constant(answer: Answer) -> Callable[[list[StoredEvent]], Answer]:
    """The idempotent answer of a task change does not depend on the stored offsets."""

    def respond(_stored: list[StoredEvent]) -> Answer:
        return answer

    return respond


def _no_check(task: Task | None) -> None:
    return None


def _no_view(task: Task) -> Answer:
    # Nobody waits for the sweep's answer.
    return 200, b""


class TaskService:
    """Task changes and reads over the event log (see the module docstring)."""

    def __init__(self, eventlog: EventLog, state: ServerState) -> None:
        self.eventlog = eventlog
        self.state = state
        self.cache = TaskCache(state.config.tasks.cache_size)
        # Tasks by status, refreshed by ``count_forever`` for the metrics; None until then.
        self.counts: dict[str, int] | None = None

    async def load(self, task_id: str) -> Task | None:
        """The stored task, read from the store (never the cache), or None."""
        raw = await self.eventlog.get_task(task_id)
        return None if raw is None else TASK_DECODER.decode(raw)

    async def page(self, owner: str, limit: int, before: tuple[int, str] | None) -> list[Task]:
        """Up to ``limit`` tasks of ``owner``, newest change first."""
        rows = await self.eventlog.list_tasks(owner, limit, before)
        return [TASK_DECODER.decode(row) for row in rows]

    async def claimable(self, limit: int, owner: str | None = None) -> list[Task]:
        """Up to ``limit`` queued tasks (only ``owner``'s when given), oldest change first."""
        rows = await self.eventlog.claimable_tasks(limit, owner)
        return [TASK_DECODER.decode(row) for row in rows]

    async def mutate(
        self,
        task_id: str,
        action: Callable[[], Action],
        check: Callable[[Task | None], None],
        view: View,
        idem: Idempotency | None = None,
        turn: Turn | None = None,
    ) -> Answer | IdempotentAnswer:
        """Apply an action and store the task with its events in one commit.

        ``check`` authorises the caller against the task as read; ``view`` renders the
        answer (also stored under ``idem``, in the same commit). The task is taken from the
        row cache when it is there; a refusal (from ``check`` or ``apply``) computed from a
        cached row is confirmed against a fresh read first. ``turn`` keeps a pipelined
        request's commit in request order (``services.turns``).

        Returns:
            The new answer, or the stored ``IdempotentAnswer`` of an earlier request with
            the same key and body.

        Raises:
            Refusal: the change is refused; nothing was stored.
        """
        if idem is not None:
            earlier = await self.eventlog.replayed(idem)
            if earlier is not None:
                return earlier
        cache = self.cache
        reads = 0
        while reads < MAX_ATTEMPTS:
            task = cache.get(task_id)
            cached = task is not None
            if not cached:
                reads += 1
                task = await self.load(task_id)
                if task is not None:
                    cache.put(task)
            try:
                check(task)
                outcome = apply(task, action())
            except Refusal:
                if not cached:
                    raise
                # Decided on a row another process may have moved on from: ask the store.
                cache.drop(task_id)
                continue
            new = outcome.task
            answer = view(new)
            write = Write(
                outcome.events,
                idem,
                _constant(answer) if idem is not None else None,
                task=_row(new, 0 if task is None else task.version),
            )
            try:
                await self.eventlog.commit(write, turn)
            except TaskConflict:
                cache.drop(task_id)
                continue
            except AlreadyAnswered as exc:
                return exc.answer
            except BaseException:
                # Not stored, or not known whether it was: the next change reads the store.
                cache.drop(task_id)
                raise
            cache.put(new)
            return answer
        raise Refusal("conflict", f"task {task_id} is changing too fast; retry")

    # -- background ------------------------------------------------------------------------

    async def sweep_once(self) -> int:
        """Return tasks whose lease expired to the queue (or end their parked run).

        Returns how many were expired.
        """
        cfg = self.state.config.tasks
        try:
            rows = await self.eventlog.expired_leases(now_ms(), cfg.sweep_batch)
        except Refusal:
            return 0
        done = 0
        for row in rows:
            task = TASK_DECODER.decode(row)
            try:
                await self.mutate(task.id, lambda: Expire(now_ms=now_ms()), _no_check, _no_view)
            except Refusal as exc:
                # Renewed by a heartbeat or claimed meanwhile: nothing to do.
                log.debug("lease sweep skipped %s: %s", task.id, exc.message)
            else:
                done += 1
        return done

    async def sweep_forever(self, leads: Callable[[], bool] = lambda: True) -> None:
        """The lease sweep, every ``tasks.sweep_interval_s``, while ``leads()`` (in a
        cluster only the node leading the cluster-wide duties sweeps)."""
        while True:
            await asyncio.sleep(self.state.config.tasks.sweep_interval_s)
            if leads():
                await self.sweep_once()

    async def count_forever(self) -> None:
        """Refresh ``counts`` (tasks by status) for the metrics; counting runs in the store."""
        while True:
            try:
                self.counts = await self.eventlog.task_counts()
            except Exception as exc:
                log.debug("counting tasks failed: %s", exc)
            await asyncio.sleep(self.state.config.metrics.task_count_interval_s)
