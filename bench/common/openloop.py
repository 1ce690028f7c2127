"""Open-loop pacing: events are due at ``t0 + i / rate``, whatever the answers do.

A publisher that waits for answers before sending (closed loop) hides the server's
slowness from its own latency figures; an open-loop one keeps the schedule and stamps each
event with its *scheduled* time, so lateness counts (no coordinated omission).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator


async def schedule(
    t0_ns: int, rate: float, total: int | None = None, until_ns: int | None = None
) -> AsyncIterator[tuple[int, int]]:
    """Yield ``(i, due_ns)`` for each event once it is due, in order: ``total`` events, or
    those due before ``until_ns``. Everything already due is yielded without sleeping, so
    a late loop catches up at once."""
    step = 1e9 / rate
    i = 0
    while total is None or i < total:
        due = t0_ns + int(i * step)
        if until_ns is not None and due >= until_ns:
            return
        now = time.monotonic_ns()
        if due > now:
            await asyncio.sleep((due - now) / 1e9)
            continue
        yield i, due
        i += 1
