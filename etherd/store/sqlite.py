"""The embedded store: one SQLite file in WAL mode, used when no PostgreSQL URL is set.

All writes run on one dedicated writer thread with its own connection; reads run on a
second thread with another connection, so a replay never waits for a commit (WAL readers
see the last committed state). The event loop only hands work to these threads.

Durability: ``synchronous=FULL``. In WAL mode every commit then waits for the WAL to reach
the disk, so a 2xx answer survives a power loss or a kernel crash, not only a killed
process (with ``NORMAL`` a killed process loses nothing either, but a power loss can drop
the last commits). Group commit keeps the cost of that sync low: one sync per batch.

Writers serialise with ``BEGIN IMMEDIATE``, so even two processes on one file assign
offsets one after the other, and a commit's check of a task row's version and its change of
that row cannot be interleaved with another commit.
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from etherd.core.config import StoreConfig
from etherd.core.events import IdempotentAnswer, Replay, StoredEvent, Write
from etherd.store import migrate
from etherd.store.base import (
    Assigner,
    Store,
    StoreUnavailable,
    TopicSpan,
    idempotency_keys,
    new_epoch,
    task_ids,
    topic_counts,
)

__all__ = ["SqliteStore"]

T = TypeVar("T")

_READ_EVENTS = (
    'SELECT "offset", ts_ms, event, data FROM events '
    'WHERE topic = ? AND "offset" > ? ORDER BY "offset" LIMIT ?'
)
_READ_BOUNDS = (
    "SELECT (SELECT head FROM topic_heads WHERE topic = ?1),"
    ' (SELECT min("offset") FROM events WHERE topic = ?1)'
)
_INSERT_TASK = (
    "INSERT INTO tasks (id, owner, status, created_ms, updated_ms, lease_expires_ms, holder,"
    " version, data) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_UPDATE_TASK = (
    "UPDATE tasks SET owner = ?, status = ?, created_ms = ?, updated_ms = ?,"
    " lease_expires_ms = ?, holder = ?, version = ?, data = ? WHERE id = ? AND version = ?"
)
_LIST_TASKS = "SELECT data FROM tasks WHERE owner = ? ORDER BY updated_ms DESC, id DESC LIMIT ?"
_LIST_TASKS_BEFORE = (
    "SELECT data FROM tasks WHERE owner = ?1"
    " AND (updated_ms, id) < (?2, ?3)"
    " ORDER BY updated_ms DESC, id DESC LIMIT ?4"
)
_CLAIMABLE = "SELECT data FROM tasks WHERE status = 'queued' ORDER BY updated_ms, id LIMIT ?"
_CLAIMABLE_OF = (
    "SELECT data FROM tasks WHERE status = 'queued' AND owner = ? ORDER BY updated_ms, id LIMIT ?"
)
_EXPIRED = (
    "SELECT data FROM tasks WHERE status IN ('running', 'interrupted')"
    " AND lease_expires_ms IS NOT NULL AND lease_expires_ms <= ?"
    " ORDER BY lease_expires_ms, id LIMIT ?"
)


def path_of(url: str) -> Path:
    """The database file of a ``sqlite:///path`` URL (relative or, with four slashes, absolute)."""
    prefix = "sqlite:///"
    if not url.startswith(prefix) or len(url) == len(prefix):
        raise ValueError(f"expected sqlite:///path/to/file.db, got {url!r}")
    return Path(url[len(prefix) :])


class SqliteStore(Store):
    def __init__(self, path: str | Path, config: StoreConfig) -> None:
        super().__init__(config)
        self.path = Path(path)
        self._writer: ThreadPoolExecutor | None = None
        self._reader: ThreadPoolExecutor | None = None
        # Each connection is used only on its own thread.
        self._wcon: sqlite3.Connection | None = None
        self._rcon: sqlite3.Connection | None = None
        # Commit times never go backwards, even if the clock does.
        self._last_ts_ms = 0

    # -- threads ---------------------------------------------------------------------------

    async def _on(self, pool: ThreadPoolExecutor | None, fn: Callable[..., T], *args: Any) -> T:
        if pool is None:
            raise StoreUnavailable(f"the SQLite store {self.path} is not open")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(pool, functools.partial(fn, *args))
        except sqlite3.OperationalError as exc:
            raise StoreUnavailable(f"SQLite database {self.path}: {exc}") from exc

    async def _write(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` on the writer thread."""
        return await self._on(self._writer, fn, *args)

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` on the reader thread."""
        return await self._on(self._reader, fn, *args)

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(
            self.path,
            timeout=self.config.connect_timeout_s,
            isolation_level=None,
            check_same_thread=False,
        )
        con.execute("PRAGMA journal_mode = WAL")
        con.execute("PRAGMA synchronous = FULL")
        return con

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreUnavailable(f"cannot create the directory of {self.path}: {exc}") from exc
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="etherd-sqlite-writer")
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="etherd-sqlite-reader")
        try:
            self.epoch, self.migrated = await self._write(self._open_writer)
            await self._read(self._open_reader)
        except BaseException:
            await self.close()
            raise

    def _open_writer(self) -> tuple[str, list[int]]:
        self._wcon = con = self._connect()
        applied: list[int] = []
        if self.config.migrate_on_start:
            applied = migrate.migrate_sqlite(con)
        version, latest = migrate.sqlite_version(con), migrate.latest_version("sqlite")
        if version < latest:
            raise StoreUnavailable(
                f"the SQLite database {self.path} has schema version {version} but this "
                f"etherd needs {latest}: run `etherd migrate` or set store.migrate_on_start"
            )
        con.execute(
            "INSERT INTO meta (key, value) VALUES ('epoch', ?) ON CONFLICT (key) DO NOTHING",
            (new_epoch(),),
        )
        (epoch,) = con.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()
        return str(epoch), applied

    def _open_reader(self) -> None:
        self._rcon = self._connect()

    async def close(self) -> None:
        for pool, attr in ((self._writer, "_wcon"), (self._reader, "_rcon")):
            if pool is None:
                continue
            con: sqlite3.Connection | None = getattr(self, attr)
            if con is not None:
                await asyncio.get_running_loop().run_in_executor(pool, con.close)
                setattr(self, attr, None)
            pool.shutdown(wait=True)
        self._writer = self._reader = None

    # -- writes ----------------------------------------------------------------------------

    async def commit(self, writes: Sequence[Write]) -> list[list[StoredEvent] | BaseException]:
        if not writes:
            return []
        return await self._write(self._commit, list(writes))

    def _commit(self, writes: list[Write]) -> list[list[StoredEvent] | BaseException]:
        con = self._wcon
        assert con is not None
        con.execute("BEGIN IMMEDIATE")
        try:
            versions: dict[str, int] = {}
            for task_id in task_ids(writes):
                row = con.execute("SELECT version FROM tasks WHERE id = ?", (task_id,)).fetchone()
                if row is not None:
                    versions[task_id] = row[0]
            counts = topic_counts(writes)
            start: dict[str, int] = {}
            for topic in counts:
                row = con.execute(
                    "SELECT head FROM topic_heads WHERE topic = ?", (topic,)
                ).fetchone()
                start[topic] = (row[0] if row else 0) + 1
            taken: dict[tuple[str, str], IdempotentAnswer] = {}
            for scope, key, _ in idempotency_keys(writes):
                row = con.execute(
                    "SELECT fingerprint, status, body FROM idempotency WHERE scope = ? AND key = ?",
                    (scope, key),
                ).fetchone()
                if row is not None:
                    taken[(scope, key)] = IdempotentAnswer(row[0], row[1], bytes(row[2]))
            ts_ms = max(self._last_ts_ms, time.time_ns() // 1_000_000)
            batch = Assigner(start, taken, ts_ms, versions)
            for write in writes:
                batch.add(write)
            for task in batch.tasks.values():
                if task.id not in versions:
                    con.execute(
                        _INSERT_TASK,
                        (
                            task.id,
                            task.owner,
                            task.status,
                            task.created_ms,
                            task.updated_ms,
                            task.lease_expires_ms,
                            task.holder,
                            task.version,
                            task.data,
                        ),
                    )
                    continue
                cur = con.execute(
                    _UPDATE_TASK,
                    (
                        task.owner,
                        task.status,
                        task.created_ms,
                        task.updated_ms,
                        task.lease_expires_ms,
                        task.holder,
                        task.version,
                        task.data,
                        task.id,
                        versions[task.id],
                    ),
                )
                if cur.rowcount != 1:  # cannot happen under BEGIN IMMEDIATE
                    raise RuntimeError(f"task {task.id!r} changed during the commit")
            con.executemany(
                'INSERT INTO events (topic, "offset", ts_ms, event, data) VALUES (?, ?, ?, ?, ?)',
                batch.rows,
            )
            con.executemany(
                "INSERT INTO topic_heads (topic, head) VALUES (?, ?) "
                "ON CONFLICT (topic) DO UPDATE SET head = excluded.head",
                [(t, n - 1) for t, n in batch.next.items() if n != start[t]],
            )
            con.executemany(
                "INSERT INTO idempotency (scope, key, fingerprint, status, body, created_ms) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [(*a, ts_ms) for a in batch.answers],
            )
            con.execute("COMMIT")
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            raise
        self._last_ts_ms = ts_ms
        return batch.results

    async def reset(self) -> str:
        self.epoch = await self._write(self._reset)
        return self.epoch

    def _reset(self) -> str:
        con = self._wcon
        assert con is not None
        epoch = new_epoch()
        con.execute("BEGIN IMMEDIATE")
        try:
            con.execute("DELETE FROM events")
            con.execute("DELETE FROM topic_heads")
            con.execute("DELETE FROM idempotency")
            con.execute("DELETE FROM tasks")
            con.execute("UPDATE meta SET value = ? WHERE key = 'epoch'", (epoch,))
            con.execute("COMMIT")
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            raise
        return epoch

    # -- reads -----------------------------------------------------------------------------

    async def read(
        self, topic: str, after: int, limit: int, max_bytes: int | None = None
    ) -> Replay:
        return await self._read(self._read_sync, topic, after, limit, max_bytes)

    def _read_sync(self, topic: str, after: int, limit: int, max_bytes: int | None) -> Replay:
        con = self._rcon
        assert con is not None
        con.execute("BEGIN")  # one snapshot for the events and the bounds
        try:
            cursor = con.execute(_READ_EVENTS, (topic, after, limit))
            if max_bytes is None:
                rows = cursor.fetchall()
            else:
                # Stepped row by row and left once the data passes max_bytes (the first
                # event always comes): SQLite reads no further, so a page of a long
                # backlog costs its own rows, not every row after ``after``.
                rows = []
                size = 0
                for row in cursor:
                    rows.append(row)
                    size += len(row[3])
                    if size >= max_bytes:
                        break
                cursor.close()
            head, first = con.execute(_READ_BOUNDS, (topic,)).fetchone()
        finally:
            con.execute("COMMIT")
        events = [StoredEvent(topic, r[0], r[1], r[2], bytes(r[3])) for r in rows]
        return Replay(events, first or 0, head or 0)

    async def head(self, topic: str) -> int:
        return await self._read(self._head_sync, topic)

    def _head_sync(self, topic: str) -> int:
        assert self._rcon is not None
        row = self._rcon.execute("SELECT head FROM topic_heads WHERE topic = ?", (topic,))
        found = row.fetchone()
        return int(found[0]) if found else 0

    async def heads(self, topics: Sequence[str]) -> dict[str, int]:
        return await self._read(self._heads_sync, list(topics))

    def _heads_sync(self, topics: list[str]) -> dict[str, int]:
        assert self._rcon is not None
        found: dict[str, int] = {}
        # SQLite limits the parameters of one statement: ask in slices.
        for start in range(0, len(topics), 500):
            part = topics[start : start + 500]
            marks = ",".join("?" * len(part))
            sql = f"SELECT topic, head FROM topic_heads WHERE topic IN ({marks})"
            found.update((r[0], int(r[1])) for r in self._rcon.execute(sql, part))
        return found

    async def idempotent(self, scope: str, key: str) -> IdempotentAnswer | None:
        return await self._read(self._idempotent_sync, scope, key)

    def _idempotent_sync(self, scope: str, key: str) -> IdempotentAnswer | None:
        assert self._rcon is not None
        row = self._rcon.execute(
            "SELECT fingerprint, status, body FROM idempotency WHERE scope = ? AND key = ?",
            (scope, key),
        ).fetchone()
        return None if row is None else IdempotentAnswer(row[0], row[1], bytes(row[2]))

    async def get_task(self, task_id: str) -> bytes | None:
        return await self._read(self._get_task_sync, task_id)

    def _get_task_sync(self, task_id: str) -> bytes | None:
        assert self._rcon is not None
        row = self._rcon.execute("SELECT data FROM tasks WHERE id = ?", (task_id,)).fetchone()
        return None if row is None else bytes(row[0])

    async def list_tasks(
        self, owner: str, limit: int, before: tuple[int, str] | None
    ) -> list[bytes]:
        if before is None:
            return await self._read(self._datas, _LIST_TASKS, (owner, limit))
        return await self._read(self._datas, _LIST_TASKS_BEFORE, (owner, *before, limit))

    async def claimable_tasks(self, limit: int, owner: str | None = None) -> list[bytes]:
        if owner is not None:
            return await self._read(self._datas, _CLAIMABLE_OF, (owner, limit))
        return await self._read(self._datas, _CLAIMABLE, (limit,))

    async def expired_leases(self, now_ms: int, limit: int) -> list[bytes]:
        return await self._read(self._datas, _EXPIRED, (now_ms, limit))

    async def task_counts(self) -> dict[str, int]:
        return await self._read(self._counts)

    def _counts(self) -> dict[str, int]:
        assert self._rcon is not None
        rows = self._rcon.execute("SELECT status, count(*) FROM tasks GROUP BY status")
        return {str(status): int(n) for status, n in rows.fetchall()}

    def _datas(self, sql: str, args: tuple[object, ...]) -> list[bytes]:
        """The ``data`` column of every row a task query returns."""
        assert self._rcon is not None
        return [bytes(r[0]) for r in self._rcon.execute(sql, args).fetchall()]

    async def ping(self) -> None:
        await self._read(self._ping_sync)

    def _ping_sync(self) -> None:
        assert self._rcon is not None
        self._rcon.execute("SELECT 1 FROM meta LIMIT 1").fetchall()

    # -- retention -------------------------------------------------------------------------

    async def _spans(self, prefix: str) -> list[TopicSpan]:
        return await self._read(self._spans_sync, prefix)

    def _spans_sync(self, prefix: str) -> list[TopicSpan]:
        assert self._rcon is not None
        rows = self._rcon.execute(
            "SELECT topic, head, first, (SELECT ts_ms FROM events"
            '  WHERE events.topic = h.topic AND events."offset" = h.first) '
            'FROM (SELECT topic, head, (SELECT min("offset") FROM events'
            "  WHERE events.topic = topic_heads.topic) AS first"
            "  FROM topic_heads WHERE substr(topic, 1, length(?1)) = ?1) AS h "
            "WHERE first IS NOT NULL",
            (prefix,),
        ).fetchall()
        return [TopicSpan(*r) for r in rows]

    async def _first_at_or_after(self, topic: str, ts_ms: int) -> int | None:
        return await self._read(self._first_at_or_after_sync, topic, ts_ms)

    def _first_at_or_after_sync(self, topic: str, ts_ms: int) -> int | None:
        assert self._rcon is not None
        (offset,) = self._rcon.execute(
            'SELECT min("offset") FROM events WHERE topic = ? AND ts_ms >= ?', (topic, ts_ms)
        ).fetchone()
        return None if offset is None else int(offset)

    async def _delete_range(self, topic: str, lo: int, hi: int) -> int:
        return await self._write(self._delete_range_sync, topic, lo, hi)

    def _delete_range_sync(self, topic: str, lo: int, hi: int) -> int:
        assert self._wcon is not None
        cur = self._wcon.execute(
            'DELETE FROM events WHERE topic = ? AND "offset" >= ? AND "offset" <= ?',
            (topic, lo, hi),
        )
        return cur.rowcount

    async def _delete_idempotency_before(self, created_ms: int, limit: int) -> int:
        return await self._write(self._delete_idempotency_sync, created_ms, limit)

    def _delete_idempotency_sync(self, created_ms: int, limit: int) -> int:
        assert self._wcon is not None
        cur = self._wcon.execute(
            "DELETE FROM idempotency WHERE rowid IN "
            "(SELECT rowid FROM idempotency WHERE created_ms < ? LIMIT ?)",
            (created_ms, limit),
        )
        return cur.rowcount
