"""Micro-benchmarks for ``etherd.core.wire``: decoding client commands, encoding events.

Every WebSocket message a client sends goes through ``COMMAND_DECODER``; every event
published goes through ``event_json`` once (then is shared by all its subscribers).

    python -m pytest bench/micro --benchmark-only -q -p no:cacheprovider
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec
import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from etherd.core.wire import COMMAND_DECODER, Ping, Subscribe, event_json

SUBSCRIBE = (
    b'{"action":"subscribe","topics":["tasks/task_0b5c6f1e3f554a8e9f0e","activity/alice"],"id":"1"}'
)
SUBSCRIBE_RESUME = (
    b'{"action":"subscribe","topics":["tasks/task_0b5c6f1e3f554a8e9f0e","activity/alice"],'
    b'"since":{"tasks/task_0b5c6f1e3f554a8e9f0e":1742,"activity/alice":93},'
    b'"epoch":"9f2c0b7e5d1a4c3b","id":"2"}'
)
PING = b'{"action":"ping","id":3}'

INVALID = {
    # Valid JSON, wrong shape: msgspec's ValidationError path (the reply names the field).
    "topics_not_a_list": b'{"action":"subscribe","topics":"tasks/a","id":"4"}',
    "unknown_action": b'{"action":"publish","topics":["tasks/a"]}',
    "empty_topics": b'{"action":"subscribe","topics":[]}',
    # Not JSON at all: the DecodeError path.
    "not_json": b"subscribe tasks/a",
}


@pytest.mark.parametrize(
    ("payload", "kind"),
    [(SUBSCRIBE, Subscribe), (SUBSCRIBE_RESUME, Subscribe), (PING, Ping)],
    ids=["subscribe", "subscribe_resume", "ping"],
)
def test_decode_valid(benchmark: BenchmarkFixture, payload: bytes, kind: type) -> None:
    command = benchmark(COMMAND_DECODER.decode, payload)
    assert isinstance(command, kind)


def _refusal(payload: bytes) -> Callable[[], str]:
    def decode() -> str:
        try:
            COMMAND_DECODER.decode(payload)
        except msgspec.DecodeError as exc:  # ValidationError is a DecodeError
            return str(exc)
        raise AssertionError("decoded an invalid command")

    return decode


@pytest.mark.parametrize("payload", list(INVALID.values()), ids=list(INVALID))
def test_decode_invalid(benchmark: BenchmarkFixture, payload: bytes) -> None:
    message = benchmark(_refusal(payload))
    assert message


# A step event's fields as the task code encodes them (about 130 bytes).
SMALL = (
    b'{"task_id":"task_0b5c6f1e3f554a8e9f0e","run_id":"run_1","phase":"edit",'
    b'"user_message":"Editing checkout.py","internal_label":""}'
)
# 1,024 bytes of event fields: a long step message.
_HEAD = b'{"task_id":"task_0b5c6f1e3f554a8e9f0e","run_id":"run_1","phase":"edit","user_message":"'
KB = _HEAD + b"x" * (1024 - len(_HEAD) - 2) + b'"}'
assert len(KB) == 1024
TS_MS = 1_764_400_000_123


@pytest.mark.parametrize("data", [SMALL, KB, b"{}"], ids=["small", "1kb", "empty"])
def test_event_json(benchmark: BenchmarkFixture, data: bytes) -> None:
    out = benchmark(
        event_json, "tasks/task_0b5c6f1e3f554a8e9f0e", "os.harness.step", 1742, TS_MS, data
    )
    assert out.startswith(b'{"type":"os.harness.step"') and out.endswith(b"}")


def test_event_json_not_durable(benchmark: BenchmarkFixture) -> None:
    """``durable: false`` events carry no offset."""
    out = benchmark(event_json, "deploys/web", "deploy.started", None, TS_MS, SMALL)
    assert b'"offset"' not in out
