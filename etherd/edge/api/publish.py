"""``POST /api/publish``: one event or a batch, for ``service`` and ``admin`` tokens.

Durable events (the default) answer after their group commit, with their offsets; the
broker fans them out on commit. ``durable: false`` events skip the log and go to the broker
at once, with no offset. The rules are ``services.publisher``'s, shared with the WebSocket.
"""

from __future__ import annotations

from etherd.core.auth import Authenticator
from etherd.core.errors import Refusal
from etherd.core.events import StoredEvent
from etherd.core.wire import ENCODER, PublishAnswer, PublishBody, PublishedItem, PublishEvent
from etherd.edge.api.common import (
    IDEMPOTENCY_KEY,
    Route,
    answer_of,
    authenticate,
    decode_json,
    idempotency,
)
from etherd.edge.http.request import Request
from etherd.edge.http.response import Response
from etherd.services.eventlog import AlreadyAnswered
from etherd.services.publisher import Publisher
from etherd.services.state import ServerState

__all__ = ["PublishRoutes"]


class PublishRoutes:
    """The publish API."""

    def __init__(self, auth: Authenticator, publisher: Publisher, state: ServerState) -> None:
        self.auth = auth
        self.publisher = publisher
        self.state = state

    def routes(self) -> list[Route]:
        """The route table entries."""
        return [
            Route(
                "POST",
                "/api/publish",
                lambda req, p: self.publish(req),
                summary="Publish one event or a batch (service and admin tokens)",
                body=PublishBody,
                responses={200: PublishAnswer},
                errors=(409,),
                params=(IDEMPOTENCY_KEY,),
                tag="realtime",
            )
        ]

    async def publish(self, request: Request) -> Response:
        """One event or a batch; durable ones answer after the commit."""
        principal = authenticate(self.auth, request)
        body = decode_json(request, PublishBody)
        items = self._items(body)
        publisher = self.publisher
        publisher.check(principal, items)
        idem = idempotency(request, principal, self.state.config.http.max_idempotency_key_chars)
        if idem is not None:
            earlier = await publisher.eventlog.replayed(idem)
            if earlier is not None:
                return answer_of(earlier)
        epoch = publisher.epoch

        def respond(stored: list[StoredEvent]) -> tuple[int, bytes]:
            return 200, _answer_body(items, stored, epoch)

        try:
            stored = await publisher.publish(
                items, idem, respond if idem is not None else None, request.turn
            )
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
                    limit="realtime.max_publish_batch",
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
