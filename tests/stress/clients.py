"""Subscribers that check what they receive, publishers that record what they were told,
and readings of the server process from /proc."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

from etherd.client.api import Client

_decode = msgspec.json.Decoder().decode


def rss_kb(pid: int) -> int:
    """VmRSS of a process in kB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def fd_count(pid: int) -> int:
    """Open descriptors of a process."""
    return len(os.listdir(f"/proc/{pid}/fd"))


@dataclass
class Tally:
    """Violations and counts summed over many tracked subscribers."""

    events: int = 0
    gaps: int = 0
    duplicates: int = 0
    unrecovered: int = 0
    errors: list[Any] = field(default_factory=list)
    reconnects: int = 0


class Tracked:
    """A logical subscriber across reconnections: the last offset of each topic, checked
    to grow by exactly one per event, resumed with ``since`` and the first ack's epoch."""

    def __init__(
        self, url: str, topics: Sequence[str], tally: Tally, *, keep: bool = False
    ) -> None:
        self.url = url
        self.keep = keep
        # With ``keep``: every (topic, offset) received, in order, and every ack entry.
        self.seen: list[tuple[str, int]] = []
        self.acks: list[dict[str, Any]] = []
        self.topics = list(topics)
        self.tally = tally
        self.last: dict[str, int] = dict.fromkeys(self.topics, 0)
        self.epoch: str | None = None
        self.generation = 0
        self.transport: WSTransport | None = None
        self._acked: asyncio.Future[None] | None = None

    async def connect(self, since: dict[str, int] | None = None, epoch: str | None = None) -> None:
        """Connect and subscribe with ``since`` (default: the last offsets seen) and
        ``epoch`` (default: the first ack's); wait for the ack."""
        self.generation += 1
        gen = self.generation
        self._acked = asyncio.get_running_loop().create_future()
        transport, _ = await ws_connect(lambda: _Conn(self, gen), self.url)
        self.transport = transport
        command: dict[str, Any] = {"action": "subscribe", "topics": self.topics}
        command["since"] = dict(self.last) if since is None else since
        if (epoch or self.epoch) is not None:
            command["epoch"] = epoch or self.epoch
        transport.send(WSMsgType.TEXT, msgspec.json.encode(command))
        await asyncio.wait_for(self._acked, 30)

    def drop(self, graceful: bool) -> None:
        """Leave the connection (with a CLOSE or abruptly); its later frames are ignored."""
        self.generation += 1
        transport, self.transport = self.transport, None
        if transport is not None:
            if graceful:
                with contextlib.suppress(Exception):
                    transport.send_close(WSCloseCode.OK)
            transport.disconnect()

    async def reconnect(self, graceful: bool) -> None:
        """Drop and resume, counting the reconnection."""
        self.drop(graceful)
        await self.connect()
        self.tally.reconnects += 1

    def behind(self, heads: dict[str, int]) -> bool:
        """Whether some topic is not yet at ``heads``."""
        return any(self.last[t] < heads.get(t, 0) for t in self.topics)

    def on_message(self, msg: dict[str, Any]) -> None:
        """One decoded frame of the current connection: an ack, an error or an event."""
        kind = msg.get("type")
        if kind == "subscribed":
            for entry in msg["topics"]:
                if self.keep:
                    self.acks.append(entry)
                if self.epoch is None:
                    self.epoch = entry["epoch"]
                if entry.get("recovered") is False:
                    self.tally.unrecovered += 1
            if msg.get("errors"):
                self.tally.errors.append(msg["errors"])
            if self._acked is not None and not self._acked.done():
                self._acked.set_result(None)
            return
        if kind == "error":
            self.tally.errors.append(msg)
            return
        topic, offset = msg.get("topic"), msg.get("offset")
        if not isinstance(topic, str) or topic not in self.last or not isinstance(offset, int):
            return
        if self.keep:
            self.seen.append((topic, offset))
        last = self.last[topic]
        if offset <= last:
            self.tally.duplicates += 1
            return
        if offset != last + 1:
            self.tally.gaps += 1
        self.last[topic] = offset
        self.tally.events += 1


class _Conn(WSListener):
    def __init__(self, owner: Tracked, generation: int) -> None:
        super().__init__()
        self.owner = owner
        self.generation = generation

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type is WSMsgType.TEXT and self.generation == self.owner.generation:
            self.owner.on_message(_decode(frame.get_payload_as_bytes()))


async def wait_caught_up(subs: Sequence[Tracked], heads: dict[str, int], limit_s: float) -> int:
    """Wait until every subscriber reached ``heads``; how many had not by ``limit_s``."""
    deadline = time.monotonic() + limit_s
    while True:
        behind = sum(1 for s in subs if s.behind(heads))
        if behind == 0 or time.monotonic() > deadline:
            return behind
        await asyncio.sleep(0.05)


@dataclass
class Heads:
    """Offsets publishers were answered, by topic."""

    offsets: dict[str, list[int]] = field(default_factory=dict)

    def add(self, topic: str, offset: int | None) -> None:
        """Record an answered offset."""
        assert offset is not None, "a durable publish was answered without an offset"
        self.offsets.setdefault(topic, []).append(offset)

    def heads(self) -> dict[str, int]:
        """The newest offset of each topic."""
        return {t: max(v) for t, v in self.offsets.items()}

    def total(self) -> int:
        """How many publishes were answered."""
        return sum(len(v) for v in self.offsets.values())


async def publish_stream(
    base: str, topics: Sequence[str], heads: Heads, stop: asyncio.Event, batch: int = 10
) -> None:
    """HTTP batches of ``batch`` events on random topics until ``stop``, one in flight."""
    rng = random.Random()
    async with Client(base, "test") as client:
        while not stop.is_set():
            events = [
                {"topic": rng.choice(topics), "event": "storm", "data": {"n": i}}
                for i in range(batch)
            ]
            for done in await client.publish_many(events):
                heads.add(done.topic, done.offset)
            await asyncio.sleep(0.01)


class WsPublisher(WSListener):
    """Sends ``publish`` actions and records each ``published`` reply's offset."""

    def __init__(self) -> None:
        super().__init__()
        self.transport: WSTransport | None = None
        self.replies: list[dict[str, Any]] = []
        self.sent = 0
        self.done = asyncio.Event()

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type is WSMsgType.TEXT:
            self.replies.append(_decode(frame.get_payload_as_bytes()))
            if len(self.replies) >= self.sent:
                self.done.set()

    def publish(self, topic: str, data: dict[str, Any]) -> None:
        """Send one ``publish`` action (the reply arrives in ``replies``)."""
        assert self.transport is not None
        self.sent += 1
        self.done.clear()
        command: dict[str, Any] = {"action": "publish", "topic": topic, "event": "ws"}
        command.update(data=data, id=self.sent)
        self.transport.send(WSMsgType.TEXT, msgspec.json.encode(command))


async def ws_publisher(url: str) -> tuple[WSTransport, WsPublisher]:
    """A connected ``WsPublisher``."""
    transport, listener = await ws_connect(WsPublisher, url)
    assert isinstance(listener, WsPublisher)
    return transport, listener
