"""The server side of a WebSocket connection over an asyncio transport (RFC 6455).

After the HTTP edge has authorised an upgrade, ``WebSocket.accept`` takes the connection
over: it becomes the transport's protocol (the HTTP parser and its buffers are freed),
answers 101 with the accept key, and feeds any bytes that followed the request to the frame
parser (``core.wsproto``). From then on it does what RFC 6455 asks of a server: reassembles
fragmented messages, validates UTF-8 incrementally (a bad byte closes at once with 1007),
caps message size (1009), answers PING with PONG, answers the peer's CLOSE with its code
and refuses codes a peer may not send (0, 1004-1006, 1015, 1016-2999, 5000 and up).
Subclasses get whole messages in ``on_message`` and end the session with ``close``.

Closing (section 7.1.1): when the server closes, it sends CLOSE and waits for the peer's
CLOSE before closing TCP, so the socket is not closed under data still arriving (which
would turn into a reset that can destroy the CLOSE before it is read), and cuts the
connection after ``ws.close_grace_s``: a peer that stopped reading would otherwise hold the
socket and the bytes queued on it forever. When the peer closes first, the server answers
and closes TCP once its answer is written.

Memory: one object with ``__slots__`` per connection and no buffer between messages (the
parser holds bytes only while a frame is incomplete); uvloop reads into a buffer shared by
the whole loop.

``Echo`` returns what it receives; it exists only for the Autobahn conformance suite and is
off unless ``ws.echo_path`` is set.
"""

from __future__ import annotations

import asyncio
import codecs
import logging
from typing import Final

from etherd.core.errors import (
    CLOSE_MESSAGE_TOO_BIG,
    PEER_GONE,
    Disconnect,
    echo_close,
    invalid_utf8,
    message_too_big,
    protocol_error,
    valid_close_code,
)
from etherd.core.frames import ws_text_frame
from etherd.core.wsproto import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    Frame,
    FrameParser,
    accept_key,
    binary_frame,
    close_frame,
    pong_frame,
)

__all__ = ["Echo", "WebSocket"]

log = logging.getLogger("etherd.ws")

_SWITCHING: Final = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: "
)


def _abort(transport: asyncio.Transport) -> None:
    if not transport.is_closing():
        transport.abort()


class WebSocket(asyncio.Protocol):
    """One WebSocket connection's framing (see the module docstring)."""

    __slots__ = (
        "_close_grace",
        "_decoder",
        "_frag",
        "_frag_text",
        "_max_message",
        "_parser",
        "closed",
        "drained_fd",
        "paused",
        "ping_sent_at",
        "seen",
        "transport",
    )

    def __init__(self, max_message_bytes: int, close_grace_s: float) -> None:
        self.transport: asyncio.Transport | None = None
        self._max_message = max_message_bytes
        self._close_grace = close_grace_s
        self._parser = FrameParser(max_message_bytes)
        self._frag: bytearray | None = None
        self._frag_text = False
        self._decoder: codecs.IncrementalDecoder | None = None
        self.closed = False
        # Set by any frame; the keepalive sweep clears it and pings sessions that stayed silent.
        self.seen = True
        self.ping_sent_at: float | None = None
        # The transport's buffer is above its high-water mark (``pause_writing``).
        self.paused = False
        # A socket the fan-out may write to past the transport: set by the fan-out's C loop
        # once it saw the transport empty, -1 again after any other write (see ``_write``).
        self.drained_fd = -1

    # -- opening -----------------------------------------------------------------------------

    def accept(self, transport: asyncio.Transport, key: str, tail: bytes) -> None:
        """Take over an upgraded connection: answer 101 and read frames from now on.

        ``key`` is the client's ``Sec-WebSocket-Key`` (already validated); ``tail`` the
        bytes that arrived after the request, if any.
        """
        self.transport = transport
        transport.set_protocol(self)
        self._write(_SWITCHING + accept_key(key).encode("ascii") + b"\r\n\r\n")
        self.on_open()
        if tail:
            self.data_received(tail)

    def on_open(self) -> None:
        """The 101 is written; frames may be sent."""

    # -- asyncio protocol --------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        for item in self._parser.feed(data):
            if isinstance(item, Disconnect):
                self.close(item)
                return
            if self.closed:
                # Our CLOSE is out; the peer's CLOSE completes the handshake.
                if item.opcode == OP_CLOSE and self.transport is not None:
                    self.transport.close()
                    return
                continue
            self.seen = True
            self._frame(item)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.on_closed()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False

    # -- frames ------------------------------------------------------------------------------

    def _frame(self, frame: Frame) -> None:
        op = frame.opcode
        if op in (OP_TEXT, OP_BINARY):
            if self._frag is not None:
                self.close(protocol_error("new message started before the last one ended"))
                return
            if frame.fin:
                payload = frame.payload
                if op == OP_TEXT:
                    try:
                        payload.decode("utf-8")
                    except UnicodeDecodeError:
                        self.close(invalid_utf8())
                        return
                self.on_message(op == OP_TEXT, payload)
                return
            self._frag = bytearray()
            self._frag_text = op == OP_TEXT
            self._decoder = codecs.getincrementaldecoder("utf-8")() if self._frag_text else None
            self._continue(frame)
        elif op == OP_CONTINUATION:
            if self._frag is None:
                self.close(protocol_error("continuation frame without a message to continue"))
                return
            self._continue(frame)
        elif op == OP_PING:
            if self.transport is not None:
                self._write(pong_frame(frame.payload))
        elif op == OP_PONG:
            self.ping_sent_at = None
        else:
            self._on_close(frame.payload)

    def _continue(self, frame: Frame) -> None:
        frag = self._frag
        assert frag is not None
        chunk = frame.payload
        if len(frag) + len(chunk) > self._max_message:
            self.close(message_too_big(len(frag) + len(chunk), self._max_message))
            return
        frag += chunk
        if self._decoder is not None:
            try:
                self._decoder.decode(chunk, final=frame.fin)
            except UnicodeDecodeError:
                self.close(invalid_utf8())
                return
        if frame.fin:
            payload = bytes(frag)
            self._frag = None
            self._decoder = None
            self.on_message(self._frag_text, payload)

    def _on_close(self, payload: bytes) -> None:
        if not payload:
            self.close(PEER_GONE, peer_closed=True)
            return
        if len(payload) == 1:
            self.close(protocol_error("close frame with a one-byte payload"))
            return
        code = int.from_bytes(payload[:2], "big")
        if not valid_close_code(code):
            self.close(protocol_error(f"close code {code} may not be sent by a peer"))
            return
        try:
            payload[2:].decode("utf-8")
        except UnicodeDecodeError:
            self.close(invalid_utf8())
            return
        self.close(echo_close(code), peer_closed=True)

    # -- sending and closing -----------------------------------------------------------------

    def send_text(self, payload: bytes) -> None:
        """Send one TEXT message now (replies go through the hub instead, in order)."""
        if not self.closed and self.transport is not None:
            self._write(ws_text_frame(payload))

    def _write(self, data: bytes) -> None:
        """Write through the transport. It may keep some of the bytes; until the fan-out sees
        it empty again, the fan-out writes through it too, so nothing overtakes them."""
        self.drained_fd = -1
        assert self.transport is not None
        self.transport.write(data)

    def is_closed(self) -> bool:
        """Whether the session has ended (a method, so it is re-read after an await)."""
        return self.closed

    def close(self, disconnect: Disconnect, *, peer_closed: bool = False) -> None:
        """Send CLOSE with the disconnect's code and reason and end the session.

        When the peer closed first, TCP is closed once the answer is written; otherwise the
        peer's CLOSE is awaited, and the connection is cut after ``ws.close_grace_s``.
        """
        if self.closed:
            return
        self.closed = True
        if disconnect.code == CLOSE_MESSAGE_TOO_BIG:
            self.on_limit("ws.max_message_bytes")
        transport = self.transport
        if transport is None:
            return
        if not transport.is_closing():
            self._write(close_frame(disconnect.code, disconnect.reason_bytes))
            if peer_closed:
                transport.close()
            else:
                asyncio.get_running_loop().call_later(self._close_grace, _abort, transport)
        self.on_closed()

    def on_message(self, text: bool, payload: bytes) -> None:
        """A whole message arrived (text already checked as UTF-8)."""
        raise NotImplementedError

    def on_closed(self) -> None:
        """The session ended or is ending; drop what it holds. Idempotent."""

    def on_limit(self, key: str) -> None:
        """A configured limit (named by its key) closed the session."""


class Echo(WebSocket):
    """Sends back each message as it came: the conformance suite's peer, never in production."""

    __slots__ = ()

    def on_message(self, text: bool, payload: bytes) -> None:
        if not self.closed and self.transport is not None:
            self._write(ws_text_frame(payload) if text else binary_frame(payload))
