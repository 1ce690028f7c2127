"""Durable event log storage: SQLite (embedded, the default) or PostgreSQL.

``etherd.store.factory.open_store(config)`` picks the store from ``config.store_url``;
call ``await store.open()`` before use. Writes normally go through a ``Batcher`` (group
commit).
"""

from __future__ import annotations

from etherd.store.base import IdempotencyConflict, Store, StoreUnavailable, TaskConflict
from etherd.store.batcher import Batcher, Overloaded

__all__ = [
    "Batcher",
    "IdempotencyConflict",
    "Overloaded",
    "Store",
    "StoreUnavailable",
    "TaskConflict",
]
