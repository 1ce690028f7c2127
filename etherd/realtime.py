"""Realtime subscriptions: the WebSocket command session and the SSE stream, both hub sinks.

A subscribe is answered in one reply listing, per topic, where the topic stands (newest
offset and epoch) and whether a requested resume was honoured in full; refused topics are
listed in the same reply and never close the connection. A resume holds live events of the
topic while the retained ones are read from the store, writes the replay, then releases the
held events it did not already send, so the client sees every offset once, in order.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING

import msgspec

from etherd.auth import Principal, may_subscribe
from etherd.errors import CLOSE_UNSUPPORTED_DATA, ApiError
from etherd.eventlog import StoredEvent
from etherd.hub import Prepared, Sink, ws_text_frame
from etherd.messages import (
    COMMAND_DECODER,
    ENCODER,
    ErrorReply,
    Ping,
    Pong,
    Subscribe,
    Subscribed,
    TopicAck,
    TopicRefusal,
    Unsubscribe,
    Unsubscribed,
)
from etherd.topics import TopicError, is_pattern, validate_pattern
from etherd.ws import SessionBase

if TYPE_CHECKING:
    from etherd.app import App

__all__ = ["Session", "replay_to", "resume"]

log = logging.getLogger("etherd.realtime")


class Session(SessionBase):
    """One WebSocket client: commands in, events out."""

    def __init__(self, app: App, principal: Principal, peer: str) -> None:
        cfg = app.config.ws
        super().__init__(cfg.max_message_bytes, cfg.max_pending_bytes)
        self.app = app
        self.principal = principal
        self.peer = peer
        self.topics: set[str] = set()
        self.patterns = 0
        # Created on first use: most sessions never queue a command (an empty deque is
        # about 0.6 KB, per connection).
        self._commands: deque[Subscribe | Unsubscribe | Ping] | None = None
        self._busy = False

    # -- lifecycle -------------------------------------------------------------------------

    def on_ws_connected(self, transport: object) -> None:
        super().on_ws_connected(transport)  # type: ignore[arg-type]
        self.app.session_opened(self)

    def on_closed(self) -> None:
        if self.topics:
            self.app.hub.unsubscribe_all(self.topics, self)
            self.topics.clear()
        self.resuming = None
        super().on_closed()
        self.app.session_closed(self)

    # -- commands --------------------------------------------------------------------------

    def on_message(self, text: bool, payload: bytes) -> None:
        if not text:
            self.close(CLOSE_UNSUPPORTED_DATA, "binary messages are not accepted; send JSON text")
            return
        try:
            command = COMMAND_DECODER.decode(payload)
        except msgspec.ValidationError as exc:
            self.reply(ErrorReply(_request_id(payload), "bad_request", f"invalid command: {exc}"))
            return
        except msgspec.DecodeError as exc:
            self.reply(ErrorReply(None, "bad_request", f"message is not JSON: {exc}"))
            return
        if self._busy:
            limit = self.app.config.ws.max_queued_commands
            if self._commands is None:
                self._commands = deque()
            if len(self._commands) >= limit:
                self.reply(
                    ErrorReply(
                        command.id,
                        "rate_limited",
                        f"{limit} commands are already waiting (ws.max_queued_commands); "
                        f"wait for replies before sending more",
                    )
                )
                return
            self._commands.append(command)
            return
        self._run(command)

    def _run(self, command: Subscribe | Unsubscribe | Ping) -> None:
        if isinstance(command, Ping):
            self.reply(Pong(command.id))
        elif isinstance(command, Unsubscribe):
            self._unsubscribe(command)
        else:
            self._busy = True
            asyncio.get_running_loop().create_task(self._subscribe_then_continue(command))

    async def _subscribe_then_continue(self, command: Subscribe) -> None:
        try:
            await self._subscribe(command)
        except Exception:
            log.exception("subscribe failed for %s", self.peer)
            self.reply(ErrorReply(command.id, "internal", "the server failed this subscribe"))
        self._busy = False
        commands = self._commands
        while commands and not self._busy and not self.closed:
            self._run(commands.popleft())

    def reply(self, message: msgspec.Struct) -> None:
        """Queue a reply behind any frames already pending for this session."""
        if not self.closed:
            self.app.hub.queue(self, ws_text_frame(ENCODER.encode(message)))

    def _unsubscribe(self, command: Unsubscribe) -> None:
        removed = []
        for topic in command.topics:
            if topic in self.topics:
                self.topics.discard(topic)
                self.app.hub.unsubscribe(topic, self)
                if is_pattern(topic):
                    self.patterns -= 1
                self.app.hub.forget(self, topic)
                removed.append(topic)
        self.reply(Unsubscribed(command.id, removed))

    async def _subscribe(self, command: Subscribe) -> None:
        app = self.app
        cfg = app.config.ws
        since = command.since or {}
        acks: list[TopicAck] = []
        refusals: list[TopicRefusal] = []
        accepted: list[str] = []
        seen: set[str] = set()
        new_topics = 0
        new_patterns = 0
        for topic in command.topics:
            if topic in seen:
                continue
            seen.add(topic)
            refusal = await self._check(
                topic,
                topic in since,
                cfg.max_topics_per_connection - new_topics,
                cfg.max_patterns_per_connection - new_patterns,
            )
            if refusal is not None:
                refusals.append(refusal)
                continue
            accepted.append(topic)
            if topic not in self.topics:
                new_topics += 1
                new_patterns += is_pattern(topic)
        refusals.extend(
            TopicRefusal(topic, "bad_request", "since names a topic that is not in topics")
            for topic in since
            if topic not in seen
        )
        if self.is_closed():
            return
        fresh = [t for t in accepted if t not in self.topics]
        for topic in fresh:
            self.topics.add(topic)
            if is_pattern(topic):
                self.patterns += 1
        resumes = {t: since[t] for t in accepted if t in since}
        for topic, after in resumes.items():
            app.hub.hold(self, topic, after)
        for topic in fresh:
            app.hub.subscribe(topic, self)
        # topic -> (offset the replay starts after, events to replay)
        replays: dict[str, tuple[int, list[StoredEvent]]] = {}
        for topic in accepted:
            if topic in resumes:
                ack, events = await resume(app, topic, resumes[topic], command.epoch)
                # Not recovered: the client reloads over HTTP and continues after the head.
                replays[topic] = (resumes[topic] if ack.recovered else ack.offset, events)
            else:
                head = 0 if is_pattern(topic) else await app.head(topic)
                ack = TopicAck(topic, head, app.epoch, True)
            acks.append(ack)
        if self.is_closed():
            return
        self.reply(Subscribed(command.id, acks, refusals))
        for topic, (after, events) in replays.items():
            replay_to(self.app, self, topic, after, events)

    async def _check(
        self, topic: str, resuming: bool, topics_left: int, patterns_left: int
    ) -> TopicRefusal | None:
        """Why a topic cannot be subscribed (None if it can); the limits count what this
        subscribe already accepted."""
        try:
            validate_pattern(topic)
        except TopicError as exc:
            return TopicRefusal(topic, "bad_topic", str(exc))
        pattern = is_pattern(topic)
        if pattern and resuming:
            return TopicRefusal(
                topic, "bad_request", "since applies to concrete topics, not to patterns"
            )
        if topic in self.topics:
            return None
        cfg = self.app.config.ws
        if len(self.topics) >= topics_left:
            return TopicRefusal(
                topic,
                "limit",
                f"this connection already holds {cfg.max_topics_per_connection} topics "
                f"(ws.max_topics_per_connection)",
            )
        if pattern and self.patterns >= patterns_left:
            return TopicRefusal(
                topic,
                "limit",
                f"this connection already holds {cfg.max_patterns_per_connection} patterns "
                f"(ws.max_patterns_per_connection)",
            )
        facts = await self.app.task_facts(topic)
        reason = may_subscribe(self.principal, topic, facts)
        if reason is not None:
            return TopicRefusal(topic, "forbidden", reason)
        return None


def _request_id(payload: bytes) -> str | int | None:
    """The ``id`` of a command that failed validation, so the error can still be matched."""
    try:
        value = msgspec.json.decode(payload)
    except (msgspec.DecodeError, UnicodeDecodeError):
        return None
    if isinstance(value, dict):
        rid = value.get("id")
        if isinstance(rid, str | int) and not isinstance(rid, bool):
            return rid
    return None


async def resume(
    app: App, topic: str, after: int, epoch: str | None
) -> tuple[TopicAck, list[StoredEvent]]:
    """Read what a client missed on one topic, or say it cannot be recovered.

    Returns the ack for the topic and the events to replay (empty when not recovered):
    never a partial replay reported as complete.
    """
    if epoch is not None and epoch != app.epoch:
        head = await app.head(topic)
        return TopicAck(topic, head, app.epoch, False), []
    try:
        replay = await app.read(topic, after, app.config.realtime.replay_max_events + 1)
    except ApiError:
        return TopicAck(topic, after, app.epoch, False), []
    trimmed = replay.first > 0 and after < replay.first - 1
    too_many = len(replay.events) > app.config.realtime.replay_max_events
    future = after > replay.head
    if trimmed or too_many or future:
        return TopicAck(topic, replay.head, app.epoch, False), []
    return TopicAck(topic, replay.head, app.epoch, True), replay.events


def replay_to(app: App, sink: Sink, topic: str, after: int, events: list[StoredEvent]) -> None:
    """Queue a topic's replay for a sink, then release the live events held meanwhile."""
    last = after
    for ev in events:
        app.hub.queue(sink, Prepared.stored(ev).variant(sink.kind))
        last = ev.offset
    app.hub.release(sink, topic, last)
