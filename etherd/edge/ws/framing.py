"""WebSocket framing on picows: the hand-off of an upgraded connection, and the RFC 6455
duties picows leaves to the application.

picows parses frames in C; the ``Framing`` base class does the rest for every session: it
reassembles fragmented messages, validates UTF-8 incrementally (so a bad byte closes the
session at once with 1007, not at the end of the message), refuses RSV bits (no extension
is negotiated), caps message size (1009), answers CLOSE with the peer's code and refuses
reserved codes that picows lets through (0, 1004-1006, 1015, 1016-2999, 5000 and up).
Subclasses get whole messages in ``on_message`` and end the session with ``close``.

``Echo`` returns what it receives; it exists only for the Autobahn conformance suite and is
off unless ``ws.echo_path`` is set.
"""

from __future__ import annotations

import asyncio
import codecs
import logging
from typing import Final

from picows import WSAutoPingStrategy, WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport
from picows.picows import WSProtocol  # type: ignore[attr-defined]

from etherd.core.errors import (
    PEER_GONE,
    Disconnect,
    echo_close,
    invalid_utf8,
    message_too_big,
    protocol_error,
    valid_close_code,
)

__all__ = ["Echo", "Framing", "handoff"]

log = logging.getLogger("etherd.ws")
# An adapter, not a Logger: given a Logger, picows makes a child logger per connection,
# about 0.5 KB each for as long as the connection lives.
_picows_log = logging.LoggerAdapter(logging.getLogger("picows.server"), {})

# picows keeps a 2 KiB read buffer minimum; subscribers send little, so that is enough and
# keeps 10,000 idle connections small.
READ_BUFFER_BYTES: Final = 2048
HANDSHAKE_TIMEOUT_S: Final = 5.0


def _abort(transport: WSTransport) -> None:
    if not transport.is_disconnected:
        transport.disconnect(graceful=False)


def handoff(
    transport: asyncio.Transport,
    headers: dict[str, str],
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
        # Auto-ping off: the keepalive sweep pings idle sessions instead of a task each, so
        # the two intervals that follow are never used (picows still wants them).
        False,
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

    def __init__(self, max_message_bytes: int, close_grace_s: float) -> None:
        super().__init__()
        self._close_grace = close_grace_s
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
            self.close(protocol_error("reserved bits are set but no extension was agreed"))
            return
        if op == WSMsgType.TEXT or op == WSMsgType.BINARY:
            if self._frag is not None:
                self.close(protocol_error("new message started before the last one ended"))
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
                        self.close(invalid_utf8())
                        return
                self.on_message(op == WSMsgType.TEXT, payload)
                return
            self._frag = bytearray()
            self._frag_text = op == WSMsgType.TEXT
            self._decoder = codecs.getincrementaldecoder("utf-8")() if self._frag_text else None
            self._continue(frame)
        elif op == WSMsgType.CONTINUATION:
            if self._frag is None:
                self.close(protocol_error("continuation frame without a message to continue"))
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
                self.close(invalid_utf8())
                return
        if frame.fin:
            payload = bytes(frag)
            self._frag = None
            self._decoder = None
            self.on_message(self._frag_text, payload)

    def _too_big(self, size: int) -> None:
        self.close(message_too_big(size, self._max_message))

    def _on_close(self, frame: WSFrame) -> None:
        size = frame.payload_size
        if size == 0:
            self.close(PEER_GONE, peer_closed=True)
            return
        code = int(frame.get_close_code())  # type: ignore[call-overload]
        if not valid_close_code(code):
            self.close(protocol_error(f"close code {code} may not be sent by a peer"))
            return
        # picows already refused a reason that is not UTF-8 (1007). Echo the peer's code.
        self.close(echo_close(code), peer_closed=True)

    def is_closed(self) -> bool:
        """Whether the session has ended (a method, so it is re-read after an await)."""
        return self.closed

    def close(self, disconnect: Disconnect, *, peer_closed: bool = False) -> None:
        """Send CLOSE with the disconnect's code and reason and end the session.

        When the peer closed first, the TCP connection is closed at once. Otherwise the
        peer's CLOSE is awaited, so the socket is not closed under data still arriving
        (which would turn into a reset that can destroy our CLOSE before it is read), and
        the connection is cut after ``ws.close_grace_s``: a peer that stopped reading would
        otherwise hold the socket and the bytes queued on it forever.
        """
        if self.closed:
            return
        self.closed = True
        transport = self.transport
        if transport is None:
            return
        transport.send_close(WSCloseCode(disconnect.code), disconnect.reason_bytes)
        if peer_closed:
            transport.disconnect()
        asyncio.get_running_loop().call_later(self._close_grace, _abort, transport)
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
