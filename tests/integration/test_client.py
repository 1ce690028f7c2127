"""``etherd.client`` against real ``etherd serve`` processes, on SQLite and PostgreSQL.

The subscriber resumes across a server restart with no gap and no duplicate and swaps its
token in place; the publisher works over HTTP and WebSocket; the harness helper runs the
whole loop (claim, steps, a question and its answer, the result) and surfaces the lease
lapsing and the owner cancelling as typed exceptions.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from etherd.client import (
    ApiError,
    Client,
    Event,
    Forbidden,
    Harness,
    LeaseExpired,
    NotFound,
    RealtimePublisher,
    Reset,
    Subscriber,
    SubscriptionRefused,
    TaskCancelled,
    TransportError,
    Unauthorized,
)
from tests.conftest import Etherd, free_port, make_token

ALICE = make_token("alice")
HARNESS = make_token("h1", role="harness")
SERVICE = make_token("svc", role="service")
PR = {"number": 7, "branch": "fix/checkout", "url": "https://github.com/org/shop/pull/7"}
WAIT = 10.0


@pytest.fixture
def server(store_url: str, tmp_path: Path) -> Iterator[Etherd]:
    """An etherd whose leases last one second (the harness keeps them alive)."""
    config = {
        "store": {"url": store_url},
        "tasks": {"lease_s": 1.0, "sweep_interval_s": 0.1},
        "log": {"level": "warning"},
    }
    srv = Etherd(tmp_path, config).start()
    try:
        yield srv
    finally:
        srv.kill()


async def events(sub: Subscriber, n: int) -> list[Event]:
    got: list[Event] = []
    while len(got) < n:
        item = await sub.next(WAIT)
        assert isinstance(item, Event), item
        got.append(item)
    return got


def test_subscriber_resumes_across_a_restart_without_gap_or_duplicate(server: Etherd) -> None:
    topic = "deploys/web"

    async def go() -> None:
        async with (
            Client(server.base, SERVICE) as client,
            Subscriber(server.base, SERVICE, [topic], backoff_initial_s=0.3) as sub,
        ):
            await sub.wait_connected(WAIT)
            for i in range(5):
                await client.publish(topic, "deploy.step", {"i": i})
            first = await events(sub, 5)
            # SIGTERM: the server closes the WebSocket with 1001 and exits; while it is
            # down the subscriber keeps trying. Events published right after the restart
            # are replayed from the log when it resumes.
            assert server.stop() == 0
            server.start()
            for i in range(5, 10):
                await client.publish(topic, "deploy.step", {"i": i})
            await sub.wait_connected(WAIT)
            later = await events(sub, 5)
            assert sub.connections == 2
            got = first + later
            assert [e.offset for e in got] == list(range(1, 11))
            assert [e.data["i"] for e in got] == list(range(10))
            assert all(e.topic == topic and e.event == "deploy.step" for e in got)
            # Nothing more: no duplicate of anything already delivered.
            with pytest.raises(TimeoutError):
                await sub.next(0.3)

    asyncio.run(go())


def test_subscriber_since_replays_and_an_unhonoured_resume_is_a_reset(server: Etherd) -> None:
    topic = "t/replay"
    for i in range(3):
        server.publish(topic, "n", i=i)

    async def go() -> None:
        async with Subscriber(server.base, SERVICE, [topic], since=1) as sub:
            assert [e.offset for e in await events(sub, 2)] == [2, 3]
        # Ahead of the log: the server cannot honour it, the caller is told to reload.
        async with Subscriber(server.base, SERVICE, [topic], since=99) as sub:
            reset = await sub.next(WAIT)
            assert isinstance(reset, Reset) and (reset.topic, reset.offset) == (topic, 3)
            server.publish(topic, "n", i=3)
            (live,) = await events(sub, 1)
            assert (live.offset, live.data["i"]) == (4, 3)

    asyncio.run(go())


def test_subscriber_refreshes_its_token_in_place(server: Etherd) -> None:
    topic = "t/refresh"
    provided: list[str] = []

    async def provider() -> str:
        token = make_token("svc", role="service", ttl=3600)
        provided.append(token)
        return token

    async def go() -> None:
        # The provider is asked refresh_margin_s before exp: here half a second after start.
        short = make_token("svc", role="service", ttl=40)
        async with Subscriber(
            server.base, short, [topic], token_provider=provider, refresh_margin_s=39.5
        ) as sub:
            await sub.wait_connected(WAIT)
            deadline = time.monotonic() + WAIT
            while not (provided and sub.token == provided[0]):
                assert time.monotonic() < deadline, "the provider's token was never sent"
                await asyncio.sleep(0.05)
            longer = make_token("svc", role="service", ttl=7200)
            exp = await sub.refresh(longer)
            assert exp is not None and exp > time.time() + 7000
            assert sub.token == longer
            # A token for someone else is refused and the old one stays.
            with pytest.raises(ApiError) as refused:
                await sub.refresh(make_token("mallory", role="service"))
            assert refused.value.code == "forbidden"
            assert sub.token == longer
            server.publish(topic, "n", token=SERVICE, x=1)
            (event,) = await events(sub, 1)
            assert event.data["x"] == 1 and sub.connections == 1

    asyncio.run(go())


def test_subscriber_fatal_errors_are_typed(server: Etherd) -> None:
    async def go() -> None:
        async with Subscriber(server.base, "not-a-jwt", ["t/x"]) as sub:
            with pytest.raises(Unauthorized):
                await sub.next(WAIT)
        async with Subscriber(server.base, ALICE, ["activity/bob"]) as sub:
            with pytest.raises(SubscriptionRefused) as refused:
                await sub.next(WAIT)
            assert refused.value.errors[0]["code"] == "forbidden"
        async with Subscriber(f"http://127.0.0.1:{free_port()}", SERVICE, ["t/x"]) as sub:
            with pytest.raises(TransportError):
                await sub.next(WAIT)

    asyncio.run(go())


def test_publishers_over_http_and_websocket(server: Etherd) -> None:
    topic = "t/pub"

    async def go() -> None:
        async with (
            Client(server.base, SERVICE) as client,
            RealtimePublisher(server.base, SERVICE) as ws,
            Subscriber(server.base, SERVICE, [topic]) as sub,
        ):
            await sub.wait_connected(WAIT)
            assert (await client.publish(topic, "a", {"n": 1})).offset == 1
            assert await ws.publish(topic, "b", {"n": 2}) == 2
            assert await ws.publish(topic, "c", {"n": 3}, durable=False) is None
            batch = await client.publish_many(
                [{"topic": topic, "event": "d"}, {"topic": topic, "event": "e"}]
            )
            assert [p.offset for p in batch] == [3, 4]
            got = await events(sub, 5)
            assert [e.event for e in got] == ["a", "b", "c", "d", "e"]
            assert [e.offset for e in got] == [1, 2, None, 3, 4]
            with pytest.raises(ApiError) as bad:
                await ws.publish("a/../b", "x")
            assert bad.value.code == "unprocessable"
        async with Client(server.base, ALICE) as alice:
            with pytest.raises(Forbidden):
                await alice.publish(topic, "x")
            with pytest.raises(NotFound):
                await alice.task("task_nope")

    asyncio.run(go())


async def wait_status(client: Client, task_id: str, status: str) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT
    while True:
        task = await client.task(task_id)
        if task["status"] == status or time.monotonic() > deadline:
            assert task["status"] == status, task
            return task
        await asyncio.sleep(0.05)


def test_harness_runs_the_whole_loop(server: Etherd) -> None:
    async def go() -> None:
        async with (
            Client(server.base, ALICE) as alice,
            Harness(server.base, HARNESS, "acme", answer_poll_s=0.1) as harness,
        ):
            task = await alice.create_task("Fix the checkout bug", scope={"repo": "org/shop"})
            tid = task["task_id"]
            assert task["id"] == tid
            assert tid in [t["task_id"] for t in await harness.claimable()]
            run = await harness.next_run(poll_s=0.1, timeout_s=WAIT)
            assert run.task_id == tid and run.bundle["scope"] == {"repo": "org/shop"}

            async def user() -> None:
                parked = await wait_status(alice, tid, "interrupted")
                assert parked["question"] == "Which tests?"
                await alice.answer(tid, "all of them", option="all")

            async with run:
                await run.step("Reading the code…", label="read")
                # Two lease lengths pass: the background heartbeat keeps the run alive.
                await asyncio.sleep(2.2)
                await run.step("Planning…", label="plan")
                answering = asyncio.create_task(user())
                answer = await run.interrupt("Which tests?", ["all", "some"], timeout_s=WAIT)
                await answering
                assert (answer.question, answer.answer, answer.option) == (
                    "Which tests?",
                    "all of them",
                    "all",
                )
                # Acknowledged by the next heartbeat: the server stops repeating it.
                deadline = time.monotonic() + WAIT
                while "answer" in await run.heartbeat():
                    assert time.monotonic() < deadline
                await run.step("Opening the pull request…", label="pr")
                done = await run.result(
                    "submitted",
                    agent_status="Opened PR #7",
                    artifact={"pr": PR},
                    working_summary="Fixed it.",
                )
            assert done["status"] == "completed"
            final = await alice.task(tid)
            assert final["status"] == "completed" and final["attempts"] == 1
            hero = [b for b in final["delivery"]["blocks"] if b["type"] == "hero"]
            assert hero == [{"type": "hero", "kind": "pull_request", **PR}]
            timeline = await alice.timeline(tid)
            kinds = [e["kind"] for e in timeline["entries"]]
            assert kinds == [
                "created",
                "claimed",
                "step",
                "step",
                "interrupted",
                "answered",
                "step",
                "delivered",
            ]
            assert run.ended is None

    asyncio.run(go())


def test_harness_hears_the_lease_expire(server: Etherd) -> None:
    async def go() -> None:
        async with (
            Client(server.base, ALICE) as alice,
            Harness(server.base, HARNESS, "acme") as harness,
        ):
            tid = (await alice.create_task("Slow work"))["task_id"]
            run = await harness.claim(tid)
            await run.step("Started")
            # No heartbeat (the run was never entered): the sweep requeues the task.
            await wait_status(alice, tid, "queued")
            with pytest.raises(LeaseExpired) as lapsed:
                await run.step("Still here?")
            assert lapsed.value.status == 409 and lapsed.value.code == "lease_expired"
            assert run.ended is lapsed.value
            with pytest.raises(LeaseExpired):
                await run.result("submitted")
            # The task is claimable again, by a new run.
            again = await harness.claim(tid)
            assert again.run_id != run.run_id

    asyncio.run(go())


def test_harness_hears_the_owner_cancel(server: Etherd) -> None:
    async def go() -> None:
        async with (
            Client(server.base, ALICE) as alice,
            Harness(server.base, HARNESS, "acme", answer_poll_s=0.1) as harness,
        ):
            tid = (await alice.create_task("Work that gets cancelled"))["task_id"]
            run = await harness.claim(tid)
            async with run:
                await run.step("Working…")
                waiting = asyncio.create_task(run.interrupt("Continue?", timeout_s=WAIT))
                await wait_status(alice, tid, "interrupted")
                assert (await alice.cancel(tid))["status"] == "cancelled"
                with pytest.raises(TaskCancelled) as cancelled:
                    await waiting
                assert cancelled.value.code == "cancelled"
                with pytest.raises(TaskCancelled):
                    await run.step("one more")
            timeline = await alice.timeline(tid)
            assert timeline["entries"][-1]["kind"] == "cancelled"

            # A running task too: the next call hears it.
            tid = (await alice.create_task("Cancelled while running"))["task_id"]
            run = await harness.claim(tid)
            await run.step("Working…")
            await alice.cancel(tid)
            with pytest.raises(TaskCancelled):
                await run.step("more")

    asyncio.run(go())
