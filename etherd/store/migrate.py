"""Schema migrations: numbered SQL files per dialect, applied in order, each exactly once.

Files live in ``etherd/store/migrations/<dialect>/NNNN_name.sql``. Applied versions are
recorded in ``schema_migrations``. All pending files are applied in one transaction; on
PostgreSQL that transaction first takes an advisory lock, so processes migrating one
database at the same time apply each file once, one after the other. On SQLite the
transaction is ``BEGIN IMMEDIATE``, which serialises writers on the file.
"""

from __future__ import annotations

import re
import sqlite3
import time
from importlib import resources
from typing import TYPE_CHECKING, Literal, NamedTuple, TypeAlias

if TYPE_CHECKING:
    import asyncpg
    from asyncpg.pool import PoolConnectionProxy

    PgConnection: TypeAlias = (
        asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]
    )

__all__ = [
    "Migration",
    "latest_version",
    "load",
    "migrate_postgres",
    "migrate_sqlite",
    "postgres_version",
    "sqlite_version",
]

Dialect = Literal["postgres", "sqlite"]

# pg_advisory_xact_lock key held while migrating ("etherd" in ASCII).
ADVISORY_LOCK_KEY = 0x657468657264

_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")

_CREATE_TABLE = (
    "CREATE TABLE IF NOT EXISTS schema_migrations "
    "(version integer PRIMARY KEY, name text NOT NULL, applied_ms bigint NOT NULL)"
)


class Migration(NamedTuple):
    version: int
    name: str
    sql: str


def load(dialect: Dialect) -> list[Migration]:
    """The migrations shipped for a dialect, by version."""
    folder = resources.files("etherd.store") / "migrations" / dialect
    out: list[Migration] = []
    for entry in folder.iterdir():
        match = _NAME.match(entry.name)
        if match is None:
            continue
        out.append(Migration(int(match.group(1)), entry.name, entry.read_text("utf-8")))
    out.sort()
    versions = [m.version for m in out]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"duplicate migration versions in {dialect} migrations: {versions}")
    return out


def latest_version(dialect: Dialect) -> int:
    """The version the code expects the schema to be at."""
    migrations = load(dialect)
    return migrations[-1].version if migrations else 0


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


async def postgres_version(con: PgConnection) -> int:
    """The newest applied version, 0 for an empty database."""
    exists = await con.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    if not exists:
        return 0
    version = await con.fetchval("SELECT max(version) FROM schema_migrations")
    return int(version or 0)


async def migrate_postgres(con: PgConnection) -> list[int]:
    """Apply pending migrations; return the versions applied now."""
    applied_now: list[int] = []
    async with con.transaction():
        await con.execute("SELECT pg_advisory_xact_lock($1)", ADVISORY_LOCK_KEY)
        await con.execute(_CREATE_TABLE)
        done = {r[0] for r in await con.fetch("SELECT version FROM schema_migrations")}
        for m in load("postgres"):
            if m.version in done:
                continue
            await con.execute(m.sql)
            await con.execute(
                "INSERT INTO schema_migrations (version, name, applied_ms) VALUES ($1, $2, $3)",
                m.version,
                m.name,
                _now_ms(),
            )
            applied_now.append(m.version)
    return applied_now


def sqlite_version(con: sqlite3.Connection) -> int:
    """The newest applied version, 0 for an empty database."""
    row = con.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'"
    ).fetchone()
    if row is None:
        return 0
    (version,) = con.execute("SELECT max(version) FROM schema_migrations").fetchone()
    return int(version or 0)


def migrate_sqlite(con: sqlite3.Connection) -> list[int]:
    """Apply pending migrations; return the versions applied now.

    ``con`` must be in autocommit mode (``isolation_level=None``).
    """
    applied_now: list[int] = []
    con.execute("BEGIN IMMEDIATE")
    try:
        con.execute(_CREATE_TABLE)
        done = {r[0] for r in con.execute("SELECT version FROM schema_migrations")}
        for m in load("sqlite"):
            if m.version in done:
                continue
            for statement in _statements(m.sql):
                con.execute(statement)
            con.execute(
                "INSERT INTO schema_migrations (version, name, applied_ms) VALUES (?, ?, ?)",
                (m.version, m.name, _now_ms()),
            )
            applied_now.append(m.version)
        con.execute("COMMIT")
    except BaseException:
        if con.in_transaction:
            con.execute("ROLLBACK")
        raise
    return applied_now


def _statements(script: str) -> list[str]:
    """Split an SQL script into statements (``executescript`` would commit first)."""
    out: list[str] = []
    buf = ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            out.append(buf.strip())
            buf = ""
    if buf.strip() and not all(
        not part.strip() or part.strip().startswith("--") for part in buf.splitlines()
    ):
        raise ValueError(f"migration ends with an incomplete statement: {buf.strip()[:80]!r}")
    return out
