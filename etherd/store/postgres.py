"""The production store: PostgreSQL through an asyncpg pool; several etherd processes may
share one database.

A commit is one transaction that, for the whole batch:

0. locks the batch's task rows, ids in sorted order: first every id a write creates is
   claimed with a placeholder row (version 0; ``INSERT .. ON CONFLICT DO NOTHING``, which
   waits for another transaction inserting the same id and skips it if that one commits),
   then ``SELECT .. FOR UPDATE`` locks every existing row and reads its version. From here
   on no other transaction can change these rows, so whether each write's task change
   applies is decided in Python, in write order (a later write of the batch sees the
   version an earlier one stored), and a conflicting write is just refused: no statement
   fails, so the transaction and the rest of the batch go on. The final rows are stored
   with one ``UPDATE`` (placeholders included) and unused placeholders are deleted, so a
   placeholder is never committed;
1. claims the batch's idempotency keys (``INSERT .. ON CONFLICT DO NOTHING``, keys in
   sorted order): a key another transaction holds makes this one wait for it, and a key
   already committed is reported as taken, with its stored answer;
2. raises every topic's head by the batch's event count in one ``INSERT .. ON CONFLICT DO
   UPDATE .. RETURNING`` over the topics in sorted order, which locks those
   ``topic_heads`` rows until the commit: another process writing the same topic waits and
   then continues from the new head, so offsets are unique and gap-free. The same statement
   reads the server clock after the locks are held, so times follow offsets;
3. copies the events in with binary COPY and stores the idempotency answers.

Locks are always taken in the same order (tasks, then keys, then topics, each sorted), so
two commits cannot deadlock; a deadlock or serialization failure reported anyway is retried.
Durability is PostgreSQL's (``synchronous_commit`` as configured on the server; the
default, ``on``, waits for the WAL flush).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, TypeAlias
from urllib.parse import parse_qs, urlsplit

import asyncpg
import asyncpg.exceptions as pgerr

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

__all__ = ["PostgresStore"]

log = logging.getLogger("etherd.store")

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    Conn: TypeAlias = PoolConnectionProxy[asyncpg.Record]

# Longest a statement may run before the connection is treated as lost.
COMMAND_TIMEOUT_S = 30.0
# A commit that hits a deadlock or serialization failure is tried this many times in all.
COMMIT_ATTEMPTS = 5

EVENT_COLUMNS = ("topic", "offset", "ts_ms", "event", "data")

# Errors that mean "the server is not there (any more)", not "this statement is wrong".
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    pgerr.PostgresConnectionError,  # class 08, ConnectionDoesNotExistError among them
    pgerr.CannotConnectNowError,  # starting up, shutting down
    pgerr.AdminShutdownError,
    pgerr.CrashShutdownError,
    pgerr.TooManyConnectionsError,
    pgerr.ReadOnlySQLTransactionError,  # a standby after a failover
)

# Placeholders for the ids the batch creates; the ids inserted are returned.
_CLAIM_TASKS = """
INSERT INTO tasks (id, owner, status, created_ms, updated_ms, version, data)
SELECT i, '', '', 0, 0, 0, ''::bytea FROM unnest($1::text[]) AS u(i)
ORDER BY i
ON CONFLICT (id) DO NOTHING
RETURNING id
"""

# Placeholders (version 0) included: they are locked already, by this transaction.
_LOCK_TASKS = """
SELECT id, version FROM tasks WHERE id = ANY($1::text[]) ORDER BY id FOR UPDATE
"""

_STORE_TASKS = """
UPDATE tasks AS t SET owner = u.o, status = u.st, created_ms = u.c, updated_ms = u.up,
    lease_expires_ms = u.l, holder = u.h, version = u.v, data = u.d
FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bigint[], $6::bigint[],
            $7::text[], $8::bigint[], $9::bytea[], $10::bigint[])
    AS u(i, o, st, c, up, l, h, v, d, e)
WHERE t.id = u.i AND t.version = u.e
"""

_DROP_PLACEHOLDERS = """
DELETE FROM tasks WHERE id = ANY($1::text[]) AND version = 0
"""

_LIST_TASKS = """
SELECT data FROM tasks WHERE owner = $1 ORDER BY updated_ms DESC, id DESC LIMIT $2
"""

_LIST_TASKS_BEFORE = """
SELECT data FROM tasks WHERE owner = $1 AND (updated_ms, id) < ($2, $3)
ORDER BY updated_ms DESC, id DESC LIMIT $4
"""

_CLAIMABLE = """
SELECT data FROM tasks WHERE status = 'queued' ORDER BY updated_ms, id LIMIT $1
"""

_CLAIMABLE_OF = """
SELECT data FROM tasks WHERE status = 'queued' AND owner = $1 ORDER BY updated_ms, id LIMIT $2
"""

_EXPIRED = """
SELECT data FROM tasks
WHERE status IN ('running', 'interrupted')
  AND lease_expires_ms IS NOT NULL AND lease_expires_ms <= $1
ORDER BY lease_expires_ms, id LIMIT $2
"""

_CLAIM_KEYS = """
INSERT INTO idempotency (scope, key, fingerprint, status, body, created_ms)
SELECT s, k, f, 0, ''::bytea, $4
FROM unnest($1::text[], $2::text[], $3::text[]) AS u(s, k, f)
ORDER BY s, k
ON CONFLICT (scope, key) DO NOTHING
RETURNING scope, key
"""

_TAKEN_KEYS = """
SELECT i.scope, i.key, i.fingerprint, i.status, i.body
FROM idempotency AS i JOIN unnest($1::text[], $2::text[]) AS u(s, k)
  ON i.scope = u.s AND i.key = u.k
"""

_RAISE_HEADS = """
INSERT INTO topic_heads AS h (topic, head)
SELECT t, n FROM unnest($1::text[], $2::bigint[]) AS u(t, n)
ORDER BY t
ON CONFLICT (topic) DO UPDATE SET head = h.head + excluded.head
RETURNING h.topic, h.head, floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint
"""

_LOWER_HEADS = """
UPDATE topic_heads AS h SET head = h.head - u.n
FROM unnest($1::text[], $2::bigint[]) AS u(t, n)
WHERE h.topic = u.t
"""

_STORE_ANSWERS = """
UPDATE idempotency AS i SET fingerprint = u.f, status = u.st, body = u.b
FROM unnest($1::text[], $2::text[], $3::text[], $4::int[], $5::bytea[]) AS u(s, k, f, st, b)
WHERE i.scope = u.s AND i.key = u.k
"""

_DROP_CLAIMS = """
DELETE FROM idempotency AS i USING unnest($1::text[], $2::text[]) AS u(s, k)
WHERE i.scope = u.s AND i.key = u.k
"""

# One statement, hence one snapshot: the events, the oldest retained offset and the head.
_READ = """
SELECT b.head, b.first, e."offset", e.ts_ms, e.event, e.data
FROM (SELECT (SELECT head FROM topic_heads WHERE topic = $1) AS head,
             (SELECT min("offset") FROM events WHERE topic = $1) AS first) AS b
LEFT JOIN LATERAL (
    SELECT "offset", ts_ms, event, data FROM events
    WHERE topic = $1 AND "offset" > $2 ORDER BY "offset" LIMIT $3
) AS e ON true
"""
# A replay page: the bounds, then the events stepped through a cursor (see ``read``).
_BOUNDS = """
SELECT (SELECT head FROM topic_heads WHERE topic = $1),
       (SELECT min("offset") FROM events WHERE topic = $1)
"""
_EVENTS = """
SELECT "offset", ts_ms, event, data FROM events
WHERE topic = $1 AND "offset" > $2 ORDER BY "offset" LIMIT $3
"""
# Rows a replay page's cursor fetches at a time: events can be large (up to the body cap).
_PAGE_PREFETCH = 16

_SPANS = """
SELECT h.topic, h.head, f."offset", f.ts_ms
FROM topic_heads AS h
CROSS JOIN LATERAL (
    SELECT "offset", ts_ms FROM events AS e
    WHERE e.topic = h.topic ORDER BY "offset" LIMIT 1
) AS f
WHERE starts_with(h.topic, $1)
"""


class _Retry(Exception):
    """The commit raced with another in a way that a fresh attempt resolves."""


def location(dsn: str) -> str:
    """Where a DSN points, without credentials, for messages."""
    parts = urlsplit(dsn)
    host = parts.hostname or ",".join(parse_qs(parts.query).get("host", [])) or "localhost"
    port = f":{parts.port}" if parts.port else ""
    for value in parse_qs(parts.query).get("port", []):
        port = f":{value}"
    return f"{host}{port}{parts.path or '/'}"


async def _keep_session(con: asyncpg.Connection[asyncpg.Record]) -> None:
    """The pool's ``reset``: nothing to undo on a connection going back to the pool.

    asyncpg's default reset (``pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL``)
    costs one more round trip on every release. etherd never changes session state on a
    pooled connection: it does not LISTEN, SET session settings, take session-level
    advisory locks (the migration lock is transaction-scoped) or open cursors outside a
    transaction, and every transaction ends with its ``async with``. asyncpg still rolls
    back a transaction left open and drops listeners before calling this. Code that does
    change session state on a pooled connection must reset it itself before releasing it.
    """


# Errors that end a leader session (it is simply dropped and made again).
_LEADER_LOST: tuple[type[BaseException], ...] = (*_UNAVAILABLE, asyncpg.InterfaceError)


def _deleted(status: str) -> int:
    """The row count of a ``DELETE n`` (or ``UPDATE n``) command status."""
    return int(status.rsplit(" ", 1)[-1])


class PostgresStore(Store):
    def __init__(self, dsn: str, config: StoreConfig) -> None:
        super().__init__(config)
        self.dsn = dsn
        self.where = location(dsn)
        self._pool: asyncpg.Pool[asyncpg.Record] | None = None
        # The session holding the advisory locks of ``lead``: a lock lives as long as it.
        self._leader: asyncpg.Connection[asyncpg.Record] | None = None
        self._held: set[int] = set()

    # -- connections -----------------------------------------------------------------------

    async def _get_pool(self) -> asyncpg.Pool[asyncpg.Record]:
        """The pool, created on first use and again if it was closed.

        Connections are made lazily (``min_size=0``) and a broken one is dropped when it is
        released, so after an outage the next acquire simply connects again.
        """
        if self._pool is None or self._pool.is_closing():
            self._pool = await asyncpg.create_pool(
                self.dsn,
                min_size=0,
                max_size=self.config.pool_size,
                timeout=self.config.connect_timeout_s,
                command_timeout=COMMAND_TIMEOUT_S,
                # No reset query on release: etherd keeps no session state (see _keep_session).
                reset=_keep_session,
            )
        return self._pool

    @contextlib.asynccontextmanager
    async def _conn(self) -> AsyncIterator[Conn]:
        """A pooled connection; losing the server raises ``StoreUnavailable``."""
        try:
            pool = await self._get_pool()
            # No timeout on waiting for a free connection: a busy pool is not an outage.
            # Connecting is bounded by connect_timeout_s and statements by COMMAND_TIMEOUT_S.
            async with pool.acquire() as con:
                yield con
        except _UNAVAILABLE as exc:
            raise self._unavailable(exc) from exc
        except asyncpg.InterfaceError as exc:
            # "connection is closed", "pool is closing"; not the client-side subclasses
            # (bad arguments, unsupported features), which are bugs.
            if type(exc) is not asyncpg.InterfaceError:
                raise
            raise self._unavailable(exc) from exc

    def _unavailable(self, exc: BaseException) -> StoreUnavailable:
        reason = str(exc) or type(exc).__name__
        return StoreUnavailable(f"PostgreSQL at {self.where} is unavailable: {reason}")

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        async with self._conn() as con:
            if self.config.migrate_on_start:
                self.migrated = await migrate.migrate_postgres(con)
            version = await migrate.postgres_version(con)
            latest = migrate.latest_version("postgres")
            if version < latest:
                raise StoreUnavailable(
                    f"the PostgreSQL database at {self.where} has schema version {version} "
                    f"but this etherd needs {latest}: run `etherd migrate` or set "
                    "store.migrate_on_start"
                )
            await con.execute(
                "INSERT INTO meta (key, value) VALUES ('epoch', $1) ON CONFLICT (key) DO NOTHING",
                new_epoch(),
            )
            self.epoch = str(await con.fetchval("SELECT value FROM meta WHERE key = 'epoch'"))

    async def lead(self, duty: int) -> bool:
        try:
            if self._leader is None or self._leader.is_closed():
                self._held.clear()
                self._leader = await asyncpg.connect(
                    self.dsn, timeout=self.config.connect_timeout_s
                )
            if duty in self._held:
                # Still ours while the session answers.
                await self._leader.fetchval("SELECT 1", timeout=self.config.connect_timeout_s)
                return True
            got = await self._leader.fetchval(
                "SELECT pg_try_advisory_lock($1)", duty, timeout=self.config.connect_timeout_s
            )
        except _LEADER_LOST as exc:
            log.debug("leadership check failed: %s", exc)
            await self.resign()
            return False
        if got:
            self._held.add(duty)
        return bool(got)

    async def resign(self) -> None:
        leader, self._leader = self._leader, None
        self._held.clear()
        if leader is not None and not leader.is_closed():
            try:
                await asyncio.wait_for(leader.close(), self.config.connect_timeout_s)
            except _LEADER_LOST:
                leader.terminate()

    async def close(self) -> None:
        await self.resign()
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), self.config.connect_timeout_s)
        except TimeoutError:
            pool.terminate()

    async def ping(self) -> None:
        async with self._conn() as con:
            await con.fetchval("SELECT 1", timeout=self.config.connect_timeout_s)

    # -- writes ----------------------------------------------------------------------------

    async def commit(self, writes: Sequence[Write]) -> list[list[StoredEvent] | BaseException]:
        if not writes:
            return []
        for attempt in range(1, COMMIT_ATTEMPTS + 1):
            try:
                async with self._conn() as con, con.transaction():
                    return await self._commit(con, writes)
            except (pgerr.DeadlockDetectedError, pgerr.SerializationError, _Retry):
                if attempt == COMMIT_ATTEMPTS:
                    raise
                log.info("commit of %d writes raced another commit; retrying", len(writes))
        raise AssertionError("unreachable")

    async def _commit(
        self, con: Conn, writes: Sequence[Write]
    ) -> list[list[StoredEvent] | BaseException]:
        # Task rows: placeholders for creates, then a lock on every row (see the module
        # docstring). ``versions`` holds the committed rows only (not the placeholders).
        ids = task_ids(writes)
        versions: dict[str, int] = {}
        placeholders: list[str] = []
        if ids:
            creates = task_ids(writes, creates=True)
            if creates:
                placeholders = [r[0] for r in await con.fetch(_CLAIM_TASKS, creates)]
            locked = await con.fetch(_LOCK_TASKS, ids)
            versions = {r[0]: r[1] for r in locked if r[1] != 0}

        keys = idempotency_keys(writes)
        claimed: set[tuple[str, str]] = set()
        taken: dict[tuple[str, str], IdempotentAnswer] = {}
        if keys:
            scopes = [k[0] for k in keys]
            names = [k[1] for k in keys]
            rows = await con.fetch(
                _CLAIM_KEYS, scopes, names, [k[2] for k in keys], time.time_ns() // 1_000_000
            )
            claimed = {(r[0], r[1]) for r in rows}
            if len(claimed) < len(keys):
                for r in await con.fetch(_TAKEN_KEYS, scopes, names):
                    if (r[0], r[1]) not in claimed:
                        taken[(r[0], r[1])] = IdempotentAnswer(r[2], r[3], r[4])
                if len(claimed) + len(taken) < len(keys):
                    raise _Retry  # a key vanished between the two statements

        counts = topic_counts(writes)
        start: dict[str, int] = {}
        ts_ms = 0
        if counts:
            for topic, head, now_ms in await con.fetch(
                _RAISE_HEADS, list(counts), list(counts.values())
            ):
                start[topic] = head - counts[topic] + 1
                ts_ms = max(ts_ms, now_ms)

        batch = Assigner(start, taken, ts_ms, versions)
        for write in writes:
            batch.add(write)

        if batch.tasks:
            t = list(batch.tasks.values())
            status = await con.execute(
                _STORE_TASKS,
                [x.id for x in t],
                [x.owner for x in t],
                [x.status for x in t],
                [x.created_ms for x in t],
                [x.updated_ms for x in t],
                [x.lease_expires_ms for x in t],
                [x.holder for x in t],
                [x.version for x in t],
                [x.data for x in t],
                [versions.get(x.id, 0) for x in t],
            )
            if _deleted(status) != len(t):
                # Every row is locked (or is our placeholder): this cannot happen.
                raise RuntimeError(f"{len(t) - _deleted(status)} task rows changed mid-commit")
        unused_placeholders = [i for i in placeholders if i not in batch.tasks]
        if unused_placeholders:
            await con.execute(_DROP_PLACEHOLDERS, unused_placeholders)

        unused = batch.unused(counts)
        if unused:
            await con.execute(_LOWER_HEADS, list(unused), list(unused.values()))
        if batch.rows:
            await con.copy_records_to_table("events", records=batch.rows, columns=EVENT_COLUMNS)
        if batch.answers:
            a = batch.answers
            await con.execute(
                _STORE_ANSWERS,
                [x[0] for x in a],
                [x[1] for x in a],
                [x[2] for x in a],
                [x[3] for x in a],
                [x[4] for x in a],
            )
        unanswered = claimed - {(x[0], x[1]) for x in batch.answers}
        if unanswered:
            await con.execute(_DROP_CLAIMS, [k[0] for k in unanswered], [k[1] for k in unanswered])
        return batch.results

    async def reset(self) -> str:
        epoch = new_epoch()
        async with self._conn() as con, con.transaction():
            await con.execute("TRUNCATE events, topic_heads, idempotency, tasks")
            await con.execute("UPDATE meta SET value = $1 WHERE key = 'epoch'", epoch)
        self.epoch = epoch
        return epoch

    # -- reads -----------------------------------------------------------------------------

    async def read(
        self, topic: str, after: int, limit: int, max_bytes: int | None = None
    ) -> Replay:
        if max_bytes is not None:
            return await self._read_page(topic, after, limit, max_bytes)
        async with self._conn() as con:
            rows = await con.fetch(_READ, topic, after, limit)
        head, first = rows[0][0] or 0, rows[0][1] or 0
        events = [StoredEvent(topic, r[2], r[3], r[4], r[5]) for r in rows if r[2] is not None]
        return Replay(events, first, head)

    async def _read_page(self, topic: str, after: int, limit: int, max_bytes: int) -> Replay:
        """Events stepped through a cursor and left once their data passes ``max_bytes``
        (the first always comes): the server reads no further, so a page of a long
        backlog costs its own rows, not every row up to ``limit``."""
        events: list[StoredEvent] = []
        size = 0
        async with self._conn() as con, con.transaction(isolation="repeatable_read", readonly=True):
            # One snapshot for the bounds and the events.
            bounds = await con.fetchrow(_BOUNDS, topic)
            assert bounds is not None
            cursor = con.cursor(_EVENTS, topic, after, limit, prefetch=_PAGE_PREFETCH)
            async for r in cursor:
                events.append(StoredEvent(topic, r[0], r[1], r[2], r[3]))
                size += len(r[3])
                if size >= max_bytes:
                    break
        return Replay(events, bounds[1] or 0, bounds[0] or 0)

    async def head(self, topic: str) -> int:
        async with self._conn() as con:
            head = await con.fetchval("SELECT head FROM topic_heads WHERE topic = $1", topic)
        return int(head or 0)

    async def heads(self, topics: Sequence[str]) -> dict[str, int]:
        async with self._conn() as con:
            rows = await con.fetch(
                "SELECT topic, head FROM topic_heads WHERE topic = ANY($1::text[])", list(topics)
            )
        return {r[0]: int(r[1]) for r in rows}

    async def idempotent(self, scope: str, key: str) -> IdempotentAnswer | None:
        async with self._conn() as con:
            row = await con.fetchrow(
                "SELECT fingerprint, status, body FROM idempotency WHERE scope = $1 AND key = $2",
                scope,
                key,
            )
        return None if row is None else IdempotentAnswer(row[0], row[1], row[2])

    async def get_task(self, task_id: str) -> bytes | None:
        async with self._conn() as con:
            data: bytes | None = await con.fetchval("SELECT data FROM tasks WHERE id = $1", task_id)
        return data

    async def list_tasks(
        self, owner: str, limit: int, before: tuple[int, str] | None
    ) -> list[bytes]:
        if before is None:
            return await self._datas(_LIST_TASKS, owner, limit)
        return await self._datas(_LIST_TASKS_BEFORE, owner, before[0], before[1], limit)

    async def claimable_tasks(self, limit: int, owner: str | None = None) -> list[bytes]:
        if owner is not None:
            return await self._datas(_CLAIMABLE_OF, owner, limit)
        return await self._datas(_CLAIMABLE, limit)

    async def expired_leases(self, now_ms: int, limit: int) -> list[bytes]:
        return await self._datas(_EXPIRED, now_ms, limit)

    async def task_counts(self) -> dict[str, int]:
        async with self._conn() as con:
            rows = await con.fetch("SELECT status, count(*) FROM tasks GROUP BY status")
        return {str(r[0]): int(r[1]) for r in rows}

    async def _datas(self, sql: str, *args: object) -> list[bytes]:
        """The ``data`` column of every row a task query returns."""
        async with self._conn() as con:
            rows = await con.fetch(sql, *args)
        return [r[0] for r in rows]

    # -- retention -------------------------------------------------------------------------

    async def _spans(self, prefix: str) -> list[TopicSpan]:
        async with self._conn() as con:
            rows = await con.fetch(_SPANS, prefix)
        return [TopicSpan(r[0], r[1], r[2], r[3]) for r in rows]

    async def _first_at_or_after(self, topic: str, ts_ms: int) -> int | None:
        async with self._conn() as con:
            offset = await con.fetchval(
                'SELECT min("offset") FROM events WHERE topic = $1 AND ts_ms >= $2', topic, ts_ms
            )
        return None if offset is None else int(offset)

    async def _delete_range(self, topic: str, lo: int, hi: int) -> int:
        async with self._conn() as con:
            status = await con.execute(
                'DELETE FROM events WHERE topic = $1 AND "offset" BETWEEN $2 AND $3', topic, lo, hi
            )
        return _deleted(status)

    async def _delete_idempotency_before(self, created_ms: int, limit: int) -> int:
        async with self._conn() as con:
            status = await con.execute(
                "DELETE FROM idempotency WHERE ctid = ANY(ARRAY("
                "SELECT ctid FROM idempotency WHERE created_ms < $1 LIMIT $2))",
                created_ms,
                limit,
            )
        return _deleted(status)
