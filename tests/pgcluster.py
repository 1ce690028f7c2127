"""Throwaway PostgreSQL clusters for tests, made from the installed server binaries.

``PgCluster.create()`` runs ``initdb`` in a fresh temporary directory and ``start()`` serves
it on a unix socket only (no TCP listener). As root, the binaries run as the ``postgres``
user (``initdb`` refuses root). ``stop()`` and ``start()`` may be repeated, which is how
outage tests take the server away and bring it back; ``destroy()`` stops it and removes the
directory.

``Server`` is what fixtures hand out: an admin URL plus helpers to make a fresh database per
test. It wraps either such a cluster or an existing server named by ``ETHERD_TEST_PG_DSN``
(a ``postgresql://`` URL whose user may create databases).
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg

__all__ = ["PgCluster", "Server", "database_url"]

DSN_ENV = "ETHERD_TEST_PG_DSN"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def database_url(server_url: str, database: str) -> str:
    """``server_url`` with its database name replaced."""
    parts = urlsplit(server_url)
    return urlunsplit(parts._replace(path="/" + quote(database)))


class PgCluster:
    """A private PostgreSQL cluster in a temporary directory."""

    def __init__(self, base: Path, port: int, *, fsync: bool) -> None:
        self.base = base
        self.data = base / "data"
        self.sockets = base / "sock"
        self.log = base / "postgres.log"
        self.port = port
        self.fsync = fsync
        self._as_postgres = os.geteuid() == 0

    @classmethod
    def create(cls, *, fsync: bool = True) -> PgCluster:
        """Initialise a new cluster (not started).

        ``fsync=False`` is faster; use it only where durability is not under test.

        Raises:
            RuntimeError: the PostgreSQL server binaries are not installed.
        """
        for tool in ("initdb", "pg_ctl"):
            if shutil.which(tool) is None:
                raise RuntimeError(
                    f"PostgreSQL tests need {tool} on PATH (install the PostgreSQL server) "
                    f"or {DSN_ENV}=postgresql://... naming a server to use"
                )
        base = Path(tempfile.mkdtemp(prefix="etherd-pg-"))
        cluster = cls(base, _free_port(), fsync=fsync)
        cluster.sockets.mkdir()
        if cluster._as_postgres:
            pw = pwd.getpwnam("postgres")
            for path in (base, cluster.sockets):
                os.chown(path, pw.pw_uid, pw.pw_gid)
        cluster._run(
            "initdb",
            "-D",
            str(cluster.data),
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C",
        )
        return cluster

    def _run(self, *argv: str) -> None:
        cmd = list(argv)
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            log = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
            raise RuntimeError(
                f"{' '.join(argv[:2])} failed ({done.returncode}):\n{done.stdout}\n"
                f"{done.stderr}\n{log}"
            )

    @property
    def url(self) -> str:
        """Admin URL (database ``postgres``) over the unix socket."""
        return f"postgresql://postgres@/postgres?host={self.sockets}&port={self.port}"

    def start(self) -> None:
        options = [
            f"-p {self.port}",
            f"-k {self.sockets}",
            "-c listen_addresses=''",
            "-c max_connections=200",
        ]
        if not self.fsync:
            options += ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]
        self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-o", " ".join(options),
            "start",
        )  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: ``fast`` (clean) or ``immediate`` (like a crash)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def destroy(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self.stop("immediate")
        finally:
            shutil.rmtree(self.base, ignore_errors=True)


class Server:
    """A PostgreSQL server tests may create databases on."""

    def __init__(self, url: str, cluster: PgCluster | None = None) -> None:
        self.url = url
        self.cluster = cluster

    @classmethod
    def start(cls, *, fsync: bool) -> Server:
        """The server named by ``ETHERD_TEST_PG_DSN``, else a new throwaway cluster."""
        dsn = os.environ.get(DSN_ENV)
        if dsn:
            return cls(dsn)
        cluster = PgCluster.create(fsync=fsync)
        try:
            cluster.start()
        except BaseException:
            cluster.destroy()
            raise
        return cls(cluster.url, cluster)

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.destroy()

    def create_database(self) -> str:
        """A new empty database; returns its URL."""
        name = "test_" + uuid.uuid4().hex[:12]
        asyncio.run(self._admin(f'CREATE DATABASE "{name}"'))
        return database_url(self.url, name)

    def drop_database(self, url: str) -> None:
        name = urlsplit(url).path.lstrip("/")
        asyncio.run(self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))

    async def _admin(self, sql: str) -> None:
        con = await asyncpg.connect(self.url, timeout=10)
        try:
            await con.execute(sql)
        finally:
            await con.close()
