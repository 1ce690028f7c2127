"""Fuzz what a WebSocket client sends: the JSON command decoder and the frame parser.

The first input byte picks the parser's payload limit and two split points; the rest is
both a candidate command and a stream of client frames.

Invariants:

* ``COMMAND_DECODER.decode`` raises only ``msgspec.ValidationError`` or ``DecodeError``
  on UTF-8 input (text messages reach it only once the framing has validated their UTF-8;
  on other bytes a ``UnicodeDecodeError`` is also allowed);
* ``FrameParser.feed`` never raises; it yields frames, ending at most with one
  ``Disconnect`` (1002 protocol error or 1009 too big); the frames are the ones a naive
  parser written here finds, however the bytes are split; a data frame is never longer
  than the limit, a control frame is final and at most 125 bytes, and the parser never
  holds more than one such frame plus its header;
* the framing layer over those frames (``edge.ws.framing``) hands on whole messages of at
  most the limit, text ones in UTF-8 (which the decoder then refuses only with its own
  errors), and writes nothing but PONGs and at most one CLOSE, last, with a valid code.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import atheris

from tests.fuzz._run import main

with atheris.instrument_imports(include=["etherd"]):
    import msgspec

    from etherd.core.errors import CLOSE_MESSAGE_TOO_BIG, CLOSE_PROTOCOL_ERROR, Disconnect
    from etherd.core.wire import COMMAND_DECODER
    from etherd.core.wsproto import Frame, FrameParser
    from etherd.edge.ws.framing import WebSocket

# Opcodes RFC 6455 defines; control opcodes are 0x8 and up.
_KNOWN = frozenset({0x0, 0x1, 0x2, 0x8, 0x9, 0xA})
_MAX_HEADER = 14  # 2 bytes, 8 of extended length, 4 of mask
# Close codes an endpoint may send: RFC 6455 section 7.4.1 and the IANA registry.
_SENDABLE = frozenset({1000, 1001, 1002, 1003, *range(1007, 1015)})


def reference_frames(data: bytes, limit: int) -> tuple[list[Frame], int | None]:
    """The complete frames in ``data`` and the close code that ends them, if any."""
    frames: list[Frame] = []
    pos = 0
    while len(data) - pos >= 2:
        b0, b1 = data[pos], data[pos + 1]
        opcode, fin = b0 & 0x0F, bool(b0 & 0x80)
        if b0 & 0x70 or opcode not in _KNOWN or not b1 & 0x80:
            return frames, CLOSE_PROTOCOL_ERROR
        length, head = b1 & 0x7F, 2
        if length in (126, 127):
            head = 4 if length == 126 else 10
            if len(data) - pos < head:
                return frames, None
            length = int.from_bytes(data[pos + 2 : pos + head], "big")
            if length >= 1 << 63:
                return frames, CLOSE_PROTOCOL_ERROR
        if opcode >= 0x8 and (length > 125 or not fin):
            return frames, CLOSE_PROTOCOL_ERROR
        if opcode < 0x8 and length > limit:
            return frames, CLOSE_MESSAGE_TOO_BIG
        start = pos + head + 4
        if start + length > len(data):
            return frames, None
        mask = data[pos + head : start]
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(data[start : start + length]))
        frames.append(Frame(opcode, fin, payload))
        pos = start + length
    return frames, None


def _check_command(data: bytes) -> None:
    try:
        COMMAND_DECODER.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError):
        pass
    except UnicodeDecodeError:
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            return
        raise


def _check_frames(data: bytes, limit: int, cuts: list[int]) -> None:
    want, close = reference_frames(data, limit)
    parser = FrameParser(limit)
    frames: list[Frame] = []
    ended: Disconnect | None = None
    bound = max(limit, 125) + _MAX_HEADER
    start = 0
    for stop in [*cuts, len(data)]:
        out = parser.feed(data[start:stop])
        start = stop
        for index, item in enumerate(out):
            if isinstance(item, Disconnect):
                assert index == len(out) - 1, "a Disconnect must end the list"
                ended = item
            else:
                frames.append(item)
        assert parser.buffered <= bound, (parser.buffered, bound)
        if ended is not None:
            break  # the connection closes: nothing more is read
    for frame in frames:
        if frame.opcode >= 0x8:
            assert frame.fin and len(frame.payload) <= 125
        else:
            assert len(frame.payload) <= limit
    assert frames == want, (frames, want)
    assert (ended.code if ended is not None else None) == close, (ended, close)


class FakeTransport:
    """Records what the session writes and whether it closed or cut the connection."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.closed = False

    def set_protocol(self, protocol: Any) -> None:
        pass

    def write(self, data: bytes) -> None:
        assert not self.closed, "write after close"
        self.written += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True


class Commands(WebSocket):
    """A session whose messages are decoded as commands, as ``edge.ws.session`` does."""

    __slots__ = ("limit", "messages")

    def __init__(self, max_message_bytes: int) -> None:
        # No grace: the loop runs once after the input, and the cut happens then.
        super().__init__(max_message_bytes, close_grace_s=0.0)
        self.limit = max_message_bytes
        self.messages = 0

    def on_message(self, text: bool, payload: bytes) -> None:
        assert len(payload) <= self.limit, (len(payload), self.limit)
        self.messages += 1
        if text:
            payload.decode("utf-8")  # the framing promises UTF-8
            with contextlib.suppress(msgspec.ValidationError, msgspec.DecodeError):
                COMMAND_DECODER.decode(payload)


async def _session(data: bytes, limit: int, cuts: list[int]) -> FakeTransport:
    transport = FakeTransport()
    session = Commands(limit)
    session.accept(transport, "dGhlIHNhbXBsZSBub25jZQ==", data[: cuts[0]])  # type: ignore[arg-type]
    for start, stop in ((cuts[0], cuts[1]), (cuts[1], len(data))):
        if transport.closed:
            break
        session.data_received(data[start:stop])
    return transport


def _check_session(
    loop: asyncio.AbstractEventLoop, data: bytes, limit: int, cuts: list[int]
) -> None:
    transport = loop.run_until_complete(_session(data, limit, cuts))
    loop.run_until_complete(asyncio.sleep(0))  # the close grace timer, due at once
    out = bytes(transport.written)
    assert out.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    frames = out[out.index(b"\r\n\r\n") + 4 :]
    # What the server sent: PONGs, at most one CLOSE last, none of them masked.
    pos = 0
    while pos < len(frames):
        b0, b1 = frames[pos], frames[pos + 1]
        assert b0 in (0x8A, 0x88) and b1 <= 125, frames[pos : pos + 8]
        end = pos + 2 + b1
        if b0 == 0x88:
            assert end == len(frames), "bytes after the server's CLOSE"
            code = int.from_bytes(frames[pos + 2 : pos + 4], "big")
            assert code in _SENDABLE or 3000 <= code <= 4999, code
        pos = end
    assert pos == len(frames)


LOOP = asyncio.new_event_loop()


def test_one_input(data: bytes) -> None:
    """Decode the input as a command and parse it as client frames."""
    if not data:
        return
    control, body = data[0], data[1:]
    # A limit of 16 to 2,048 bytes: small enough that 1009 and the 16-bit length are hit.
    limit = 16 << (control & 0x07)
    cuts = sorted(len(body) * part // 16 for part in (control >> 4 & 0x0F, (control * 7) & 0x0F))
    _check_command(body)
    _check_frames(body, limit, cuts)
    _check_session(LOOP, body, limit, cuts)


if __name__ == "__main__":
    main(test_one_input)
