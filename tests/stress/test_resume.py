"""Delivery under stress: resumes during a reconnection storm, racing publishers, racing
idempotent retries, and resumes that cannot be honoured."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable

import msgspec

from etherd.client.api import Client
from etherd.client.errors import ApiError
from tests.conftest import Etherd
from tests.stress.clients import (
    Heads,
    Tally,
    Tracked,
    publish_stream,
    wait_caught_up,
    ws_publisher,
)
from tests.stress.conftest import StartServer

Report = Callable[[str], None]


async def recovery_storm(
    sub_url: str, pub_base: str, clients: int, rounds: int, topics_n: int = 20
) -> tuple[Tally, Heads, int]:
    """``clients`` subscribers on 2 of ``topics_n`` topics each; while a publisher runs,
    ``rounds`` times every one of them drops (half abruptly) and resumes at once."""
    rng = random.Random(7)
    topics = [f"storm/t{i}" for i in range(topics_n)]
    tally, heads, stop = Tally(), Heads(), asyncio.Event()
    subs = [Tracked(sub_url, rng.sample(topics, 2), tally) for _ in range(clients)]
    for at in range(0, clients, 50):
        await asyncio.gather(*(s.connect() for s in subs[at : at + 50]))
    publisher = asyncio.create_task(publish_stream(pub_base, topics, heads, stop))
    for _ in range(rounds):
        await asyncio.sleep(0.5)
        await asyncio.gather(*(s.reconnect(graceful=rng.random() < 0.5) for s in subs))
    await asyncio.sleep(0.5)
    stop.set()
    await publisher
    behind = await wait_caught_up(subs, heads.heads(), 30)
    for s in subs:
        s.drop(graceful=True)
    return tally, heads, behind


def check_storm(tally: Tally, heads: Heads, behind: int, clients: int, figure: Report) -> None:
    """The storm's invariant: 0 gaps, 0 duplicates, every resume recovered, all caught up."""
    figure(
        f"recovery storm: {clients} clients, {tally.reconnects} reconnects, "
        f"{heads.total()} events published, {tally.events} delivered, {tally.gaps} gaps, "
        f"{tally.duplicates} duplicates, {tally.unrecovered} unrecovered, {behind} behind"
    )
    assert tally.gaps == 0
    assert tally.duplicates == 0
    assert tally.unrecovered == 0
    assert not tally.errors, tally.errors[:3]
    assert behind == 0
    # Offsets the publisher was told are contiguous per topic, so the heads are exact.
    for topic, offsets in heads.offsets.items():
        assert sorted(offsets) == list(range(1, len(offsets) + 1)), topic


def test_recovery_storm(start_server: StartServer, figure: Report) -> None:
    server = start_server({})
    clients = 300
    tally, heads, behind = asyncio.run(
        recovery_storm(f"{server.ws_url}?token=test", server.base, clients, rounds=3)
    )
    check_storm(tally, heads, behind, clients, figure)


async def race_publishers(server: Etherd, http_n: int, ws_n: int, each: int) -> list[int]:
    """``http_n`` HTTP and ``ws_n`` WebSocket publishers, ``each`` events apiece, all on one
    topic at once; every offset they were answered."""
    topic = "race/one"
    offsets: list[int] = []

    async def http_one(i: int) -> None:
        async with Client(server.base, "test") as client:
            for n in range(each):
                done = await client.publish(topic, "race", {"p": i, "n": n})
                assert done.offset is not None
                offsets.append(done.offset)

    async def ws_one(i: int) -> None:
        transport, pub = await ws_publisher(f"{server.ws_url}?token=test")
        for n in range(each):
            pub.publish(topic, {"p": f"w{i}", "n": n})
        await asyncio.wait_for(pub.done.wait(), 30)
        transport.disconnect()
        for reply in pub.replies:
            assert reply["type"] == "published", reply
            offsets.append(reply["offset"])

    await asyncio.gather(*(http_one(i) for i in range(http_n)), *(ws_one(i) for i in range(ws_n)))
    return offsets


async def replay(
    server: Etherd, topic: str, since: int, expect: int, epoch: str | None = None
) -> Tracked:
    """Subscribe to ``topic`` from ``since`` and wait for ``expect`` events (then a little
    longer, so any extra one shows)."""
    sub = Tracked(f"{server.ws_url}?token=test", [topic], Tally(), keep=True)
    await sub.connect(since={topic: since}, epoch=epoch)
    deadline = time.monotonic() + 20
    while len(sub.seen) < expect and time.monotonic() < deadline:  # noqa: ASYNC110 (a count)
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)
    sub.drop(graceful=True)
    return sub


def test_concurrent_publishers(start_server: StartServer, figure: Report) -> None:
    server = start_server({})
    http_n, ws_n, each = 16, 8, 60
    offsets = asyncio.run(race_publishers(server, http_n, ws_n, each))
    total = (http_n + ws_n) * each
    reader = asyncio.run(replay(server, "race/one", 0, total))
    log = [o for _, o in reader.seen]
    unique = len(set(offsets))
    contiguous = sorted(offsets) == list(range(1, total + 1))
    figure(
        f"concurrent publishers: {http_n} HTTP + {ws_n} WS x {each} on one topic, "
        f"{len(offsets)} answers, {unique} unique offsets, contiguous 1..{total}: {contiguous}; "
        f"replay from 0 gave {len(log)} events in order: {log == list(range(1, total + 1))}"
    )
    assert len(offsets) == total
    assert unique == total
    assert contiguous
    assert log == list(range(1, total + 1))


async def idempotent_race(server: Etherd, keys: int, racers: int) -> list[list[object]]:
    """For each of ``keys`` keys, ``racers`` concurrent POSTs with that key and one body;
    per key, every answer (an offset, or the refusal's code)."""
    answers: list[list[object]] = []
    clients = [Client(server.base, "test", retries=0) for _ in range(racers)]
    try:
        for k in range(keys):
            key = f"race-key-{k}-{time.monotonic_ns()}"
            body: dict[str, object] = {"topic": f"idem/k{k}", "event": "once", "data": {"k": k}}

            async def one(client: Client, body: dict[str, object] = body, key: str = key) -> object:
                try:
                    got = await client.call(
                        "POST", "/api/publish", body, headers={"Idempotency-Key": key}
                    )
                except ApiError as exc:
                    return exc.code
                return msgspec.convert(got["published"][0]["offset"], int)

            answers.append(list(await asyncio.gather(*(one(c) for c in clients))))
    finally:
        for c in clients:
            await c.close()
    return answers


def test_idempotent_publish_race(start_server: StartServer, figure: Report) -> None:
    server = start_server({})
    keys, racers = 8, 40
    answers = asyncio.run(idempotent_race(server, keys, racers))
    stored = [len(asyncio.run(replay(server, f"idem/k{k}", 0, 1)).seen) for k in range(keys)]
    distinct = [sorted(set(map(str, a))) for a in answers]
    figure(
        f"idempotent publish: {keys} keys x {racers} concurrent requests, events stored per "
        f"key {sorted(set(stored))}, distinct answers per key {sorted(set(map(len, distinct)))} "
        f"(answers {distinct[0]})"
    )
    assert stored == [1] * keys
    for a in answers:
        assert a == [1] * racers, a


def test_unrecoverable_positions(start_server: StartServer, figure: Report) -> None:
    server = start_server(
        {
            "realtime": {"replay_max_events": 50},
            "store": {
                "retention_interval_s": 0.3,
                "retention": [{"prefix": "trim/", "max_count": 10, "max_age_s": 0.0}],
            },
        }
    )
    for topic in ("deep/a", "trim/a"):
        status, body = server.request(
            "POST",
            "/api/publish",
            {"events": [{"topic": topic, "event": "e", "data": {"n": n}} for n in range(100)]},
            token="test",
        )
        assert status == 200, body

    async def probe(topic: str, since: int, epoch: str | None = None) -> tuple[bool, int]:
        sub = await replay(server, topic, since, 0, epoch)
        return bool(sub.acks[0]["recovered"]), len(sub.seen)

    # Wait for the retention sweep to trim trim/a (it keeps the newest 10).
    deadline = time.monotonic() + 15
    while asyncio.run(probe("trim/a", 0))[1] > 10 and time.monotonic() < deadline:
        time.sleep(0.2)
    cases: dict[str, tuple[str, int, str | None, bool]] = {
        "past replay_max_events": ("deep/a", 1, None, False),
        "trimmed by retention": ("trim/a", 1, None, False),
        "future offset": ("deep/a", 1000, None, False),
        "other epoch": ("deep/a", 60, "not-this-epoch", False),
        "within bounds (control)": ("deep/a", 60, None, True),
        "retained tail (control)": ("trim/a", 95, None, True),
    }
    results = {name: asyncio.run(probe(t, s, e)) for name, (t, s, e, _) in cases.items()}
    wrong = [n for n, c in cases.items() if results[n][0] is not c[3]]
    leaked = [n for n, c in cases.items() if not c[3] and results[n][1]]
    figure(
        "unrecoverable resume: "
        + ", ".join(f"{n} -> recovered {r[0]}, {r[1]} replayed" for n, r in results.items())
        + f"; {len(wrong)} wrong, {len(leaked)} replayed anyway"
    )
    assert not wrong
    assert not leaked
    assert results["within bounds (control)"][1] == 40
    assert results["retained tail (control)"][1] == 5
