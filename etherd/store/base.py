"""The event log's storage interface, shared by the SQLite and PostgreSQL stores.

A store keeps, per topic, the events with their offsets, the newest offset ever assigned
(``topic_heads``, never lowered by retention), the log's epoch, the answers kept under
idempotency keys and the task rows. Everything a commit writes lands in one transaction: the
events of a whole batch of writes, their offsets, their idempotency answers and their task
rows are stored together or not at all.

Task rows use optimistic concurrency: a write carrying a ``TaskWrite`` is stored only if the
row's version is still the one the change was computed from (or, for a create, the row does
not exist); otherwise that write alone is refused with ``TaskConflict``.

Retention is shared code: each store only answers a few narrow questions (which topics hold
what, where a time cut falls) and deletes ranges of offsets, at most ``RETENTION_BATCH`` rows
per statement so that commits are never held up for long.
"""

from __future__ import annotations

import abc
import secrets
from collections.abc import Sequence
from typing import NamedTuple

from etherd.core.config import RetentionRule, StoreConfig
from etherd.core.events import IdempotentAnswer, Replay, StoredEvent, TaskWrite, Write

__all__ = [
    "IDEMPOTENCY_TTL_MS",
    "RETENTION_BATCH",
    "IdempotencyConflict",
    "Store",
    "StoreUnavailable",
    "TaskConflict",
    "TopicSpan",
]

# Rows deleted per statement (and per transaction) by retention.
RETENTION_BATCH = 5_000
# Idempotency answers are kept this long.
IDEMPOTENCY_TTL_MS = 24 * 3600 * 1000


class StoreUnavailable(Exception):
    """The database cannot be reached or the connection was lost.

    Raised by a commit, nothing of the batch was stored, and the write may be retried. (If
    the connection breaks while the COMMIT itself is in flight the outcome is unknown to the
    client, as with any database; a retry with the same idempotency key is then safe.)
    """


class IdempotencyConflict(Exception):
    """The write's idempotency key was already taken; the write stored nothing.

    This happens when another request with the same key committed first: another etherd
    process, or an earlier write of the same batch. ``existing`` is the answer stored under
    the key. The caller answers with it when ``existing.fingerprint`` equals the write's
    fingerprint (the same request retried) and with 409 ``idempotency_conflict`` otherwise.
    """

    def __init__(self, scope: str, key: str, existing: IdempotentAnswer) -> None:
        super().__init__(
            f"idempotency key {key!r} (scope {scope!r}) is already used by an earlier request"
        )
        self.scope = scope
        self.key = key
        self.existing = existing


class TaskConflict(Exception):
    """The write's task row changed since the write was computed; the write stored nothing.

    Raised for a create (``expected_version`` 0) when the task already exists, and for an
    update when the stored version is not ``expected_version`` or the task does not exist.
    ``current_version`` is the version the row had when the write was refused (``None``: no
    such row). Another process, or an earlier write of the same batch, changed it first; the
    caller re-reads the task and decides again.
    """

    def __init__(self, task_id: str, current_version: int | None) -> None:
        found = "does not exist" if current_version is None else f"is at version {current_version}"
        super().__init__(f"task {task_id!r} {found}: the write was computed from another version")
        self.task_id = task_id
        self.current_version = current_version


class TopicSpan(NamedTuple):
    """What retention needs to know about one topic that still holds events."""

    topic: str
    head: int
    first: int
    first_ts_ms: int


def new_epoch() -> str:
    """A fresh random epoch id."""
    return secrets.token_hex(8)


class Store(abc.ABC):
    """Durable, per-topic, gap-free event log.

    Lifecycle: ``open()`` once, then any of the operations (from one event loop), then
    ``close()``. ``epoch`` is valid after ``open()``.
    """

    epoch: str

    def __init__(self, config: StoreConfig) -> None:
        self.config = config
        self.epoch = ""
        # Migration versions that ``open()`` applied (empty when the schema was current).
        self.migrated: list[int] = []

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect, migrate if ``migrate_on_start``, load or create the epoch.

        Raises:
            StoreUnavailable: the database cannot be reached, or its schema is older than
                this code and migrations are off.
        """

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections and threads. Idempotent."""

    @abc.abstractmethod
    async def commit(self, writes: Sequence[Write]) -> list[list[StoredEvent] | BaseException]:
        """Store a batch of writes in one transaction (group commit).

        Each write gets, in order, the next offsets of its topics (topic head + 1, gap-free
        and unique even with several processes on one database) and the commit's server
        time. A write with an idempotency key also stores ``IdempotentAnswer(fingerprint,
        *write.respond(events))`` in the same transaction.

        A write with a ``task`` stores that row in the same transaction, only if the stored
        version is still ``task.expected_version`` (for 0: the row does not exist yet). The
        checks run in write order: a later write of the batch sees the versions earlier
        writes of the batch stored.

        Returns, per write, its stored events (in the order given) or the exception that
        refused that write alone, checked in this order: ``TaskConflict`` when the task row
        moved on, ``IdempotencyConflict`` when the key is taken, or what ``respond`` raised.
        A refused write stores nothing (no events, no offsets consumed, no answer, no row).
        The other writes of the batch are stored regardless.

        Raises:
            StoreUnavailable: connection lost or database unreachable; nothing was stored.
        """

    @abc.abstractmethod
    async def read(
        self, topic: str, after: int, limit: int, max_bytes: int | None = None
    ) -> Replay:
        """Up to ``limit`` events of ``topic`` with offset > ``after``, oldest first; with
        ``max_bytes``, no more events once their data passes it (but always the first)."""

    @abc.abstractmethod
    async def head(self, topic: str) -> int:
        """The newest offset ever assigned in ``topic``; 0 if it was never written."""

    @abc.abstractmethod
    async def heads(self, topics: Sequence[str]) -> dict[str, int]:
        """The newest offsets of many topics at once; topics never written are left out."""

    @abc.abstractmethod
    async def idempotent(self, scope: str, key: str) -> IdempotentAnswer | None:
        """The answer stored under an idempotency key, if any."""

    @abc.abstractmethod
    async def get_task(self, task_id: str) -> bytes | None:
        """The stored task (its ``TaskWrite.data``), or ``None``."""

    @abc.abstractmethod
    async def list_tasks(
        self, owner: str, limit: int, before: tuple[int, str] | None
    ) -> list[bytes]:
        """Up to ``limit`` tasks of ``owner``, newest change first (``updated_ms``, then
        ``id``, both descending).

        ``before=(updated_ms, id)`` is an exclusive cursor: only tasks that sort after it
        (strictly older, or as old with a smaller id) are listed. Pass the last task of a
        page to get the next page.
        """

    @abc.abstractmethod
    async def claimable_tasks(self, limit: int, owner: str | None = None) -> list[bytes]:
        """Up to ``limit`` tasks with status ``queued``, oldest change first (``updated_ms``,
        then ``id``, both ascending); only ``owner``'s when given."""

    @abc.abstractmethod
    async def expired_leases(self, now_ms: int, limit: int) -> list[bytes]:
        """Up to ``limit`` tasks with status ``running`` or ``interrupted`` whose lease
        expired (``lease_expires_ms <= now_ms``), earliest expiry first (then ``id``)."""

    @abc.abstractmethod
    async def task_counts(self) -> dict[str, int]:
        """How many tasks the store holds in each status (for metrics)."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Return when the database answers; raise ``StoreUnavailable`` otherwise."""

    async def lead(self, duty: int) -> bool:
        """Whether this process holds the cluster-wide lock for ``duty`` (taking it if free).

        Called again and again by the one that wants it; the holder keeps it as long as it
        lives (and its connection does), and it passes to another process within one retry
        when the holder dies. A store only one process uses answers True.
        """
        return True

    async def resign(self) -> None:  # noqa: B027 - nothing to give up by default
        """Give up every lock ``lead`` took (at shutdown)."""

    @abc.abstractmethod
    async def reset(self) -> str:
        """Delete every event, head, idempotency answer and task; start a new epoch and
        return it.

        For tests and administrators. Other processes sharing the database learn the new
        epoch only when they open the store again.
        """

    async def enforce_retention(self, rules: Sequence[RetentionRule], now_ms: int) -> int:
        """Trim the oldest events of topics under each rule; return how many were deleted.

        Every rule whose prefix starts a topic's name applies to it ("" matches all). A rule
        keeps the newest ``max_count`` events (0: no count limit) and the events not older
        than ``max_age_s`` (0: no age limit). Only a prefix of each topic is deleted, so
        offsets stay gap-free and heads are untouched. Idempotency answers older than 24 h
        are deleted too (not counted in the result).
        """
        deleted = 0
        for rule in rules:
            if rule.max_count <= 0 and rule.max_age_s <= 0:
                continue
            age_cut_ms = now_ms - int(rule.max_age_s * 1000) if rule.max_age_s > 0 else None
            for span in await self._spans(rule.prefix):
                upto = 0  # delete offsets first..upto
                if rule.max_count > 0:
                    upto = span.head - rule.max_count
                if age_cut_ms is not None and span.first_ts_ms < age_cut_ms:
                    keep = await self._first_at_or_after(span.topic, age_cut_ms)
                    upto = max(upto, (span.head if keep is None else keep - 1))
                lo = span.first
                while lo <= upto:
                    hi = min(upto, lo + RETENTION_BATCH - 1)
                    deleted += await self._delete_range(span.topic, lo, hi)
                    lo = hi + 1
        cut = now_ms - IDEMPOTENCY_TTL_MS
        while await self._delete_idempotency_before(cut, RETENTION_BATCH) >= RETENTION_BATCH:
            pass
        return deleted

    # Retention primitives, one per store.

    @abc.abstractmethod
    async def _spans(self, prefix: str) -> list[TopicSpan]:
        """Topics starting with ``prefix`` that hold at least one event."""

    @abc.abstractmethod
    async def _first_at_or_after(self, topic: str, ts_ms: int) -> int | None:
        """The smallest offset in ``topic`` whose ``ts_ms`` is at least ``ts_ms``."""

    @abc.abstractmethod
    async def _delete_range(self, topic: str, lo: int, hi: int) -> int:
        """Delete events ``lo <= offset <= hi`` of ``topic`` in one transaction."""

    @abc.abstractmethod
    async def _delete_idempotency_before(self, created_ms: int, limit: int) -> int:
        """Delete at most ``limit`` idempotency answers created before ``created_ms``."""


class Assigner:
    """Task versions, offsets and idempotency answers for one batch, computed in write order.

    Both stores use it inside their transaction: ``versions`` gives the stored version of
    the batch's tasks that exist (read under a lock), ``start`` the next offset per topic
    (head + 1), ``taken`` the answers already stored under the batch's keys. A write whose
    task row moved on (or was changed by an earlier write of the batch) gets
    ``TaskConflict``; a write whose key is taken (or repeats a key of an earlier write in
    the batch) gets ``IdempotencyConflict``; a write whose ``respond`` raises gets that
    exception; none of them consumes offsets or changes a row.

    ``tasks`` ends up holding, per task changed by the batch, its final row (a task changed
    by several writes of the batch is written once); the store inserts it when the id is
    not in ``versions`` (PostgreSQL fills the placeholder it inserted) and otherwise
    updates the row whose version is ``versions[id]``.
    """

    def __init__(
        self,
        start: dict[str, int],
        taken: dict[tuple[str, str], IdempotentAnswer],
        ts_ms: int,
        versions: dict[str, int] | None = None,
    ) -> None:
        self.start = start
        self.next = dict(start)
        self.taken = dict(taken)
        self.ts_ms = ts_ms
        self.versions = dict(versions or {})
        self.current = dict(self.versions)
        self.results: list[list[StoredEvent] | BaseException] = []
        # (topic, offset, ts_ms, event, data) for every stored event, in order.
        self.rows: list[tuple[str, int, int, str, bytes]] = []
        # (scope, key, fingerprint, status, body) for every stored answer.
        self.answers: list[tuple[str, str, str, int, bytes]] = []
        # The final row of every task the batch changes.
        self.tasks: dict[str, TaskWrite] = {}

    def add(self, write: Write) -> None:
        task = write.task
        if task is not None:
            if not 0 <= task.expected_version < task.version:
                self.results.append(
                    ValueError(
                        f"task {task.id!r}: version {task.version} must be greater than "
                        f"expected_version {task.expected_version} (0 or more)"
                    )
                )
                return
            current = self.current.get(task.id)
            if current != (task.expected_version or None):
                self.results.append(TaskConflict(task.id, current))
                return
        idem = write.idempotency
        if idem is not None:
            existing = self.taken.get((idem.scope, idem.key))
            if existing is not None:
                self.results.append(IdempotencyConflict(idem.scope, idem.key, existing))
                return
        stored: list[StoredEvent] = []
        offsets: dict[str, int] = {}
        for ev in write.events:
            offset = offsets.get(ev.topic) or self.next[ev.topic]
            offsets[ev.topic] = offset + 1
            stored.append(StoredEvent(ev.topic, offset, self.ts_ms, ev.event, ev.data))
        if idem is not None:
            try:
                if write.respond is None:
                    raise ValueError("a write with an idempotency key needs a respond callback")
                status, body = write.respond(stored)
            except Exception as exc:
                self.results.append(exc)
                return
            answer = IdempotentAnswer(idem.fingerprint, status, body)
            self.taken[(idem.scope, idem.key)] = answer
            self.answers.append((idem.scope, idem.key, idem.fingerprint, status, body))
        if task is not None:
            self.current[task.id] = task.version
            self.tasks[task.id] = task
        self.next.update(offsets)
        self.rows.extend((e.topic, e.offset, e.ts_ms, e.event, e.data) for e in stored)
        self.results.append(stored)

    def unused(self, counts: dict[str, int]) -> dict[str, int]:
        """Per topic, how many of ``counts`` offsets refused writes did not consume."""
        out: dict[str, int] = {}
        for topic, n in counts.items():
            left = n - (self.next[topic] - self.start[topic])
            if left:
                out[topic] = left
        return out


def topic_counts(writes: Sequence[Write]) -> dict[str, int]:
    """Events per topic over a batch, topics sorted (the order locks are taken in)."""
    counts: dict[str, int] = {}
    for write in writes:
        for ev in write.events:
            counts[ev.topic] = counts.get(ev.topic, 0) + 1
    return dict(sorted(counts.items()))


def task_ids(writes: Sequence[Write], *, creates: bool = False) -> list[str]:
    """Distinct ids of the tasks a batch writes, sorted (the order row locks are taken in).

    With ``creates``, only the ids some write of the batch creates (``expected_version`` 0).
    """
    ids = {
        w.task.id
        for w in writes
        if w.task is not None and (not creates or w.task.expected_version == 0)
    }
    return sorted(ids)


def idempotency_keys(writes: Sequence[Write]) -> list[tuple[str, str, str]]:
    """Distinct (scope, key, fingerprint) of a batch, sorted by (scope, key).

    When the batch repeats a key, the first write's fingerprint is listed.
    """
    keys: dict[tuple[str, str], str] = {}
    for write in writes:
        if write.idempotency is not None:
            i = write.idempotency
            keys.setdefault((i.scope, i.key), i.fingerprint)
    return [(s, k, f) for (s, k), f in sorted(keys.items())]
