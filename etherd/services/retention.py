"""Retention: trim the oldest events of topics per the configured rules, forever."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from etherd.core.errors import Refusal
from etherd.services.eventlog import EventLog
from etherd.services.state import ServerState

__all__ = ["Retention"]

log = logging.getLogger("etherd.store")


class Retention:
    """Runs ``store.retention`` every ``store.retention_interval_s`` (both re-read each pass)."""

    def __init__(self, eventlog: EventLog, state: ServerState) -> None:
        self.eventlog = eventlog
        self.state = state

    async def run_once(self) -> int:
        """One pass; how many events it deleted (0 when the store could not be reached)."""
        rules = self.state.config.store.retention
        if not rules:
            return 0
        try:
            deleted = await self.eventlog.enforce_retention(rules, int(time.time() * 1000))
        except Refusal as exc:
            log.warning("retention sweep failed: %s", exc.message)
            return 0
        if deleted:
            log.info("retention removed %d events", deleted)
        return deleted

    async def run_forever(self, leads: Callable[[], bool] = lambda: True) -> None:
        """Trim the log forever, while ``leads()`` (one node of a cluster trims)."""
        while True:
            await asyncio.sleep(self.state.config.store.retention_interval_s)
            if not leads():
                continue
            try:
                await self.run_once()
            except Exception as exc:
                log.warning("retention sweep failed: %s", exc)
