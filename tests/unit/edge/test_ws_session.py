"""The WebSocket session's command handling over a fake transport and a fake realtime
service: no sockets, a real hub on a real event loop.

Every reply the session writes is decoded from the bytes it handed its transport, so these
tests see exactly what a client would.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from typing import Any, cast

import msgspec

from etherd.core.auth import Principal, Role
from etherd.core.config import Config
from etherd.core.errors import PEER_GONE, Refusal
from etherd.core.events import StoredEvent
from etherd.core.hub import Hub, Prepared
from etherd.core.wire import event_json
from etherd.edge.ws.session import Session
from etherd.services.eventlog import Resumed
from etherd.services.realtime import Realtime
from etherd.services.state import Connections


class FakeTransport:
    """What the session uses of an asyncio transport."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.protocol: object = None
        self.closing = False
        self.aborted = False

    def set_protocol(self, protocol: object) -> None:
        self.protocol = protocol

    def write(self, data: bytes) -> None:
        assert not self.closing, "write after close"
        self.data += data

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: object = None) -> object:
        # No socket: the fan-out's C loop must send through ``write``.
        return default

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = self.aborted = True

    @property
    def close_sent(self) -> tuple[int, bytes] | None:
        """The CLOSE frame the server wrote, if any (after every other frame)."""
        at = self.data.rfind(b"\x88")
        if at < 0:
            return None
        n = self.data[at + 1]
        payload = bytes(self.data[at + 2 : at + 2 + n])
        return int.from_bytes(payload[:2], "big"), payload[2:]


class FakeRealtime:
    """A realtime service with stored events in memory and a list of forbidden topics."""

    def __init__(self, cfg: Config, loop: asyncio.AbstractEventLoop) -> None:
        self.config = cfg
        self.connections = Connections()
        self.hub = Hub(loop.call_soon, 1000)
        self.epoch = "e1"
        self.forbidden: set[str] = set()
        self.log: dict[str, list[StoredEvent]] = {}
        self.gate: asyncio.Event | None = None

    async def authorize(self, principal: Principal, topic: str) -> str | None:
        if self.gate is not None:
            await self.gate.wait()
        return "not yours" if topic in self.forbidden else None

    async def head(self, topic: str) -> int:
        events = self.log.get(topic, [])
        return events[-1].offset if events else 0

    async def follow(self, topic: str) -> int:
        return await self.head(topic)

    async def follow_pattern(self, pattern: str) -> None:
        return None

    async def resume(self, topic: str, after: int, epoch: str | None) -> Resumed:
        events = [e for e in self.log.get(topic, []) if e.offset > after]
        return Resumed(await self.head(topic), True, events)

    def replay_refused(self, kind: str) -> Refusal | None:
        return None

    async def replay(
        self, sink: Session, topic: str, after: int, head: int, first: list[StoredEvent]
    ) -> None:
        # The whole replay is the first piece here (``resume`` reads everything).
        last = self.hub.replay_page(sink, after, first)
        if await sink.taken():
            self.hub.release(sink, topic, last)

    def store(self, topic: str, n: int) -> list[StoredEvent]:
        events = self.log.setdefault(topic, [])
        new = [
            StoredEvent(topic, len(events) + i + 1, 0, "note", b'{"n":%d}' % (len(events) + i + 1))
            for i in range(n)
        ]
        events.extend(new)
        return new


def frames(data: bytes) -> Iterator[dict[str, Any]]:
    """Decode the unmasked server TEXT frames in ``data``."""
    i = 0
    while i < len(data):
        assert data[i] == 0x81, data[i:]
        n = data[i + 1]
        i += 2
        if n == 126:
            n = int.from_bytes(data[i : i + 2], "big")
            i += 2
        elif n == 127:
            n = int.from_bytes(data[i : i + 8], "big")
            i += 8
        yield json.loads(data[i : i + n])
        i += n


class Client:
    """A session, its transport and its realtime service, driven by hand."""

    def __init__(self, cfg: Config | None = None) -> None:
        loop = asyncio.get_running_loop()
        self.realtime = FakeRealtime(cfg or Config(), loop)
        self.transport = FakeTransport()
        principal = Principal(sub="u1", role=Role.ADMIN)
        self.session = Session(cast(Realtime, self.realtime), principal, "peer")
        self.session.accept(self.transport, "dGhlIHNhbXBsZSBub25jZQ==", b"")  # type: ignore[arg-type]
        head = bytes(self.transport.data)
        # RFC 6455 section 1.3's own example key and answer.
        assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n" in head
        self.read = len(head)

    def send(self, message: object) -> None:
        payload = message if isinstance(message, bytes) else json.dumps(message).encode()
        self.session.on_message(True, payload)

    async def received(self) -> list[dict[str, Any]]:
        for _ in range(10):
            await asyncio.sleep(0)
        data = bytes(self.transport.data)
        new = data[self.read :]
        self.read = len(data)
        return list(frames(new))


def run(test: Any) -> Any:
    return asyncio.run(test())


def test_ping_and_bad_messages_are_answered_and_the_session_stays() -> None:
    async def go() -> list[dict[str, Any]]:
        c = Client()
        c.send({"action": "ping", "id": 7})
        c.send(b"{not json")
        c.send({"action": "subscribe", "topics": "x", "id": "s1"})
        c.send({"action": "dance", "id": 3})
        assert c.transport.close_sent is None
        return await c.received()

    pong, not_json, bad_shape, unknown = run(go)
    assert pong == {"type": "pong", "id": 7}
    assert (not_json["type"], not_json["code"], not_json["id"]) == ("error", "bad_request", None)
    assert "not JSON" in not_json["message"]
    assert (bad_shape["code"], bad_shape["id"]) == ("bad_request", "s1")
    assert "$.topics" in bad_shape["message"]
    assert (unknown["code"], unknown["id"]) == ("bad_request", 3)


def test_every_write_of_the_session_makes_the_fan_out_ask_the_transport_again() -> None:
    # The fan-out's C loop writes past the transport only while ``drained_fd`` is set; a
    # write through the transport may leave bytes in it, which nothing may overtake.
    async def go() -> None:
        c = Client()
        s = c.session
        writes: list[Callable[[], object]] = [
            lambda: s.ping(0.0),
            lambda: s.write(b"frames"),
            lambda: s.send_text(b"{}"),
            lambda: c.send({"action": "ping", "id": 1}),
            lambda: s.data_received(b"\x89\x80\x00\x00\x00\x00"),  # a masked PING
        ]
        for write in writes:
            s.drained_fd = 5
            write()
            for _ in range(5):  # the reply to a command leaves with the hub's flush
                await asyncio.sleep(0)
            assert s.drained_fd == -1
        s.drained_fd = 5
        s.close(PEER_GONE)
        assert s.drained_fd == -1 and s.fd == -1

    run(go)


def test_binary_message_closes_1003() -> None:
    async def go() -> tuple[int, bytes] | None:
        c = Client()
        c.session.on_message(False, b"\x00")
        return c.transport.close_sent

    sent = run(go)
    assert sent is not None and sent[0] == 1003


def test_subscribe_acks_every_topic_and_lists_refusals() -> None:
    async def go() -> tuple[dict[str, Any], int]:
        c = Client()
        c.realtime.store("t/a", 3)
        c.realtime.forbidden.add("t/secret")
        c.send({"action": "subscribe", "topics": ["t/a", "t/secret", "bad topic"], "id": "1"})
        (ack,) = await c.received()
        return ack, c.realtime.hub.subscription_count

    ack, subscriptions = run(go)
    assert ack["type"] == "subscribed" and ack["id"] == "1"
    assert ack["topics"] == [{"topic": "t/a", "offset": 3, "epoch": "e1", "recovered": True}]
    assert {(e["topic"], e["code"]) for e in ack["errors"]} == {
        ("t/secret", "forbidden"),
        ("bad topic", "bad_topic"),
    }
    assert subscriptions == 1


def test_resume_replays_then_goes_live_without_duplicates() -> None:
    async def go() -> list[dict[str, Any]]:
        c = Client()
        c.realtime.store("t/a", 5)
        c.send({"action": "subscribe", "topics": ["t/a"], "since": {"t/a": 2}, "id": "r"})
        # A live event committed while the replay is read: offset 5 is in the replay too.
        for ev in c.realtime.log["t/a"][3:]:
            c.realtime.hub.publish(Prepared.stored(ev))
        (live,) = c.realtime.store("t/a", 1)
        c.realtime.hub.publish(Prepared.stored(live))
        return await c.received()

    ack, *events = run(go)
    assert ack["type"] == "subscribed"
    assert [e["offset"] for e in events] == [3, 4, 5, 6]


def test_commands_wait_behind_a_subscribe_up_to_the_limit() -> None:
    async def go() -> list[dict[str, Any]]:
        c = Client(msgspec.convert({"ws": {"max_queued_commands": 2}}, Config))
        c.realtime.gate = asyncio.Event()
        c.send({"action": "subscribe", "topics": ["t/a"], "id": "s"})
        for n in range(3):
            c.send({"action": "ping", "id": n})
        early = await c.received()
        c.realtime.gate.set()
        return early + await c.received()

    refused, ack, first, second = run(go)
    # The third ping found two already waiting; the others are answered in order after the ack.
    assert (refused["code"], refused["id"]) == ("rate_limited", 2)
    assert "ws.max_queued_commands" in refused["message"]
    assert (ack["type"], first, second) == (
        "subscribed",
        {"type": "pong", "id": 0},
        {"type": "pong", "id": 1},
    )


def test_topic_limit_refuses_per_topic() -> None:
    async def go() -> dict[str, Any]:
        c = Client(msgspec.convert({"ws": {"max_topics_per_connection": 2}}, Config))
        c.send({"action": "subscribe", "topics": ["t/1", "t/2", "t/3"], "id": "l"})
        (ack,) = await c.received()
        return ack

    ack = run(go)
    assert [t["topic"] for t in ack["topics"]] == ["t/1", "t/2"]
    assert [(e["topic"], e["code"]) for e in ack["errors"]] == [("t/3", "limit")]


def test_unsubscribe_removes_only_what_was_held() -> None:
    async def go() -> tuple[dict[str, Any], int]:
        c = Client()
        c.send({"action": "subscribe", "topics": ["t/1", "t/2"]})
        await c.received()
        c.send({"action": "unsubscribe", "topics": ["t/1", "t/9"], "id": "u"})
        (reply,) = await c.received()
        return reply, c.realtime.hub.subscription_count

    reply, left = run(go)
    assert reply == {"type": "unsubscribed", "id": "u", "topics": ["t/1"]}
    assert left == 1


def test_closing_drops_every_subscription_and_the_registration() -> None:
    async def go() -> tuple[bool, int, int]:
        c = Client()
        c.send({"action": "subscribe", "topics": ["t/1", "t/2"]})
        await c.received()
        registered = c.session in c.realtime.connections.sessions
        c.session.connection_lost(None)
        return registered, c.realtime.hub.subscription_count, len(c.realtime.connections.sessions)

    assert run(go) == (True, 0, 0)


def test_events_are_framed_once_and_coalesced_per_tick() -> None:
    async def go() -> list[dict[str, Any]]:
        c = Client()
        c.send({"action": "subscribe", "topics": ["t/a"]})
        await c.received()
        for n in (1, 2):
            body = event_json("t/a", "note", n, 0, b'{"n":%d}' % n)
            c.realtime.hub.publish(Prepared("t/a", "note", n, body))
        return await c.received()

    events = run(go)
    assert [(e["topic"], e["offset"], e["n"]) for e in events] == [("t/a", 1, 1), ("t/a", 2, 2)]
