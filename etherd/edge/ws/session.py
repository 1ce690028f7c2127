"""One WebSocket client of ``/api/realtime``: commands in, events out.

``Session`` turns messages into commands (subscribe, unsubscribe, ping) and is a hub sink:
the hub queues encoded frames on ``pending`` and calls ``write`` once per loop iteration;
a session whose unsent bytes pass ``ws.max_pending_bytes`` is closed with 4008 and resumes
with ``since``.

A subscribe is answered in one reply listing, per topic, where the topic stands (newest
offset and epoch) and whether a requested resume was honoured in full; refused topics are
listed in the same reply and never close the connection. A resume holds live events of the
topic while the retained ones are read from the store, writes the replay, then releases the
held events it did not already send, so the client sees every offset once, in order.
Commands that arrive while a subscribe reads the store wait behind it, in order, up to
``ws.max_queued_commands``.

``publish`` (tokens that may publish) is answered after the commit with the event's offset;
publishes do not wait for each other, so a fast publisher's events share group commits,
up to ``ws.max_inflight_publishes`` at once. ``refresh`` swaps the session's token for a
new one of the same subject. ``presence`` counts a topic's subscribers for anyone allowed
to subscribe to it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
from collections import deque
from collections.abc import Awaitable, Callable

import msgspec

from etherd.core.auth import AuthError, Principal
from etherd.core.errors import REPLAY_FAILED, SLOW_CONSUMER, Refusal, binary_message
from etherd.core.events import StoredEvent
from etherd.core.frames import ws_text_frame
from etherd.core.hub import KIND_WS, Pending, Resuming
from etherd.core.topics import TopicError, is_pattern, validate_pattern
from etherd.core.wire import (
    COMMAND_DECODER,
    ENCODER,
    ErrorReply,
    Ping,
    Pong,
    Presence,
    PresenceReply,
    Publish,
    Published,
    PublishEvent,
    Refresh,
    Refreshed,
    RequestId,
    Subscribe,
    Subscribed,
    TopicAck,
    TopicRefusal,
    Unsubscribe,
    Unsubscribed,
)
from etherd.core.wsproto import PING
from etherd.edge.ws.framing import WebSocket
from etherd.services.realtime import Realtime, taken, wake

__all__ = ["Session"]

log = logging.getLogger("etherd.realtime")

Command = Subscribe | Unsubscribe | Ping | Publish | Refresh | Presence


class Session(WebSocket):
    """One WebSocket client (see the module docstring)."""

    __slots__ = (
        "_busy",
        "_commands",
        "_publishing",
        "alive",
        "direct",
        "fd",
        "max_pending",
        "patterns",
        "peer",
        "pending",
        "principal",
        "realtime",
        "resuming",
        "send",
        "topics",
        "unsent",
        "waiter",
    )

    kind = KIND_WS

    def __init__(self, realtime: Realtime, principal: Principal, peer: str) -> None:
        cfg = realtime.config.ws
        super().__init__(cfg.max_message_bytes, cfg.close_grace_s)
        self.realtime = realtime
        self.principal = principal
        self.peer = peer
        self.topics: set[str] = set()
        self.patterns = 0
        # Hub sink state.
        self.pending: list[Pending] = []
        self.resuming: dict[str, Resuming] | None = None
        self.alive = False
        self.direct = False
        self.send: Callable[[bytes], None] = _nowhere
        # A descriptor of the session's own for its socket, which the fan-out's C loop
        # (``etherd.edge.ws._directwrite``) writes to while ``unsent()`` is 0; -1: none.
        # Its own, so the number cannot be reused by another connection while a flush
        # still holds this session (the transport closes its descriptor at once on an
        # error; ``connection_lost`` comes a callback later).
        self.fd = -1
        self.unsent: Callable[[], int] = _nothing_unsent
        self.max_pending = cfg.max_pending_bytes
        # A replay waiting for the client to take its last piece (see ``taken``).
        self.waiter: asyncio.Future[None] | None = None
        # Created on first use: most sessions never queue a command (an empty deque is
        # about 0.6 KB, per connection).
        self._commands: deque[Command] | None = None
        self._busy = False
        self._publishing = 0

    # -- what the registry and the keepalive see -------------------------------------------

    @property
    def subject(self) -> str:
        """The ``sub`` of the session's token."""
        return self.principal.sub

    @property
    def expires_at(self) -> float | None:
        """When the session's token expires (unix seconds), if it does."""
        return self.principal.exp

    @property
    def pinged_at(self) -> float | None:
        """When the unanswered ping was sent, if one is out."""
        return self.ping_sent_at

    def took_input(self) -> bool:
        """Whether any frame arrived since the last call (the call resets it)."""
        seen = self.seen
        self.seen = False
        return seen

    def ping(self, now: float) -> None:
        """Send a ping; a pong clears ``pinged_at``."""
        if self.transport is not None and not self.closed:
            self.ping_sent_at = now
            self._write(PING)

    # -- lifecycle -------------------------------------------------------------------------

    def on_open(self) -> None:
        self.alive = True
        assert self.transport is not None
        transport = self.transport
        self.send = transport.write
        self.unsent = transport.get_write_buffer_size
        self.fd = _own_fd(transport)
        self._refresh_direct()
        self.realtime.connections.session_opened(self)

    def _refresh_direct(self) -> None:
        """Whether the hub may hand this session segments straight to its transport."""
        self.direct = (
            self.alive and not self.paused and self.patterns == 0 and len(self.topics) <= 1
        )

    def pause_writing(self) -> None:
        super().pause_writing()
        # From now on every write goes through ``write``, which watches the unsent bytes.
        self.direct = False

    def resume_writing(self) -> None:
        super().resume_writing()
        self._refresh_direct()
        wake(self)

    def writing(self) -> bool:
        """Whether frames wait for the client (and the session is still open)."""
        return not self.closed and (bool(self.pending) or self.paused)

    async def taken(self) -> bool:
        """Wait until the client has taken what is queued (see ``services.realtime.taken``)."""
        return await taken(self)

    def is_open(self) -> bool:
        """Whether the session still serves its client."""
        return not self.closed

    def replay_failed(self) -> None:
        """A replay could not be finished: close (1011); the client resumes."""
        self.close(REPLAY_FAILED)

    def on_closed(self) -> None:
        self.alive = False
        self.direct = False
        self.drained_fd = -1
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.topics:
            self.realtime.hub.unsubscribe_all(self.topics, self)
            self.topics.clear()
        self.resuming = None
        self.pending.clear()
        wake(self)
        self.realtime.connections.session_closed(self)

    # -- sink ------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Write pre-built frames; close with 4008 when the peer cannot keep up.

        The unsent bytes are looked at only while the transport is above its high-water
        mark (``pause_writing`` was called), so a reader that keeps up costs one write.
        """
        transport = self.transport
        if self.closed or transport is None:
            return
        self._write(data)
        if self.paused:
            if transport.get_write_buffer_size() > self.max_pending:
                self.slow_consumer()
        elif self.waiter is not None:
            wake(self)

    def slow_consumer(self) -> None:
        """Close a session whose unsent bytes passed the cap; it resumes with ``since``."""
        if self.closed:
            return
        self.realtime.connections.slow_consumer_closes["ws"] += 1
        self.realtime.connections.limit_hits["ws.max_pending_bytes"] += 1
        self.alive = False
        self.close(SLOW_CONSUMER)

    def on_limit(self, key: str) -> None:
        self.realtime.connections.limit_hits[key] += 1

    # -- commands --------------------------------------------------------------------------

    def on_message(self, text: bool, payload: bytes) -> None:
        if not text:
            self.close(binary_message())
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
            limit = self.realtime.config.ws.max_queued_commands
            if self._commands is None:
                self._commands = deque()
            if len(self._commands) >= limit:
                self.realtime.connections.limit_hits["ws.max_queued_commands"] += 1
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

    def _run(self, command: Command) -> None:
        if isinstance(command, Ping):
            self.reply(Pong(command.id))
        elif isinstance(command, Unsubscribe):
            self._unsubscribe(command)
        elif isinstance(command, Publish):
            self._publish(command)
        elif isinstance(command, Refresh):
            self._refresh(command)
        elif isinstance(command, Presence):
            self._busy = True
            asyncio.get_running_loop().create_task(self._then_continue(self._presence(command)))
        else:
            self._busy = True
            asyncio.get_running_loop().create_task(
                self._then_continue(self._subscribe(command), command.id)
            )

    async def _then_continue(self, work: Awaitable[None], rid: RequestId = None) -> None:
        """Run a command that reads the store, then the commands that waited behind it."""
        try:
            await work
        except Exception:
            log.exception("command failed for %s", self.peer)
            self.reply(ErrorReply(rid, "internal", "the server failed this command"))
        self._busy = False
        commands = self._commands
        while commands and not self._busy and not self.closed:
            self._run(commands.popleft())

    def _publish(self, command: Publish) -> None:
        limit = self.realtime.config.ws.max_inflight_publishes
        if self._publishing >= limit:
            self.realtime.connections.limit_hits["ws.max_inflight_publishes"] += 1
            self.reply(
                ErrorReply(
                    command.id,
                    "rate_limited",
                    f"{limit} publishes are already waiting for their commit "
                    f"(ws.max_inflight_publishes); wait for replies before sending more",
                )
            )
            return
        item = PublishEvent(command.topic, command.event, command.data, command.durable)
        try:
            self.realtime.publisher.check(self.principal, [item])
        except Refusal as exc:
            self.reply(ErrorReply(command.id, exc.code, exc.message))
            return
        self._publishing += 1
        asyncio.get_running_loop().create_task(self._commit(command, item))

    async def _commit(self, command: Publish, item: PublishEvent) -> None:
        try:
            stored = await self.realtime.publisher.publish([item])
        except Refusal as exc:
            self.reply(ErrorReply(command.id, exc.code, exc.message))
        except Exception:
            log.exception("publish failed for %s", self.peer)
            self.reply(ErrorReply(command.id, "internal", "the server failed this publish"))
        else:
            offset = stored[0].offset if stored else None
            self.reply(Published(command.id, command.topic, offset))
        finally:
            self._publishing -= 1

    def _refresh(self, command: Refresh) -> None:
        try:
            principal = self.realtime.auth.verify(command.token)
        except AuthError as exc:
            self.reply(ErrorReply(command.id, exc.code, f"token refused: {exc.message}"))
            return
        if principal.sub != self.principal.sub or principal.role is not self.principal.role:
            self.reply(
                ErrorReply(
                    command.id,
                    "forbidden",
                    f"a refreshed token must name the same subject and role "
                    f"({self.principal.sub}, {self.principal.role.value}); reconnect to change "
                    f"them",
                )
            )
            return
        self.principal = principal
        self.reply(Refreshed(command.id, principal.exp))

    async def _presence(self, command: Presence) -> None:
        topic = command.topic
        try:
            validate_pattern(topic)
        except TopicError as exc:
            self.reply(ErrorReply(command.id, "bad_request", str(exc)))
            return
        if is_pattern(topic):
            self.reply(ErrorReply(command.id, "bad_request", "presence counts a concrete topic"))
            return
        reason = await self.realtime.authorize(self.principal, topic)
        if reason is not None:
            self.reply(ErrorReply(command.id, "forbidden", reason))
            return
        counts = await self.realtime.presence(topic)
        self.reply(PresenceReply(command.id, topic, sum(counts.values())))

    def reply(self, message: msgspec.Struct) -> None:
        """Queue a reply behind any frames already pending for this session."""
        if not self.closed:
            self.realtime.hub.queue(self, ws_text_frame(ENCODER.encode(message)))

    def _unsubscribe(self, command: Unsubscribe) -> None:
        hub = self.realtime.hub
        removed = []
        for topic in command.topics:
            if topic in self.topics:
                self.topics.discard(topic)
                hub.unsubscribe(topic, self)
                if is_pattern(topic):
                    self.patterns -= 1
                hub.forget(self, topic)
                removed.append(topic)
        self._refresh_direct()
        self.reply(Unsubscribed(command.id, removed))

    async def _subscribe(self, command: Subscribe) -> None:
        realtime = self.realtime
        cfg = realtime.config.ws
        since = command.since or {}
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
            if refusal is None and topic in since:
                spent = realtime.replay_refused("ws")
                if spent is not None:
                    refusal = TopicRefusal(topic, spent.code, spent.message)
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
        resumes = {t: since[t] for t in accepted if t in since}
        self._register(fresh, resumes)
        try:
            acks, replays = await self._positions(accepted, resumes, fresh, command.epoch)
        except BaseException:
            # Nothing of a failed subscribe stays registered: no hold, no subscription.
            self._unregister(fresh, resumes)
            raise
        if self.is_closed():
            return
        self.reply(Subscribed(command.id, acks, refusals))
        for topic, (after, head, events) in replays.items():
            if self.is_closed():
                return
            if head is None:
                self.realtime.hub.release(self, topic, after)
            else:
                await realtime.replay(self, topic, after, head, events)

    def _register(self, fresh: list[str], resumes: dict[str, int]) -> None:
        """Hold the resumed topics' live events, then subscribe the new topics."""
        hub = self.realtime.hub
        for topic in fresh:
            self.topics.add(topic)
            if is_pattern(topic):
                self.patterns += 1
        for topic, after in resumes.items():
            hub.hold(self, topic, after)
        for topic in fresh:
            hub.subscribe(topic, self)
        self._refresh_direct()

    def _unregister(self, fresh: list[str], resumes: dict[str, int]) -> None:
        hub = self.realtime.hub
        for topic in resumes:
            hub.forget(self, topic)
        for topic in fresh:
            if topic in self.topics:
                self.topics.discard(topic)
                hub.unsubscribe(topic, self)
                if is_pattern(topic):
                    self.patterns -= 1
        self._refresh_direct()

    async def _positions(
        self, accepted: list[str], resumes: dict[str, int], fresh: list[str], epoch: str | None
    ) -> tuple[list[TopicAck], dict[str, tuple[int, int | None, list[StoredEvent]]]]:
        """Follow the accepted topics and read where each stands; for resumed ones, the
        first piece of the replay. Replays map topic -> (offset the replay starts after,
        head it ends at or None when there is nothing to replay, first events)."""
        realtime = self.realtime
        for topic in fresh:
            if is_pattern(topic):
                await realtime.follow_pattern(topic)
        acks: list[TopicAck] = []
        replays: dict[str, tuple[int, int | None, list[StoredEvent]]] = {}
        current = realtime.epoch
        for topic in accepted:
            if topic in resumes:
                # Followed first: every live event past what the replay reads reaches us.
                await realtime.follow(topic)
                resumed = await realtime.resume(topic, resumes[topic], epoch)
                acks.append(TopicAck(topic, resumed.offset, current, resumed.recovered))
                if resumed.recovered:
                    replays[topic] = (resumes[topic], resumed.offset, resumed.events)
                else:
                    # The client reloads over HTTP and continues after the head.
                    replays[topic] = (resumed.offset, None, [])
            else:
                head = 0 if is_pattern(topic) else await realtime.follow(topic)
                acks.append(TopicAck(topic, head, current, True))
        return acks, replays

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
        cfg = self.realtime.config.ws
        if len(self.topics) >= topics_left:
            self.realtime.connections.limit_hits["ws.max_topics_per_connection"] += 1
            return TopicRefusal(
                topic,
                "limit",
                f"this connection already holds {cfg.max_topics_per_connection} topics "
                f"(ws.max_topics_per_connection)",
            )
        if pattern and self.patterns >= patterns_left:
            self.realtime.connections.limit_hits["ws.max_patterns_per_connection"] += 1
            return TopicRefusal(
                topic,
                "limit",
                f"this connection already holds {cfg.max_patterns_per_connection} patterns "
                f"(ws.max_patterns_per_connection)",
            )
        reason = await self.realtime.authorize(self.principal, topic)
        if reason is not None:
            return TopicRefusal(topic, "forbidden", reason)
        return None


def _nowhere(data: bytes) -> None:
    """``send`` before the session is open: never called (the session is not direct)."""


def _nothing_unsent() -> int:
    """``unsent`` before the session is open."""
    return 0


def _own_fd(transport: asyncio.Transport) -> int:
    """A duplicate of the transport's socket descriptor for the fan-out, or -1: no socket,
    one that encrypts (its bytes must go through the transport), or fewer than half the
    process's descriptors left (accepting connections needs them more)."""
    if transport.get_extra_info("sslcontext") is not None:
        return -1
    sock = transport.get_extra_info("socket")
    if sock is None:
        return -1
    fd = sock.fileno()
    if fd < 0 or fd >= resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 2:
        return -1
    try:
        return os.dup(fd)
    except OSError:
        return -1


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
