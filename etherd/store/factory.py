"""The store a configuration names: SQLite for ``sqlite:///``, PostgreSQL for
``postgresql://``. Each driver is imported only when its store is chosen."""

from __future__ import annotations

from etherd.core.config import Config
from etherd.store.base import Store

__all__ = ["open_store"]


def open_store(config: Config) -> Store:
    """The store for ``config.store_url``, not yet opened.

    ``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db`` gives the SQLite
    store; ``postgresql://`` or ``postgres://`` the PostgreSQL store.

    Raises:
        ValueError: any other URL.
    """
    url = config.store_url
    if url.startswith("sqlite:///"):
        from etherd.store.sqlite import SqliteStore, path_of

        return SqliteStore(path_of(url), config.store)
    if url.startswith(("postgresql://", "postgres://")):
        from etherd.store.postgres import PostgresStore

        return PostgresStore(url, config.store)
    raise ValueError(f"store.url must start with sqlite:/// or postgresql://, got {url!r}")
