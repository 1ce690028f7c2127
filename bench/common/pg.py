"""PostgreSQL for the benchmarks: a fresh database per run, and throwaway clusters.

A *server URL* names a server without a database: ``postgresql://postgres@127.0.0.1:5432``
or a unix-socket form such as ``postgresql://postgres@/postgres?host=DIR&port=P`` (its
path is replaced). The throwaway cluster comes from ``tests/pgcluster.py``, so the tests
and the benchmarks start PostgreSQL one way.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Final
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg

LOCAL_SERVER: Final = "postgresql://postgres@127.0.0.1:5432"
SETTINGS: Final = (
    "fsync",
    "synchronous_commit",
    "shared_buffers",
    "wal_sync_method",
    "commit_delay",
    "max_wal_size",
)


def database_url(server: str, database: str) -> str:
    """``server`` with its database (the URL path) set to ``database``."""
    parts = urlsplit(server)
    return urlunsplit(parts._replace(path="/" + quote(database)))


def _check_name(database: str) -> str:
    if not re.fullmatch(r"[a-z_][a-z0-9_]*", database):
        raise ValueError(f"not a plain database name: {database!r}")
    return database


async def _admin(server: str, *sql: str) -> None:
    con = await asyncpg.connect(database_url(server, "postgres"), timeout=10)
    try:
        for statement in sql:
            await con.execute(statement)
    finally:
        await con.close()


def fresh_database(server: str, database: str) -> str:
    """Drop and create ``database`` on ``server``; its URL."""
    name = _check_name(database)
    asyncio.run(
        _admin(server, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)", f"CREATE DATABASE {name}")
    )
    return database_url(server, name)


def drop_database(server: str, database: str) -> None:
    """Drop ``database`` if it exists, disconnecting its sessions."""
    asyncio.run(_admin(server, f"DROP DATABASE IF EXISTS {_check_name(database)} WITH (FORCE)"))


async def _version(server: str) -> str:
    con = await asyncpg.connect(database_url(server, "postgres"), timeout=10)
    try:
        version: str = await con.fetchval("SHOW server_version")
        rows = await con.fetch(
            "SELECT name, setting, unit FROM pg_settings WHERE name = ANY($1::text[])"
            " ORDER BY name",
            list(SETTINGS),
        )
    finally:
        await con.close()
    return version + " (" + ", ".join(f"{r[0]}={r[1]}{r[2] or ''}" for r in rows) + ")"


def version(server: str) -> str:
    """``SHOW server_version`` plus the settings that decide commit cost."""
    return asyncio.run(_version(server))


async def _checkpointer_pid(server: str) -> int:
    con = await asyncpg.connect(database_url(server, "postgres"), timeout=10)
    try:
        pid: int = await con.fetchval(
            "SELECT pid FROM pg_stat_activity WHERE backend_type = 'checkpointer'"
        )
    finally:
        await con.close()
    return pid


def postmaster_pid(server: str) -> int:
    """The pid of a local server's postmaster: the parent of its checkpointer, a child
    that lives as long as the server (a backend would exit with the connection)."""
    text = Path(f"/proc/{asyncio.run(_checkpointer_pid(server))}/stat").read_text()
    return int(text[text.rindex(")") + 2 :].split()[1])


@contextmanager
def throwaway_cluster(*, fsync: bool = True) -> Iterator[str]:
    """A private cluster on a unix socket for the ``with`` block; yields its server URL."""
    from tests.pgcluster import PgCluster

    cluster = PgCluster.create(fsync=fsync)
    try:
        cluster.start()
        yield cluster.url
    finally:
        cluster.destroy()
