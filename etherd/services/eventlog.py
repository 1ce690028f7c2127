"""The durable event log as everything above the store sees it.

``EventLog`` wraps the store and its group-commit batcher behind the few questions the
edges and services ask: commit a write, read a topic after an offset, a topic's head, the
facts topic authorisation needs about a task, the task queries, idempotent answers. It is
the one place where a store outage becomes the ``not_ready`` refusal (503) and a full commit
queue becomes ``overloaded``; nothing above it sees ``StoreUnavailable``.

``resume`` decides what a client resuming a topic gets: the events it missed, or an honest
"not recovered" (never a partial replay reported as complete).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import msgspec

from etherd.core.auth import TaskFacts, task_id_of
from etherd.core.config import RetentionRule
from etherd.core.errors import Refusal
from etherd.core.events import Idempotency, IdempotentAnswer, Replay, StoredEvent, Write
from etherd.services.turns import Turn
from etherd.store import (
    Batcher,
    IdempotencyConflict,
    Overloaded,
    Store,
    StoreUnavailable,
    TaskConflict,
)

__all__ = ["AlreadyAnswered", "EventLog", "Resumed", "TaskConflict", "first_answer"]


class _Facts(msgspec.Struct):
    """The two fields of a stored task that topic authorisation needs."""

    owner: str
    holder: str | None = None


_FACTS = msgspec.json.Decoder(_Facts)


class AlreadyAnswered(Exception):
    """A write's idempotency key was taken by the same request (another process, or an
    earlier write of its batch, committed it first): nothing was stored, and ``answer`` is
    what that request was answered."""

    def __init__(self, answer: IdempotentAnswer) -> None:
        super().__init__("already answered under this Idempotency-Key")
        self.answer = answer


class Resumed(NamedTuple):
    """Where a resumed topic stands and what to replay.

    ``recovered`` is False when the position could not be honoured in full (trimmed by
    retention, another epoch, past the head, or more than the replay cap); ``events`` is
    then empty and ``offset`` is the head the client continues from after reloading state.
    """

    offset: int
    recovered: bool
    events: list[StoredEvent]


def first_answer(answer: IdempotentAnswer, fingerprint: str) -> IdempotentAnswer:
    """The stored answer for a retry of the same request.

    Raises:
        Refusal: ``idempotency_conflict`` when the key was used with another body.
    """
    if answer.fingerprint != fingerprint:
        raise Refusal(
            "idempotency_conflict",
            "this Idempotency-Key was used with a different body; use a new key",
        )
    return answer


def _unavailable(exc: StoreUnavailable) -> Refusal:
    return Refusal("not_ready", f"the event log is unavailable: {exc}")


class EventLog:
    """Commit, read and query the durable log (see the module docstring)."""

    def __init__(self, store: Store, batcher: Batcher) -> None:
        self.store = store
        self.batcher = batcher

    @property
    def epoch(self) -> str:
        """The log's epoch (changes only when the log is reset)."""
        return self.store.epoch

    @property
    def is_up(self) -> bool:
        """False from a failed commit until the store answers again."""
        return self.batcher.is_up

    async def open(self) -> None:
        """Open the store and start the group commit."""
        await self.store.open()
        self.batcher.start()

    async def close(self) -> None:
        """Commit what is queued, then close the store."""
        await self.batcher.drain()
        await self.store.close()

    async def ping(self) -> None:
        """Return when the store answers.

        Raises:
            Refusal: ``not_ready`` when it does not.
        """
        try:
            await self.store.ping()
        except StoreUnavailable as exc:
            raise _unavailable(exc) from None

    async def commit(self, write: Write, turn: Turn | None = None) -> list[StoredEvent]:
        """Store a write durably with the next group commit; returns its stored events.

        With a ``turn``, the write joins the commit queue only after the earlier requests
        of the same connection did (see ``services.turns``), and lets the next one go.

        Raises:
            Refusal: ``overloaded`` when too much is queued, ``not_ready`` when the store
                is down, ``idempotency_conflict`` when the write's key was used with
                another body.
            AlreadyAnswered: the same request (key and body) committed first.
            TaskConflict: the write's task row moved on; nothing was stored.
        """
        try:
            if turn is not None:
                await turn.wait()
                try:
                    future = self.batcher.enqueue(write)
                finally:
                    turn.done()
            else:
                future = self.batcher.enqueue(write)
            return await future
        except IdempotencyConflict as exc:
            idem = write.idempotency
            assert idem is not None
            raise AlreadyAnswered(first_answer(exc.existing, idem.fingerprint)) from None
        except Overloaded:
            raise Refusal("overloaded", "the event log is behind; retry shortly") from None
        except StoreUnavailable as exc:
            raise _unavailable(exc) from None

    async def read(
        self, topic: str, after: int, limit: int, max_bytes: int | None = None
    ) -> Replay:
        """Up to ``limit`` retained events of a topic after an offset (and, with
        ``max_bytes``, about that many bytes of data at most)."""
        try:
            return await self.store.read(topic, after, limit, max_bytes)
        except StoreUnavailable as exc:
            raise _unavailable(exc) from None

    async def head(self, topic: str) -> int:
        """Newest offset of a topic (0 if never written, or while the store cannot say)."""
        try:
            return await self.store.head(topic)
        except StoreUnavailable:
            return 0

    async def heads(self, topics: Sequence[str]) -> dict[str, int]:
        """Newest offsets of many topics (those never written left out; empty while the
        store cannot say)."""
        try:
            return await self.store.heads(topics)
        except StoreUnavailable:
            return {}

    async def resume(
        self, topic: str, after: int, epoch: str | None, max_events: int, page_bytes: int
    ) -> Resumed:
        """What a client that has everything up to ``after`` (in ``epoch``) is missing: the
        decision, and the first page of the replay (about ``page_bytes`` of data; the rest
        is read with ``read`` as the client takes it)."""
        if epoch is not None and epoch != self.epoch:
            return Resumed(await self.head(topic), False, [])
        try:
            replay = await self.read(topic, after, max_events, page_bytes)
        except Refusal:
            return Resumed(after, False, [])
        head = replay.head
        # Offsets of a topic are dense (each commit takes the next ones), so the head says
        # how many events the client is missing without reading them all.
        trimmed = (replay.first > 0 and after < replay.first - 1) or (
            replay.first == 0 and after < head
        )
        too_many = head - after > max_events
        future = after > head
        if trimmed or too_many or future:
            return Resumed(head, False, [])
        return Resumed(head, True, replay.events)

    async def replayed(self, idem: Idempotency) -> IdempotentAnswer | None:
        """The first answer to an earlier request with this key, or None if it is new.

        Raises:
            Refusal: ``idempotency_conflict`` for the same key with another body.
        """
        try:
            answer = await self.store.idempotent(idem.scope, idem.key)
        except StoreUnavailable as exc:
            raise _unavailable(exc) from None
        return None if answer is None else first_answer(answer, idem.fingerprint)

    # -- tasks -----------------------------------------------------------------------------

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

    async def get_task(self, task_id: str) -> bytes | None:
        """The stored task row, or None."""
        try:
            return await self.store.get_task(task_id)
        except StoreUnavailable as exc:
            raise _unavailable(exc) from None

    async def list_tasks(
        self, owner: str, limit: int, before: tuple[int, str] | None
    ) -> list[bytes]:
        """A page of an owner's tasks, newest change first (see ``Store.list_tasks``)."""
        try:
            return await self.store.list_tasks(owner, limit, before)
        except StoreUnavailable as exc:
            raise _unavailable(exc) from None

    async def claimable_tasks(self, limit: int, owner: str | None = None) -> list[bytes]:
        """Queued tasks (only ``owner``'s when given), oldest change first."""
        try:
            return await self.store.claimable_tasks(limit, owner)
        except StoreUnavailable as exc:
            raise _unavailable(exc) from None

    async def expired_leases(self, now_ms: int, limit: int) -> list[bytes]:
        """Running or parked tasks whose lease lapsed, earliest first."""
        try:
            return await self.store.expired_leases(now_ms, limit)
        except StoreUnavailable as exc:
            raise _unavailable(exc) from None

    async def task_counts(self) -> dict[str, int]:
        """Tasks by status."""
        try:
            return await self.store.task_counts()
        except StoreUnavailable as exc:
            raise _unavailable(exc) from None

    async def enforce_retention(self, rules: Sequence[RetentionRule], now_ms: int) -> int:
        """Trim topics per the retention rules; how many events were deleted."""
        try:
            return await self.store.enforce_retention(rules, now_ms)
        except StoreUnavailable as exc:
            raise _unavailable(exc) from None
