"""picows subscriber helpers for the benchmarks that read events in Python.

The fan-out driver's hot-path clients (``bench/fanout/clients.py``) and the C client do
their own framing; the publish, harness-flow and pipelined-publish benchmarks only need
each text frame with its arrival time, and a way to send a command.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from picows import WSFrame, WSListener, WSMsgType, WSTransport


class TextListener(WSListener):
    """Keeps its transport and hands every text frame to ``on_text`` with the
    ``time.monotonic_ns()`` at which picows delivered it."""

    def __init__(self) -> None:
        super().__init__()
        self.transport: WSTransport | None = None

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type is not WSMsgType.TEXT:
            return
        self.on_text(frame.get_payload_as_bytes(), time.monotonic_ns())

    def on_text(self, raw: bytes, now_ns: int) -> None:
        """One text frame (a reply or an event)."""

    def send_text(self, payload: bytes) -> None:
        """Send one text frame."""
        assert self.transport is not None
        self.transport.send(WSMsgType.TEXT, payload)

    def send_json(self, command: dict[str, Any]) -> None:
        """Send a command object (contract section 4)."""
        self.send_text(json.dumps(command).encode())

    def subscribe(self, topics: Sequence[str], rid: str | int) -> None:
        """Send ``{"action":"subscribe","topics":[...],"id":...}``."""
        self.send_json({"action": "subscribe", "topics": list(topics), "id": rid})

    def unsubscribe(self, topics: Sequence[str]) -> None:
        """Send ``{"action":"unsubscribe","topics":[...]}``."""
        self.send_json({"action": "unsubscribe", "topics": list(topics)})
