"""``POST /api/publish``: one event or a batch, for ``service`` and ``admin`` tokens.

Durable events (the default) answer after their group commit, with their offsets; the
broker fans them out on commit. ``durable: false`` events skip the log and go to the broker
at once, with no offset.
"""

from __future__ import annotations

import time

from etherd.core.auth import Authenticator, may_publish
from etherd.core.errors import Refusal
from etherd.core.events import NewEvent, StoredEvent, Write
from etherd.core.topics import TopicError, validate_topic
from etherd.core.wire import (
    ENCODER,
    RESERVED_FIELDS,
    PublishAnswer,
    PublishBody,
    PublishedItem,
    PublishEvent,
)
from etherd.edge.api.common import Route, answer_of, authenticate, decode_json, idempotency
from etherd.edge.http.request import Request
from etherd.edge.http.response import Response
from etherd.services.broker import Broker
from etherd.services.eventlog import AlreadyAnswered, EventLog
from etherd.services.state import ServerState

__all__ = ["PublishRoutes"]


class PublishRoutes:
    """The publish API."""

    def __init__(
        self, auth: Authenticator, eventlog: EventLog, broker: Broker, state: ServerState
    ) -> None:
        self.auth = auth
        self.eventlog = eventlog
        self.broker = broker
        self.state = state

    def routes(self) -> list[Route]:
        """The route table entries."""
        return [Route("POST", "/api/publish", lambda req, p: self.publish(req))]

    async def publish(self, request: Request) -> Response:
        """One event or a batch; durable ones answer after the commit."""
        principal = authenticate(self.auth, request)
        body = decode_json(request, PublishBody)
        items = self._items(body)
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
        idem = idempotency(request, principal, self.state.config.http.max_idempotency_key_chars)
        if idem is not None:
            earlier = await self.eventlog.replayed(idem)
            if earlier is not None:
                return answer_of(earlier)
        now_ms = int(time.time() * 1000)
        durable = [NewEvent(i.topic, i.event, ENCODER.encode(i.data)) for i in items if i.durable]
        for item in items:
            if not item.durable:
                self.broker.transient(item.topic, item.event, ENCODER.encode(item.data), now_ms)
        epoch = self.eventlog.epoch
        if not durable:
            return Response(200, _answer_body(items, [], epoch))

        def respond(stored: list[StoredEvent]) -> tuple[int, bytes]:
            return 200, _answer_body(items, stored, epoch)

        write = Write(durable, idem, respond if idem is not None else None)
        try:
            stored = await self.eventlog.commit(write)
        except AlreadyAnswered as exc:
            return answer_of(exc.answer)
        return Response(200, _answer_body(items, stored, epoch))

    def _items(self, body: PublishBody) -> list[PublishEvent]:
        if body.events is not None:
            if body.topic is not None or body.event is not None:
                raise Refusal("unprocessable", "send either topic/event/data or events, not both")
            if not body.events:
                raise Refusal("unprocessable", "events is empty; send at least one event")
            limit = self.state.config.realtime.max_publish_batch
            if len(body.events) > limit:
                raise Refusal(
                    "payload_too_large",
                    f"{len(body.events)} events in one publish, at most {limit} "
                    f"(realtime.max_publish_batch)",
                )
            return body.events
        if body.topic is None or body.event is None:
            raise Refusal("unprocessable", "missing topic and event (or an events list)")
        return [PublishEvent(body.topic, body.event, body.data, body.durable)]


def _answer_body(items: list[PublishEvent], stored: list[StoredEvent], epoch: str) -> bytes:
    offsets = iter(stored)
    published = []
    for item in items:
        if item.durable:
            ev = next(offsets)
            published.append(PublishedItem(item.topic, item.event, ev.offset))
        else:
            published.append(PublishedItem(item.topic, item.event))
    return ENCODER.encode(PublishAnswer(published, epoch))
