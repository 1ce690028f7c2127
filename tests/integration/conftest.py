"""Fixtures for tests against real databases.

``pg_server`` is one PostgreSQL server per session: ``ETHERD_TEST_PG_DSN`` if set, else a
throwaway cluster (fsync off) started from the installed binaries. Without either the
PostgreSQL tests fail; they are never skipped. ``pg_url`` is a fresh database per test.
``store_url`` runs a test once on SQLite and once on PostgreSQL.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# The repository root, for ``etherd`` and ``tests.pgcluster`` (pytest puts it on the path
# already when it imports tests/conftest.py; this keeps the directory usable on its own).
ROOT = str(Path(__file__).resolve().parents[2])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tests.pgcluster import Server  # noqa: E402


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Server]:
    server = Server.start(fsync=False)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def pg_url(pg_server: Server) -> Iterator[str]:
    url = pg_server.create_database()
    try:
        yield url
    finally:
        pg_server.drop_database(url)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.pg)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'log' / 'etherd.db'}"
    url: str = request.getfixturevalue("pg_url")
    return url
