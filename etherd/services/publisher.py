"""Publishing events for ``service`` and ``admin`` tokens, over HTTP or the WebSocket.

Both publish paths (``POST /api/publish`` and the WebSocket ``publish`` action) go through
``Publisher``, so the rules are the same: each topic is a valid concrete topic the token may
publish on, event data holds none of the envelope's fields, durable events (the default)
are committed before the call returns, with their offsets, and then fanned out by the
broker; non-durable ones go to the broker at once and get no offset.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from etherd.core.auth import Principal, may_publish
from etherd.core.errors import Refusal
from etherd.core.events import Idempotency, NewEvent, Respond, StoredEvent, Write
from etherd.core.topics import TopicError, validate_topic
from etherd.core.wire import ENCODER, RESERVED_FIELDS, PublishEvent
from etherd.services.broker import Broker
from etherd.services.eventlog import EventLog
from etherd.services.turns import Turn

__all__ = ["Publisher"]


class Publisher:
    """Checks and publishes events (see the module docstring)."""

    def __init__(self, eventlog: EventLog, broker: Broker) -> None:
        self.eventlog = eventlog
        self.broker = broker

    @property
    def epoch(self) -> str:
        """The log's epoch, which the offsets belong to."""
        return self.eventlog.epoch

    def check(self, principal: Principal, items: Sequence[PublishEvent]) -> None:
        """Refuse the whole batch unless the caller may publish every item.

        Raises:
            Refusal: ``unprocessable`` for a bad topic or reserved data fields,
                ``forbidden`` for a topic the token may not publish on.
        """
        checked: set[str] = set()
        for item in items:
            if item.topic not in checked:
                # A batch usually repeats a few topics: check each one once.
                try:
                    validate_topic(item.topic)
                except TopicError as exc:
                    raise Refusal("unprocessable", f"invalid topic: {exc}") from None
                reason = may_publish(principal, item.topic)
                if reason is not None:
                    raise Refusal("forbidden", reason)
                checked.add(item.topic)
            reserved = RESERVED_FIELDS.intersection(item.data)
            if reserved:
                raise Refusal(
                    "unprocessable",
                    f"data may not contain envelope fields {sorted(reserved)} "
                    f"(topic {item.topic!r}); rename them",
                )

    async def publish(
        self,
        items: Sequence[PublishEvent],
        idem: Idempotency | None = None,
        respond: Respond | None = None,
        turn: Turn | None = None,
    ) -> list[StoredEvent]:
        """Publish checked items; returns the stored events of the durable ones, in order.

        ``idem`` and ``respond`` store the answer under an idempotency key in the same
        commit (see ``Write``); ``turn`` keeps a pipelined request's commit in request
        order (``services.turns``).

        Raises:
            Refusal: ``not_ready`` or ``overloaded`` from the event log.
            AlreadyAnswered: the same request committed first under ``idem``.
        """
        now_ms = int(time.time() * 1000)
        durable = [NewEvent(i.topic, i.event, ENCODER.encode(i.data)) for i in items if i.durable]
        for item in items:
            if not item.durable:
                self.broker.transient(item.topic, item.event, ENCODER.encode(item.data), now_ms)
        if not durable:
            if turn is not None:
                turn.done()
            return []
        return await self.eventlog.commit(Write(durable, idem, respond), turn)
