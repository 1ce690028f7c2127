"""Keeping one client's pipelined changes in the order it sent them.

A client may pipeline many requests on one connection, and etherd handles them at once so
their events share one group commit. Their answers already leave in request order; a
``Turn`` also keeps their *effects* in order: request *k*'s write enters the group commit
only after request *k-1*'s did (or after it finished without writing). So two pipelined
publishes to one topic get offsets in the order they were sent, and two pipelined steps of
one task are narrated in order, even when one of them had to wait for a read first.
"""

from __future__ import annotations

import asyncio

__all__ = ["Turn"]


class Turn:
    """One request's place in its connection's commit order."""

    __slots__ = ("_mine", "_prev")

    def __init__(self, prev: Turn | None, loop: asyncio.AbstractEventLoop) -> None:
        self._prev = prev._mine if prev is not None and not prev._mine.done() else None
        self._mine: asyncio.Future[None] = loop.create_future()

    async def wait(self) -> None:
        """Return once every earlier request of the connection has written (or finished)."""
        prev = self._prev
        if prev is not None and not prev.done():
            await asyncio.shield(prev)
        self._prev = None

    def done(self) -> None:
        """This request has written (or will not): later ones may go. Idempotent."""
        if not self._mine.done():
            self._mine.set_result(None)
