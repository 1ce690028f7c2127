"""The task service: ``mutate`` and its row cache on a store two processes share, and the
lease sweep."""

from __future__ import annotations

import asyncio
from typing import cast

import msgspec
import pytest

from etherd.core.config import Config, TasksConfig
from etherd.core.errors import Refusal
from etherd.core.events import StoredEvent, Write
from etherd.core.tasks import (
    Action,
    Answer,
    Cancel,
    Claim,
    Create,
    Heartbeat,
    Status,
    Step,
    Task,
    apply,
)
from etherd.services.eventlog import EventLog, TaskConflict
from etherd.services.state import ServerState
from etherd.services.taskservice import TaskCache, TaskService, now_ms

T0 = 1_800_000_000_000
LEASE = 60_000
TASK = "task_1"
OWNER = "user_1"
RUN = "run_1"
INV = "invalid_transition"


def queued() -> Task:
    return apply(None, Create(task_id=TASK, owner=OWNER, prompt="p", now_ms=T0)).task


# ---------------------------------------------------------------------------------------------
# TaskService.mutate and its task row cache, on a store shared by two "processes"


class SharedStore:
    """The task rows of a store two apps share, counting the reads."""

    def __init__(self) -> None:
        self.rows: dict[str, bytes] = {}
        self.reads = 0

    async def get_task(self, task_id: str) -> bytes | None:
        self.reads += 1
        return self.rows.get(task_id)


class FakeEventLog:
    """What ``mutate`` uses of the event log: the task read and a version-checked commit."""

    def __init__(self, store: SharedStore) -> None:
        self.store = store
        self.fail: Exception | None = None

    async def get_task(self, task_id: str) -> bytes | None:
        return await self.store.get_task(task_id)

    async def expired_leases(self, now_ms: int, limit: int) -> list[bytes]:
        rows = [msgspec.json.decode(raw, type=Task) for raw in self.store.rows.values()]
        lapsed = [
            t
            for t in rows
            if t.status in (Status.RUNNING, Status.INTERRUPTED)
            and t.lease_expires_ms is not None
            and t.lease_expires_ms <= now_ms
        ]
        lapsed.sort(key=lambda t: (t.lease_expires_ms or 0, t.id))
        return [msgspec.json.encode(t) for t in lapsed[:limit]]

    async def commit(self, write: Write, turn: object = None) -> list[StoredEvent]:
        if self.fail is not None:
            raise self.fail
        row = write.task
        assert row is not None
        stored = self.store.rows.get(row.id)
        current = None if stored is None else msgspec.json.decode(stored, type=Task).version
        if current != (row.expected_version or None):
            raise TaskConflict(row.id, current)
        self.store.rows[row.id] = row.data
        return []


def stored(store: SharedStore) -> Task:
    return msgspec.json.decode(store.rows[TASK], type=Task)


class Process:
    """One etherd process's task service over the shared store."""

    def __init__(self, store: SharedStore, config: Config | None = None) -> None:
        self.log = FakeEventLog(store)
        self.service = TaskService(cast(EventLog, self.log), ServerState(config or Config()))

    @property
    def fail(self) -> Exception | None:
        return self.log.fail

    @fail.setter
    def fail(self, exc: Exception | None) -> None:
        self.log.fail = exc


def change(proc: Process, action: Action) -> Task:
    """``action`` through ``mutate`` on ``proc``; the task as the store now holds it."""

    def view(task: Task) -> tuple[int, bytes]:
        return 200, msgspec.json.encode(task)

    answer = asyncio.run(proc.service.mutate(TASK, lambda: action, lambda task: None, view))
    assert isinstance(answer, tuple)
    assert answer[0] == 200
    return msgspec.json.decode(answer[1], type=Task)


def two_processes() -> tuple[SharedStore, Process, Process]:
    store = SharedStore()
    return store, Process(store), Process(store)


def test_mutate_decides_from_the_row_it_committed() -> None:
    store, a, _ = two_processes()
    change(a, Create(task_id=TASK, owner=OWNER, prompt="p", now_ms=T0))
    reads = store.reads
    change(a, Claim(app_id="x", holder="h", run_id=RUN, now_ms=T0 + 1, lease_ms=LEASE))
    for i in range(5):
        change(a, Step(run_id=RUN, phase="p", user_message=f"s{i}", now_ms=T0 + 2 + i))
    change(a, Heartbeat(run_id=RUN, now_ms=T0 + 10, lease_ms=LEASE))
    assert store.reads == reads
    assert stored(store).version == 8
    assert a.service.cache.get(TASK) == stored(store)


def test_a_stale_row_costs_a_conflict_and_a_read() -> None:
    store, a, b = two_processes()
    change(a, Create(task_id=TASK, owner=OWNER, prompt="p", now_ms=T0))
    change(a, Claim(app_id="x", holder="h", run_id=RUN, now_ms=T0 + 1, lease_ms=LEASE))
    # The other process takes the heartbeat (version 3); a's row is still version 2.
    change(b, Heartbeat(run_id=RUN, now_ms=T0 + 2, lease_ms=LEASE))
    reads = store.reads
    new = change(a, Step(run_id=RUN, phase="p", user_message="m", now_ms=T0 + 3))
    assert store.reads == reads + 1
    assert new.version == 4
    assert new.lease_expires_ms == T0 + 2 + LEASE  # b's heartbeat was kept
    assert stored(store) == new


def test_a_refusal_from_a_cached_row_is_checked_against_the_store() -> None:
    store, a, b = two_processes()
    change(a, Create(task_id=TASK, owner=OWNER, prompt="p", now_ms=T0))
    # b claims the task a last saw queued; a's row would refuse b's run.
    claimed = change(b, Claim(app_id="x", holder="h", run_id=RUN, now_ms=T0 + 1, lease_ms=LEASE))
    reads = store.reads
    new = change(a, Step(run_id=RUN, phase="p", user_message="m", now_ms=T0 + 2))
    assert store.reads == reads + 1
    assert new.version == claimed.version + 1
    assert new.last_step is not None


def test_a_refusal_confirmed_by_the_store_is_answered() -> None:
    store, a, _ = two_processes()
    change(a, Create(task_id=TASK, owner=OWNER, prompt="p", now_ms=T0))
    reads = store.reads
    with pytest.raises(Refusal) as info:
        change(a, Answer(answer="yes", now_ms=T0 + 1))
    assert info.value.code == INV
    assert store.reads == reads + 1
    assert stored(store).version == 1


def test_final_tasks_are_not_cached_and_a_failed_commit_forgets_the_row() -> None:
    _, a, _ = two_processes()
    cache = a.service.cache
    change(a, Create(task_id=TASK, owner=OWNER, prompt="p", now_ms=T0))
    assert cache.get(TASK) is not None
    a.fail = Refusal("not_ready", "the store is unavailable")
    with pytest.raises(Refusal):
        change(a, Cancel(now_ms=T0 + 1))
    assert cache.get(TASK) is None
    a.fail = None
    assert change(a, Cancel(now_ms=T0 + 2)).status is Status.CANCELLED
    assert cache.get(TASK) is None


def test_the_lease_sweep_takes_sweep_batch_tasks_at_a_time() -> None:
    store = SharedStore()
    proc = Process(store, Config(tasks=TasksConfig(sweep_batch=2, cache_size=1)))
    lapsed = now_ms() - 10 * LEASE
    for n in range(3):
        task_id = f"t{n}"

        def act(action: Action, task_id: str = task_id) -> None:
            answer = asyncio.run(
                proc.service.mutate(task_id, lambda: action, lambda t: None, lambda t: (200, b""))
            )
            assert answer == (200, b"")

        act(Create(task_id=task_id, owner=OWNER, prompt="p", now_ms=lapsed))
        act(Claim(app_id="x", holder="h", run_id=f"r{n}", now_ms=lapsed, lease_ms=LEASE))
    assert len(proc.service.cache.rows) == 1  # tasks.cache_size
    assert [asyncio.run(proc.service.sweep_once()) for _ in range(3)] == [2, 1, 0]
    statuses = {msgspec.json.decode(raw, type=Task).status for raw in store.rows.values()}
    assert statuses == {Status.QUEUED}


def test_the_task_cache_is_bounded_and_keeps_the_newest_row() -> None:
    cache = TaskCache(2)
    one, two, three = (
        msgspec.structs.replace(queued(), id=task_id) for task_id in ("t1", "t2", "t3")
    )
    cache.put(one)
    cache.put(two)
    assert cache.get("t1") == one  # now the most recently used
    cache.put(three)
    assert (cache.get("t1"), cache.get("t2"), cache.get("t3")) == (one, None, three)
    newer = msgspec.structs.replace(one, version=5)
    cache.put(newer)
    cache.put(one)
    assert cache.get("t1") == newer
