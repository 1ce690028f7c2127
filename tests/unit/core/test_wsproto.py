"""The client-frame parser and the server's control frames (RFC 6455), fed bytes only."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from etherd.core.errors import Disconnect
from etherd.core.wsproto import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_TEXT,
    Frame,
    FrameParser,
    accept_key,
    close_frame,
    pong_frame,
    unmask,
)


def client_frame(
    opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0, masked: bool = True
) -> bytes:
    """A frame as a client sends it (masked unless told otherwise)."""
    n = len(payload)
    head = bytes(((0x80 if fin else 0) | rsv << 4 | opcode,))
    bit = 0x80 if masked else 0
    if n < 126:
        head += bytes((bit | n,))
    elif n < 65536:
        head += bytes((bit | 126,)) + n.to_bytes(2, "big")
    else:
        head += bytes((bit | 127,)) + n.to_bytes(8, "big")
    if not masked:
        return head + payload
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def test_accept_key_is_the_rfc_example() -> None:
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_unmask_is_its_own_inverse() -> None:
    data = os.urandom(1000)
    mask = os.urandom(4)
    assert unmask(unmask(data, mask), mask) == data
    assert unmask(b"", mask) == b""


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 70000])
def test_every_length_encoding(size: int) -> None:
    payload = os.urandom(size)
    frames = FrameParser(1 << 20).feed(client_frame(OP_BINARY, payload))
    assert frames == [Frame(OP_BINARY, True, payload)]


@given(
    st.lists(st.binary(max_size=300), min_size=1, max_size=6),
    st.data(),
)
@settings(max_examples=150, deadline=None)
def test_any_chunking_gives_the_same_frames(payloads: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(client_frame(OP_TEXT, p) for p in payloads)
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(stream) - 1)), max_size=8)))
    parser = FrameParser(1 << 16)
    got: list[Frame | Disconnect] = []
    last = 0
    for cut in [*cuts, len(stream)]:
        got += parser.feed(stream[last:cut])
        last = cut
    assert got == [Frame(OP_TEXT, True, p) for p in payloads]
    assert parser.buffered == 0


def test_frames_before_a_violation_are_delivered_first() -> None:
    # Two CLOSE frames in one packet, then garbage: the first CLOSE must be seen.
    stream = client_frame(OP_CLOSE, b"\x03\xe8") + client_frame(OP_CLOSE, b"") + b"\x0f\x80"
    got = FrameParser(100).feed(stream)
    assert got[:2] == [Frame(OP_CLOSE, True, b"\x03\xe8"), Frame(OP_CLOSE, True, b"")]
    assert isinstance(got[2], Disconnect) and got[2].code == 1002


@pytest.mark.parametrize(
    ("frame", "code", "fragment"),
    [
        (client_frame(OP_TEXT, b"x", masked=False), 1002, "masked"),
        (client_frame(OP_TEXT, b"x", rsv=1), 1002, "reserved bits"),
        (client_frame(0x3, b"x"), 1002, "unknown opcode"),
        (client_frame(OP_PING, b"x" * 126), 1002, "125 bytes"),
        (client_frame(OP_PING, b"x", fin=False), 1002, "fragmented control"),
        (client_frame(OP_TEXT, b"x" * 101), 1009, "ws.max_message_bytes"),
    ],
)
def test_violations_close_with_their_code(frame: bytes, code: int, fragment: str) -> None:
    (item,) = FrameParser(100).feed(frame)
    assert isinstance(item, Disconnect)
    assert item.code == code and fragment in item.reason


def test_an_oversized_frame_is_refused_from_its_header_alone() -> None:
    parser = FrameParser(1000)
    header = client_frame(OP_BINARY, b"x" * 70000)[:14]
    (item,) = parser.feed(header)
    assert isinstance(item, Disconnect) and item.code == 1009
    assert parser.buffered == 0


def test_fragments_and_interleaved_control_frames_keep_their_order() -> None:
    stream = (
        client_frame(OP_TEXT, b"he", fin=False)
        + client_frame(OP_PING, b"p")
        + client_frame(OP_CONTINUATION, b"llo")
    )
    assert FrameParser(100).feed(stream) == [
        Frame(OP_TEXT, False, b"he"),
        Frame(OP_PING, True, b"p"),
        Frame(OP_CONTINUATION, True, b"llo"),
    ]


def test_server_control_frames() -> None:
    assert close_frame(1000) == b"\x88\x02\x03\xe8"
    assert close_frame(4008, b"r" * 200)[1] == 125  # the reason is cut to fit
    assert pong_frame(b"abc") == b"\x8a\x03abc"
