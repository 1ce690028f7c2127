"""Cluster-wide duties run on one node at a time.

The lease sweep and retention act on the shared log; with several nodes, one does them.
``Leadership`` keeps asking the store for the duty's lock (a PostgreSQL advisory lock held
by a dedicated session, so it is released the moment its holder dies) every
``cluster.leader_retry_s``; the node that holds it leads. A single process always leads.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Final

from etherd.services.state import ServerState
from etherd.store import Store

__all__ = ["DUTIES_LOCK", "Leadership"]

log = logging.getLogger("etherd.cluster")

# The advisory lock key of the cluster-wide duties ("duties" in ASCII, as an int64; the
# schema migrations lock "etherd", store/migrate.py).
DUTIES_LOCK: Final = 0x647574696573


class Leadership:
    """Whether this node runs the cluster-wide duties now (see the module docstring)."""

    def __init__(self, store: Store, state: ServerState) -> None:
        self.store = store
        self.state = state
        # A single process always leads; a clustered node once it holds the lock.
        self.leading = not state.config.clustered

    async def run_forever(self) -> None:
        """Take the lead when it is free, and notice when it is lost."""
        if not self.state.config.clustered:
            return
        while True:
            leading = await self.store.lead(DUTIES_LOCK)
            if leading != self.leading:
                self.leading = leading
                if leading:
                    log.info("%s leads the cluster-wide duties now", self.state.node_id)
                else:
                    log.warning("%s no longer leads the cluster-wide duties", self.state.node_id)
            await asyncio.sleep(self.state.config.cluster.leader_retry_s)

    async def resign(self) -> None:
        """Let another node take the lead (on a graceful stop)."""
        self.leading = not self.state.config.clustered
        await self.store.resign()
