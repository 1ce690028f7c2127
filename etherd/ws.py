"""The WebSocket session on picows: the hand-off, protocol hygiene, and the command loop.

picows parses frames in C but leaves several RFC 6455 duties to the application; the
``Framing`` base class does them for every session: it reassembles fragmented messages,
validates UTF-8 incrementally (so a bad byte closes the session at once with 1007, not at
the end of the message), refuses RSV bits (no extension is negotiated), caps message size
(1009), answers CLOSE with the peer's code and refuses reserved codes that picows lets
through (0, 1004-1006, 1015, 1016-2999, 5000 and up).

``Session`` turns messages into commands (subscribe, unsubscribe, ping) and is a hub sink:
the hub queues encoded frames on ``pending`` and calls ``write`` once per loop iteration.
``Echo`` returns what it receives; it exists only for the Autobahn conformance suite and is
off unless ``ws.echo_path`` is set.
"""

from __future__ import annotations

import asyncio
import codecs
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from picows import WSAutoPingStrategy, WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport
from picows.picows import WSProtocol  # type: ignore[attr-defined]

from etherd.errors import (
    CLOSE_INVALID_PAYLOAD,
    CLOSE_MESSAGE_TOO_BIG,
    CLOSE_PROTOCOL_ERROR,
    CLOSE_SLOW_CONSUMER,
    CLOSE_UNSUPPORTED_DATA,
    valid_close_code,
)
from etherd.hub import KIND_WS, Resuming, Segment

if TYPE_CHECKING:
    from etherd.http import Request

__all__ = ["Echo", "Framing", "handoff"]

log = logging.getLogger("etherd.ws")
# An adapter, not a Logger: given a Logger, picows makes a child logger per connection,
# about 0.5 KB each for as long as the connection lives.
_picows_log = logging.LoggerAdapter(logging.getLogger("picows.server"), {})

# picows keeps a 2 KiB read buffer minimum; subscribers send little, so that is enough and
# keeps 10,000 idle connections small.
READ_BUFFER_BYTES: Final = 2048
HANDSHAKE_TIMEOUT_S: Final = 5.0
# Seconds a session closed by the server may take to flush before the socket is cut.
CLOSE_GRACE_S: Final = 2.0


def _abort(transport: WSTransport) -> None:
    if not transport.is_disconnected:
        transport.disconnect(graceful=False)


def handoff(
    transport: asyncio.Transport,
    request: Request,
    tail: bytes,
    listener: WSListener,
    *,
    max_frame_bytes: int,
) -> None:
    """Give an authorised upgrade request's connection to picows.

    Browsers send ``Connection: keep-alive, Upgrade`` and picows accepts only
    ``Connection: Upgrade``, so picows is fed a canonical request holding just what the
    handshake needs, followed by any bytes the client sent after its request. picows then
    checks the key and version, answers 101 and parses frames from then on.

    The ``WSProtocol`` constructor is internal to picows: the version is pinned exactly and
    the integration tests perform real upgrades through this function.
    """
    headers = request.headers
    canonical = b"".join(
        (
            b"GET / HTTP/1.1\r\nHost: ",
            headers.get("host", "-").encode("latin-1"),
            b"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: ",
            headers.get("sec-websocket-version", "").encode("latin-1"),
            b"\r\nSec-WebSocket-Key: ",
            headers.get("sec-websocket-key", "").encode("latin-1"),
            b"\r\n\r\n",
            tail,
        )
    )
    protocol = WSProtocol(
        None,
        None,
        False,
        lambda _request: listener,
        _picows_log,
        True,  # disconnect_on_exception
        # The whole handshake is fed in below, so picows never waits for it.
        HANDSHAKE_TIMEOUT_S,
        False,  # auto-ping: the server's sweep pings idle sessions instead of a task each
        20.0,
        10.0,
        WSAutoPingStrategy.PING_WHEN_IDLE,
        True,  # auto-pong
        max_frame_bytes,
        None,
        READ_BUFFER_BYTES,
    )
    # uvloop keeps the previous protocol's data_received when it switches to a buffered
    # protocol; passing through a bare Protocol lets the HTTP connection object, its parser
    # and its queue go (about 2 KB for every WebSocket).
    transport.set_protocol(asyncio.Protocol())
    transport.set_protocol(protocol)
    protocol.connection_made(transport)
    view = memoryview(canonical)
    while view:
        buf = protocol.get_buffer(-1)
        n = min(len(buf), len(view))
        buf[:n] = view[:n]
        view = view[n:]
        protocol.buffer_updated(n)


class Framing(WSListener):
    """RFC 6455 duties picows leaves to the application; subclasses get whole messages."""

    def __init__(self, max_message_bytes: int) -> None:
        super().__init__()
        self.transport: WSTransport | None = None
        self._max_message = max_message_bytes
        self._frag: bytearray | None = None
        self._frag_text = False
        self._decoder: codecs.IncrementalDecoder | None = None
        self.closed = False
        # Set on any frame; the ping sweep clears it and pings sessions that stayed silent.
        self.seen = True
        self.ping_sent_at: float | None = None

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if self.closed:
            # Our CLOSE is out; the peer's CLOSE completes the handshake (RFC 6455 7.1.1).
            if frame.msg_type == WSMsgType.CLOSE:
                transport.disconnect()
            return
        self.seen = True
        op = frame.msg_type
        if frame.rsv1 or frame.rsv2 or frame.rsv3:
            self.close(CLOSE_PROTOCOL_ERROR, "reserved bits are set but no extension was agreed")
            return
        if op == WSMsgType.TEXT or op == WSMsgType.BINARY:
            if self._frag is not None:
                self.close(CLOSE_PROTOCOL_ERROR, "new message started before the last one ended")
                return
            if frame.payload_size > self._max_message:
                self._too_big(frame.payload_size)
                return
            if frame.fin:
                payload = frame.get_payload_as_bytes()
                if op == WSMsgType.TEXT:
                    try:
                        payload.decode("utf-8")
                    except UnicodeDecodeError:
                        self.close(CLOSE_INVALID_PAYLOAD, "text message is not valid UTF-8")
                        return
                self.on_message(op == WSMsgType.TEXT, payload)
                return
            self._frag = bytearray()
            self._frag_text = op == WSMsgType.TEXT
            self._decoder = codecs.getincrementaldecoder("utf-8")() if self._frag_text else None
            self._continue(frame)
        elif op == WSMsgType.CONTINUATION:
            if self._frag is None:
                self.close(CLOSE_PROTOCOL_ERROR, "continuation frame without a message to continue")
                return
            self._continue(frame)
        elif op == WSMsgType.CLOSE:
            self._on_close(frame)
        elif op == WSMsgType.PONG:
            self.ping_sent_at = None

    def _continue(self, frame: WSFrame) -> None:
        frag = self._frag
        assert frag is not None
        chunk = frame.get_payload_as_bytes()
        if len(frag) + len(chunk) > self._max_message:
            self._too_big(len(frag) + len(chunk))
            return
        frag += chunk
        if self._decoder is not None:
            try:
                self._decoder.decode(chunk, final=bool(frame.fin))
            except UnicodeDecodeError:
                self.close(CLOSE_INVALID_PAYLOAD, "text message is not valid UTF-8")
                return
        if frame.fin:
            payload = bytes(frag)
            self._frag = None
            self._decoder = None
            self.on_message(self._frag_text, payload)

    def _too_big(self, size: int) -> None:
        self.close(
            CLOSE_MESSAGE_TOO_BIG,
            f"message of {size} bytes exceeds {self._max_message} (ws.max_message_bytes)",
        )

    def _on_close(self, frame: WSFrame) -> None:
        size = frame.payload_size
        if size == 0:
            self.close(1000, "", peer_closed=True)
            return
        code = int(frame.get_close_code())  # type: ignore[call-overload]
        if not valid_close_code(code):
            self.close(CLOSE_PROTOCOL_ERROR, f"close code {code} may not be sent by a peer")
            return
        # picows already refused a reason that is not UTF-8 (1007). Echo the peer's code.
        self.close(code, "", peer_closed=True)

    def is_closed(self) -> bool:
        """Whether the session has ended (a method, so it is re-read after an await)."""
        return self.closed

    def close(self, code: int, reason: str, *, peer_closed: bool = False) -> None:
        """Send CLOSE with a code and reason (at most 123 bytes) and end the session.

        When the peer closed first, the TCP connection is closed at once. Otherwise the
        peer's CLOSE is awaited, so the socket is not closed under data still arriving
        (which would turn into a reset that can destroy our CLOSE before it is read), and
        the connection is cut after ``CLOSE_GRACE_S``: a peer that stopped reading would
        otherwise hold the socket and the bytes queued on it forever.
        """
        if self.closed:
            return
        self.closed = True
        transport = self.transport
        if transport is None:
            return
        data = reason.encode()[:123]
        transport.send_close(WSCloseCode(code), data)
        if peer_closed:
            transport.disconnect()
        asyncio.get_running_loop().call_later(CLOSE_GRACE_S, _abort, transport)
        self.on_closed()

    def on_message(self, text: bool, payload: bytes) -> None:
        """A whole message arrived (text already checked as UTF-8)."""
        raise NotImplementedError

    def on_closed(self) -> None:
        """The session ended or is ending; drop what it holds. Idempotent."""

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.closed = True
        self.on_closed()


class Echo(Framing):
    """Sends back each message as it came: the conformance suite's peer, never in production."""

    def on_message(self, text: bool, payload: bytes) -> None:
        assert self.transport is not None
        self.transport.send(WSMsgType.TEXT if text else WSMsgType.BINARY, payload)


class SessionBase(Framing):
    """A hub sink over a picows transport: coalesced writes and the slow-consumer cap."""

    kind = KIND_WS

    def __init__(self, max_message_bytes: int, max_pending_bytes: int) -> None:
        super().__init__(max_message_bytes)
        self.pending: list[bytes | Segment] = []
        self.resuming: dict[str, Resuming] | None = None
        self.alive = False
        self._max_pending = max_pending_bytes
        self._raw_write: Callable[[bytes], None] | None = None
        self._buffered: Callable[[], int] | None = None
        self.on_slow: Callable[[], None] | None = None

    def __hash__(self) -> int:
        return id(self)

    def on_ws_connected(self, transport: WSTransport) -> None:
        super().on_ws_connected(transport)
        under = transport.underlying_transport
        self._raw_write = under.write
        self._buffered = under.get_write_buffer_size
        self.alive = True

    def write(self, data: bytes) -> None:
        """Write pre-built frames; close with 4008 when the peer cannot keep up."""
        if self.closed or self._raw_write is None or self._buffered is None:
            return
        self._raw_write(data)
        if self._buffered() > self._max_pending:
            self.slow_consumer()

    def slow_consumer(self) -> None:
        """Close a session whose unsent bytes passed the cap; it resumes with ``since``."""
        if self.on_slow is not None:
            self.on_slow()
        self.alive = False
        self.close(CLOSE_SLOW_CONSUMER, "slow consumer; reconnect and resume")

    def on_closed(self) -> None:
        self.alive = False
        self.pending.clear()

    def pause_writing(self) -> None:
        """Transport buffer above its high-water mark: the byte cap in ``write`` decides."""

    def resume_writing(self) -> None:
        """Transport buffer drained below its low-water mark."""


def refuse_binary(session: Framing) -> None:
    """Binary messages carry no command: close with 1003 (unsupported data)."""
    session.close(CLOSE_UNSUPPORTED_DATA, "binary messages are not accepted; send JSON text")


PrincipalT = "Principal"
