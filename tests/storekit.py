"""Helpers shared by the store test modules: run on uvloop, open a store, start a batcher."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import uvloop

from etherd.core.config import Config, StoreConfig
from etherd.store import Batcher, Store
from etherd.store.factory import open_store


def run(body: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run one async test body on uvloop, as in production."""
    uvloop.run(body())


@contextlib.asynccontextmanager
async def opened(url: str, **store: Any) -> AsyncIterator[Store]:
    s = open_store(Config(store=StoreConfig(url=url, **store)))
    await s.open()
    try:
        yield s
    finally:
        await s.close()


@contextlib.asynccontextmanager
async def batching(store: Store, **options: Any) -> AsyncIterator[Batcher]:
    settings: dict[str, Any] = {
        "max_rows": 5_000,
        "max_delay_ms": 0.0,
        "queue_max_rows": 200_000,
        "retry_max_delay_s": 1.0,
    }
    settings.update(options)
    batcher = Batcher(store, **settings)
    batcher.start()
    try:
        yield batcher
    finally:
        await batcher.drain()
