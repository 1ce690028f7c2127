"""Fan-out shared by the nodes of a cluster, over NATS (contract section 11).

``ClusterBroker`` is the broker of a node that shares one PostgreSQL log and one NATS bus
with other nodes (worker processes of one machine, or machines). It keeps the promise of a
single process across nodes: every subscriber on every node gets each topic's stored
events in offset order, with no gap and no duplicate, whichever node committed them.

Sending. Each event this node commits is encoded once (the envelope every subscriber gets)
and published once on its topic's subject (``core.bus``); non-durable events likewise, with
no offset. A receiving node forwards the bytes as they are.

Following. The node subscribes on the bus to exactly what its local subscribers need: a
topic when its first local subscriber asks for it (``follow``), a pattern as a NATS
wildcard (``follow_pattern``), and unsubscribes when the last one leaves (the hub's
``on_interest``). ``follow`` subscribes, waits until the NATS server has the subscription,
then reads the topic's head from the log: every event after that head reaches this node,
over the bus or, if the bus loses it, from the log. That head is what the subscriber is
told it stands at.

Ordering and gaps. Events of a followed topic, this node's own and the bus's, go through
``core.ordering``: in offset order, each once. A missing offset is waited for
``cluster.gap_wait_ms``, then read from the log. The log is also read: when the bus comes
back after an outage (every followed topic, from where it stands), every
``cluster.degraded_poll_s`` while it is down, and once ``cluster.follow_audit_s`` after a
topic is first followed (subscriptions take a moment to reach every server of a NATS
cluster). Topics seen only through a pattern are ordered from the first event seen.

Faults. With the bus unreachable the node keeps serving its own subscribers and commits,
reports ``degraded`` (``status``) and retries forever; it never fails a publish because of
the bus. A malformed or foreign message on etherd's subjects is counted and dropped.

Presence. ``presence`` asks every node on the bus for its count of a topic's subscribers
and waits for the nodes heard from lately (heartbeats) or ``cluster.presence_timeout_ms``.

Subscriptions. nats-py keeps a queue and a task for each subscription it makes (measured:
4.9 KB each, 49 MB for 10,000 followed topics). A node follows one subject per topic its
subscribers hold, so etherd registers a lean record instead (``_LeanSub``, about 0.2 KB)
through the client's request-subscription path, which hands each message to the record
synchronously. nats-py is pinned exactly for this, and the cluster tests reconnect through
a restarted nats-server, which replays these subscriptions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final, cast

from etherd.core.bus import decode_event, encode_event, pattern_subject, subject_of
from etherd.core.events import StoredEvent
from etherd.core.hub import Hub, Prepared
from etherd.core.ordering import Ordering
from etherd.core.topics import is_pattern, matches
from etherd.core.wire import event_json
from etherd.services.broker import BusStatus
from etherd.services.eventlog import EventLog
from etherd.services.state import ServerState

if TYPE_CHECKING:
    from nats.aio.client import Client as Nats
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription

__all__ = ["ClusterBroker", "ClusterStats"]

log = logging.getLogger("etherd.cluster")

# Cross-node lag buckets, seconds.
LAG_BUCKETS: Final = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)
# Heartbeats a peer may miss before it no longer counts.
PEER_MISSES: Final = 3
# nats-py pings the server this often and gives up after this many unanswered: a dead
# connection is noticed within a few seconds, not the library's default of minutes.
PING_INTERVAL_S: Final = 2
MAX_OUTSTANDING_PINGS: Final = 2
# Followed topics whose heads one query asks for.
_HEADS_PER_QUERY: Final = 1000


class ClusterStats:
    """Counters of the bus, read by the metrics (plain ints and a histogram's lists)."""

    __slots__ = (
        "bad_messages",
        "catch_ups",
        "dropped",
        "gap_events",
        "gaps_filled",
        "lag_counts",
        "lag_sum",
        "published",
        "received",
        "tail_reads",
    )

    def __init__(self) -> None:
        self.published = 0
        # Bus messages that could not be sent (the bus was down and its buffer full).
        self.dropped = 0
        self.received = 0
        self.bad_messages = 0
        # Reads of the log that filled gaps, and the events they brought.
        self.gaps_filled = 0
        self.gap_events = 0
        self.catch_ups = 0
        # Topics read because their newest events never came over the bus.
        self.tail_reads = 0
        self.lag_counts = [0] * (len(LAG_BUCKETS) + 1)
        self.lag_sum = 0.0

    def observe_lag(self, seconds: float) -> None:
        """Count how late an event from another node arrived."""
        i = 0
        for bound in LAG_BUCKETS:
            if seconds <= bound:
                break
            i += 1
        self.lag_counts[i] += 1
        self.lag_sum += seconds


class _LeanSub:
    """A nats-py subscription record with no queue and no task (see the module docstring).

    nats-py treats a subscription that carries a ``_future`` as a request's: each message
    goes to ``_future.set_result`` synchronously. The record is its own future.
    """

    __slots__ = (
        "_cb",
        "_closed",
        "_future",
        "_id",
        "_jsi",
        "_max_msgs",
        "_message_iterator",
        "_pending_next_msgs_calls",
        "_queue",
        "_received",
        "_subject",
        "_wait_for_msgs_task",
        "broker",
    )

    def __init__(self, sid: int, subject: str, broker: ClusterBroker) -> None:
        self._id = sid
        self._subject = subject
        self._queue = ""
        self._max_msgs = 0
        self._received = 0
        self._jsi = None
        self._cb = None
        self._closed = False
        self._future = self
        self._wait_for_msgs_task = None
        self._message_iterator = None
        self._pending_next_msgs_calls = None
        self.broker = broker

    def cancelled(self) -> bool:
        return False

    def done(self) -> bool:
        return False

    def set_result(self, msg: Msg) -> None:
        self.broker.on_message(msg.subject, msg.data)

    async def _drain(self) -> None:
        return None


class _Follow:
    """Interest on the bus in one subject (a topic's, or a pattern's)."""

    __slots__ = ("ready", "sub")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        # Done once the NATS server has the subscription (or the bus is down: the log then
        # stands in for it, see ``degraded_poll_s``).
        self.ready: asyncio.Future[None] = loop.create_future()
        self.sub: _LeanSub | None = None


class ClusterBroker:
    """The broker of a node in a cluster (see the module docstring)."""

    def __init__(self, hub: Hub, eventlog: EventLog, state: ServerState) -> None:
        self.hub = hub
        self.eventlog = eventlog
        self.state = state
        cfg = state.config.cluster
        self.node = state.node_id
        self._prefix = cfg.subject_prefix
        self._ordering: Ordering[Prepared] = Ordering(cfg.max_held_events)
        # Subject -> interest, for topics and patterns local subscribers hold.
        self._follows: dict[str, _Follow] = {}
        # Topics being followed whose head is not read yet: their events wait here.
        self._waiting: dict[str, list[Prepared]] = {}
        self._nc: Nats | None = None
        self._connected = False
        self._reason = "connecting to the bus"
        self._peers: dict[str, float] = {}
        self._outbox: list[tuple[str, bytes]] = []
        self._sending = False
        self._filling: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self.stats = ClusterStats()

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Follow the hub's interest and connect in the background (never fails)."""
        self.hub.on_interest = self._interest
        loop = asyncio.get_running_loop()
        for job in (
            self._connect_forever(),
            self._fill_gaps(),
            self._poll_while_degraded(),
            self._check_tails(),
        ):
            self._tasks.append(loop.create_task(job))

    async def stop(self) -> None:
        """Leave the bus."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        nc = self._nc
        self._nc = None
        self._connected = False
        if nc is not None and not nc.is_closed:
            try:
                await asyncio.wait_for(nc.close(), 2.0)
            except Exception as exc:
                log.debug("closing the bus connection: %s", exc)

    def status(self) -> BusStatus:
        """Connected or degraded, and why; peers heard from lately."""
        horizon = time.monotonic() - PEER_MISSES * self.state.config.cluster.heartbeat_s
        peers = sum(1 for seen in self._peers.values() if seen >= horizon)
        return BusStatus(self.node, self._connected, "" if self._connected else self._reason, peers)

    def subjects(self, topic: str) -> list[str]:
        """The subjects this node follows that carry ``topic``: its own and matching
        patterns' (or the one it would follow, when none)."""
        own = subject_of(self._prefix, topic)
        carrying = [s for s in self._follows if s == own or _covers(s, own)]
        return sorted(carrying) or [own]

    # -- connection ------------------------------------------------------------------------

    async def _connect_forever(self) -> None:
        import nats  # only a clustered node pays for the client

        cfg = self.state.config.cluster
        servers = self.state.config.nats_servers
        delay = cfg.reconnect_wait_s
        warned = False
        while True:
            try:
                nc = await nats.connect(
                    servers=servers,
                    name=self.node,
                    no_echo=True,
                    allow_reconnect=True,
                    # One pass over the servers, so an unreachable bus at start is retried
                    # (and said) here; once connected, reconnection never gives up (below).
                    max_reconnect_attempts=1,
                    reconnect_time_wait=cfg.reconnect_wait_s,
                    connect_timeout=cfg.connect_timeout_s,
                    ping_interval=PING_INTERVAL_S,
                    max_outstanding_pings=MAX_OUTSTANDING_PINGS,
                    pending_size=cfg.max_pending_bytes,
                    error_cb=self._on_error,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                    closed_cb=self._on_closed,
                )
            except Exception as exc:
                detail = str(exc) or type(exc).__name__
                self._reason = f"cannot reach the bus at {', '.join(servers)}: {detail}"
                if not warned:
                    log.warning("%s; serving this node's subscribers only, retrying", self._reason)
                    warned = True
                await asyncio.sleep(delay + random.uniform(0, delay))
                continue
            break
        nc.options["max_reconnect_attempts"] = -1
        self._nc = nc
        await nc.subscribe(f"{self._prefix}.nodes", cb=self._on_heartbeat)
        await nc.subscribe(f"{self._prefix}.presence", cb=self._on_presence_query)
        for subject, follow in list(self._follows.items()):
            self._subscribe(subject, follow)
        await nc.flush()
        self._set_connected()
        for follow in self._follows.values():
            if not follow.ready.done():
                follow.ready.set_result(None)
        log.info("bus connected (%s)", nc.connected_url.netloc if nc.connected_url else "?")
        asyncio.get_running_loop().create_task(self._catch_up("bus connected"))
        self._tasks.append(asyncio.get_running_loop().create_task(self._heartbeats()))

    def _set_connected(self) -> None:
        self._connected = True
        self._reason = ""

    async def _on_error(self, exc: Exception) -> None:
        name = type(exc).__name__
        if name == "SlowConsumerError":
            # The bus dropped messages for us: read what we may have missed.
            log.warning("bus slow consumer: catching up from the log")
            await self._catch_up("slow consumer")
        else:
            log.debug("bus error: %s", exc)

    async def _on_disconnected(self) -> None:
        if self._connected:
            log.warning("bus disconnected: serving this node's subscribers only, reconnecting")
        self._connected = False
        self._reason = "the bus connection was lost; reconnecting"

    async def _on_reconnected(self) -> None:
        self._set_connected()
        log.warning("bus reconnected: catching up every followed topic from the log")
        await self._catch_up("bus reconnected")

    async def _on_closed(self) -> None:
        self._connected = False
        self._reason = "the bus connection is closed"

    # -- the broker seam -------------------------------------------------------------------

    def committed(self, events: Sequence[StoredEvent]) -> None:
        """Publish this node's commits on the bus and deliver them here, in order."""
        hub = self.hub
        for ev in events:
            prepared = Prepared.stored(ev)
            self._send(
                subject_of(self._prefix, ev.topic),
                encode_event(ev.topic, ev.offset, ev.ts_ms, ev.event, prepared.json),
            )
            if hub.has_interest(ev.topic):
                self._deliver(prepared)

    def transient(self, topic: str, event: str, data: bytes, ts_ms: int) -> None:
        """Publish a non-durable event on the bus and deliver it here."""
        json = event_json(topic, event, None, ts_ms, data)
        self._send(subject_of(self._prefix, topic), encode_event(topic, None, ts_ms, event, json))
        self.hub.publish(Prepared(topic, event, None, json))

    async def follow(self, topic: str) -> int:
        """Subscribe to a topic on the bus (once), then answer its head from the log."""
        subject = subject_of(self._prefix, topic)
        follow = self._follows.get(subject)
        first = follow is None
        if follow is None:
            follow = self._add_follow(subject)
            self._waiting.setdefault(topic, [])
        await asyncio.shield(follow.ready)
        head = await self.eventlog.head(topic)
        if not self.hub.has_interest(topic):
            self._waiting.pop(topic, None)
            return head
        if not self._ordering.is_followed(topic):
            self._ordering.follow(topic, head)
            self._release_waiting(topic)
        if first:
            delay = self.state.config.cluster.follow_audit_s
            if delay > 0:
                loop = asyncio.get_running_loop()
                loop.call_later(delay, lambda: loop.create_task(self._read_after(topic, "audit")))
        return head

    async def follow_pattern(self, pattern: str) -> None:
        """Subscribe to a pattern on the bus (once)."""
        subject = pattern_subject(self._prefix, pattern)
        follow = self._follows.get(subject)
        if follow is None:
            follow = self._add_follow(subject)
        await asyncio.shield(follow.ready)

    async def presence(self, topic: str) -> dict[str, int]:
        """Subscribers of ``topic`` on every node that answers in time."""
        counts = {self.node: self.hub.subscriber_count(topic)}
        nc = self._nc
        if nc is None or not self._connected:
            return counts
        expected = self.status().peers
        done = asyncio.get_running_loop().create_future()

        async def collect(msg: Msg) -> None:
            node, _, count = msg.data.decode(errors="replace").partition("\n")
            if node and count.isdigit():
                counts[node] = int(count)
                if len(counts) > expected and not done.done():
                    done.set_result(None)

        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox, cb=collect)
        try:
            await nc.publish(f"{self._prefix}.presence", topic.encode(), reply=inbox)
            # Every peer heard from lately answers in time; with none heard from yet (the
            # node just joined), wait the whole timeout rather than answer for itself alone.
            timeout = self.state.config.cluster.presence_timeout_ms / 1000
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(done), timeout)
        finally:
            await sub.unsubscribe()
        return counts

    # -- sending ---------------------------------------------------------------------------

    def _send(self, subject: str, data: bytes) -> None:
        """Queue a message for the bus; one task per loop iteration publishes the queue."""
        if self._nc is None:
            self.stats.dropped += 1
            return
        self._outbox.append((subject, data))
        if not self._sending:
            self._sending = True
            asyncio.get_running_loop().create_task(self._send_outbox())

    async def _send_outbox(self) -> None:
        batch, self._outbox = self._outbox, []
        self._sending = False
        nc = self._nc
        if nc is None:
            self.stats.dropped += len(batch)
            return
        for subject, data in batch:
            try:
                await nc.publish(subject, data)
            except Exception as exc:
                # Durable events reach the others from the log once the bus is back.
                self.stats.dropped += 1
                log.debug("bus publish dropped: %s", exc)
            else:
                self.stats.published += 1

    # -- receiving -------------------------------------------------------------------------

    def on_message(self, subject: str, data: bytes) -> None:
        """An event from another node (called synchronously by the client)."""
        ev = decode_event(data)
        if ev is None or subject_of(self._prefix, ev.topic) != subject:
            self.stats.bad_messages += 1
            return
        self.stats.received += 1
        self.stats.observe_lag(max(0.0, time.time() - ev.ts_ms / 1000))
        prepared = Prepared(ev.topic, ev.event, ev.offset, ev.json)
        if ev.offset is None:
            self.hub.publish(prepared)
        else:
            self._deliver(prepared)

    def _deliver(self, prepared: Prepared) -> None:
        """Hand a durable event to the hub in offset order (see ``core.ordering``)."""
        topic = prepared.topic
        offset = prepared.offset
        assert offset is not None
        ordering = self._ordering
        if not ordering.is_followed(topic):
            waiting = self._waiting.get(topic)
            if waiting is not None:
                waiting.append(prepared)
                return
            if not self.hub.has_interest(topic):
                return
            # Reached through a pattern: ordered from the first event seen.
            ordering.follow(topic, offset - 1)
        hub = self.hub
        for ready in ordering.offer(topic, offset, prepared, time.monotonic()):
            hub.publish(ready)

    def _release_waiting(self, topic: str) -> None:
        for prepared in self._waiting.pop(topic, ()):
            self._deliver(prepared)

    # -- interest --------------------------------------------------------------------------

    def _add_follow(self, subject: str) -> _Follow:
        follow = _Follow(asyncio.get_running_loop())
        self._follows[subject] = follow
        if self._nc is not None and self._connected:
            self._subscribe(subject, follow)
            asyncio.get_running_loop().create_task(self._confirm(follow))
        else:
            # The bus is down: the log stands in for it until it is back.
            follow.ready.set_result(None)
        return follow

    def _subscribe(self, subject: str, follow: _Follow) -> None:
        nc = self._nc
        assert nc is not None
        nc._sid += 1
        sub = _LeanSub(nc._sid, subject, self)
        # nats-py reads only the record's attributes (see _LeanSub); it is not a Subscription.
        record = cast("Subscription", sub)
        nc._subs[sub._id] = record
        follow.sub = sub
        asyncio.get_running_loop().create_task(nc._send_subscribe(record))

    async def _confirm(self, follow: _Follow) -> None:
        nc = self._nc
        try:
            if nc is not None:
                await nc.flush(timeout=max(1, int(self.state.config.cluster.connect_timeout_s)))
        except Exception as exc:
            log.debug("bus flush after subscribe: %s", exc)
        if not follow.ready.done():
            follow.ready.set_result(None)

    def _interest(self, pattern: str, present: bool) -> None:
        """The hub's first subscriber of ``pattern`` came, or its last left."""
        if present:
            return
        subject = (
            pattern_subject(self._prefix, pattern)
            if is_pattern(pattern)
            else subject_of(self._prefix, pattern)
        )
        follow = self._follows.pop(subject, None)
        if follow is not None and follow.sub is not None and self._nc is not None:
            nc = self._nc
            sid = follow.sub._id
            nc._remove_sub(sid)
            asyncio.get_running_loop().create_task(self._unsubscribe(nc, sid))
        hub = self.hub
        if is_pattern(pattern):
            for topic in list(self._ordering.positions()):
                if matches(pattern, topic) and not hub.has_interest(topic):
                    self._ordering.unfollow(topic)
        else:
            self._waiting.pop(pattern, None)
            if not hub.has_interest(pattern):
                self._ordering.unfollow(pattern)

    async def _unsubscribe(self, nc: Nats, sid: int) -> None:
        try:
            await nc._send_unsubscribe(sid)
        except Exception as exc:
            log.debug("bus unsubscribe: %s", exc)

    # -- the log stands in for the bus -----------------------------------------------------

    async def _fill_gaps(self) -> None:
        """Read from the log the offsets a followed topic has waited for too long."""
        while True:
            wait = self.state.config.cluster.gap_wait_ms / 1000
            await asyncio.sleep(max(wait / 2, 0.005))
            for gap in self._ordering.gaps(time.monotonic(), wait):
                if gap.topic not in self._filling:
                    self._filling.add(gap.topic)
                    asyncio.get_running_loop().create_task(
                        self._fill(gap.topic, gap.after, gap.upto)
                    )

    async def _fill(self, topic: str, after: int, upto: int) -> None:
        try:
            n = await self._read_range(topic, after, upto - after)
        finally:
            self._filling.discard(topic)
        self.stats.gaps_filled += 1
        self.stats.gap_events += n

    async def _read_range(self, topic: str, after: int, limit: int) -> int:
        """Offer the log's events of ``topic`` after ``after`` (at most ``limit``)."""
        limit = max(1, min(limit, self.state.config.realtime.replay_max_events))
        try:
            replay = await self.eventlog.read(topic, after, limit)
        except Exception as exc:
            log.debug("reading %s after %d for the bus failed: %s", topic, after, exc)
            return 0
        ordering = self._ordering
        if not ordering.is_followed(topic):
            return 0
        hub = self.hub
        now = time.monotonic()
        if replay.first > after + 1:
            # Retention trimmed what was missing: nobody can have it any more.
            for ready in ordering.skip_to(topic, replay.first):
                hub.publish(ready)
        for ev in replay.events:
            for ready in ordering.offer(topic, ev.offset, Prepared.stored(ev), now):
                hub.publish(ready)
        return len(replay.events)

    async def _read_after(self, topic: str, why: str) -> int:
        """Offer every event of ``topic`` the log has past what was delivered, page by page."""
        total = 0
        page = self.state.config.realtime.replay_max_events
        while True:
            delivered = self._ordering.delivered(topic)
            if delivered is None:
                return total
            n = await self._read_range(topic, delivered, page)
            total += n
            if n < page:
                if total:
                    log.debug("%s brought %d events of %s from the log", why, total, topic)
                return total

    async def _catch_up(self, why: str) -> None:
        self.stats.catch_ups += 1
        for topic in list(self._ordering.positions()):
            await self._read_after(topic, why)

    async def _check_tails(self) -> None:
        """Find events the log has and the bus never brought, at no cost while none is
        missing: one query for the heads of every followed topic per ``tail_check_s``;
        a topic whose head of the previous check has still not been delivered is read.
        (A gap behind a later event is found by ``_fill_gaps``; this finds a topic's
        newest events when nothing came after them.)
        """
        seen: dict[str, int] = {}
        while True:
            every = self.state.config.cluster.tail_check_s
            await asyncio.sleep(every if every > 0 else 1.0)
            if every <= 0 or not self._connected:
                seen.clear()  # while degraded, the polling reads everything anyway
                continue
            positions = self._ordering.positions()
            behind = [t for t, head in seen.items() if positions.get(t, head) < head]
            for topic in behind:
                self.stats.tail_reads += 1
                await self._read_after(topic, "tail check")
            topics = list(positions)
            seen = {}
            for start in range(0, len(topics), _HEADS_PER_QUERY):
                part = topics[start : start + _HEADS_PER_QUERY]
                heads = await self.eventlog.heads(part)
                now = self._ordering.positions()
                seen.update((t, h) for t, h in heads.items() if now.get(t, h) < h)

    async def _poll_while_degraded(self) -> None:
        while True:
            await asyncio.sleep(self.state.config.cluster.degraded_poll_s)
            if not self._connected:
                await self._catch_up("bus degraded")

    # -- heartbeats and presence -----------------------------------------------------------

    async def _heartbeats(self) -> None:
        while True:
            nc = self._nc
            if nc is not None and self._connected:
                try:
                    await nc.publish(f"{self._prefix}.nodes", self.node.encode())
                except Exception as exc:
                    log.debug("heartbeat: %s", exc)
            await asyncio.sleep(self.state.config.cluster.heartbeat_s)

    async def _on_heartbeat(self, msg: Msg) -> None:
        node = msg.data.decode(errors="replace")
        if node and node != self.node:
            self._peers[node] = time.monotonic()

    async def _on_presence_query(self, msg: Msg) -> None:
        nc = self._nc
        if nc is None or not msg.reply:
            return
        topic = msg.data.decode(errors="replace")
        answer = f"{self.node}\n{self.hub.subscriber_count(topic)}".encode()
        try:
            await nc.publish(msg.reply, answer)
        except Exception as exc:
            log.debug("presence answer: %s", exc)


def _covers(pattern: str, subject: str) -> bool:
    """Whether a NATS subject with wildcards matches a literal subject."""
    want = pattern.split(".")
    have = subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i
        if i >= len(have) or (token != "*" and token != have[i]):
            return False
    return len(have) == len(want)
