"""Micro-benchmarks for the task lifecycle: ``etherd.core.tasks.apply`` and delivery composition.

``apply`` runs once per task API call (create, claim, every step, the result), between
reading the task row and writing it back; ``compose`` runs inside the final result.

    python -m pytest bench/micro --benchmark-only -q -p no:cacheprovider
"""

from __future__ import annotations

from typing import Any

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from etherd.core.delivery import ActionsBlock, OutcomeBlock, compose
from etherd.core.errors import Refusal
from etherd.core.tasks import Claim, Create, Result, Status, Step, Task, apply

T0 = 1_800_000_000_000
LEASE = 60_000
TASK_ID = "task_0b5c6f1e3f554a8e9f0e"
RUN = "run_5d1a4c3b9f2c0b7e"
PR = {"number": 42, "branch": "ether/fix", "url": "https://github.com/org/repo/pull/42"}
PROMPT = "Fix the checkout bug\n\nThe total is wrong when a coupon and a gift card are combined."

CREATE = Create(task_id=TASK_ID, owner="alice", prompt=PROMPT, now_ms=T0)
CLAIM = Claim(
    app_id="bench-harness", holder="harness-1", run_id=RUN, now_ms=T0 + 10, lease_ms=LEASE
)
STEP = Step(
    run_id=RUN,
    phase="edit",
    user_message="Editing checkout.py: coupon applied after the gift card",
    internal_label="tool:edit",
    now_ms=T0 + 20,
)
RESULT = Result(
    run_id=RUN,
    status="submitted",
    agent_status="Opened PR #42",
    artifact={"pr": PR},
    working_summary="Reordered the discounts; added a regression test.",
    now_ms=T0 + 30,
)


def queued() -> Task:
    return apply(None, CREATE).task


def running() -> Task:
    return apply(queued(), CLAIM).task


def test_apply_create(benchmark: BenchmarkFixture) -> None:
    outcome = benchmark(apply, None, CREATE)
    assert outcome.task.status is Status.QUEUED
    assert [e.event for e in outcome.events] == [
        "task.timeline",
        "activity.list_updated",
        "task.harness.ready",
    ]


def test_apply_claim(benchmark: BenchmarkFixture) -> None:
    outcome = benchmark(apply, queued(), CLAIM)
    assert outcome.task.status is Status.RUNNING


def test_apply_step(benchmark: BenchmarkFixture) -> None:
    outcome = benchmark(apply, running(), STEP)
    assert [e.event for e in outcome.events] == ["os.harness.step", "task.timeline"]


def test_apply_result_submitted(benchmark: BenchmarkFixture) -> None:
    """The final result: compose the delivery, publish task.delivered and the timeline."""
    outcome = benchmark(apply, running(), RESULT)
    assert outcome.task.status is Status.COMPLETED
    assert outcome.events[0].event == "task.delivered"


def test_apply_refused(benchmark: BenchmarkFixture) -> None:
    """A step from a stale run: the guard raises before the table is consulted."""
    stale = Step(run_id="run_old", phase="p", user_message="m", now_ms=T0 + 20)
    task = running()

    def refuse() -> str:
        try:
            apply(task, stale)
        except Refusal as exc:
            return exc.code
        raise AssertionError("a stale run was accepted")

    assert benchmark(refuse) == "run_mismatch"


@pytest.mark.parametrize("steps", [0, 10, 40], ids=["0steps", "10steps", "40steps"])
def test_apply_sequence(benchmark: BenchmarkFixture, steps: int) -> None:
    """A whole task: Create, Claim, ``steps`` Steps, Result (what one harness run costs)."""
    step_actions = [
        Step(run_id=RUN, phase="edit", user_message=f"step {i}", now_ms=T0 + 20 + i)
        for i in range(steps)
    ]
    final = Result(run_id=RUN, status="submitted", artifact={"pr": PR}, now_ms=T0 + 100 + steps)

    def sequence() -> Task:
        task = apply(None, CREATE).task
        task = apply(task, CLAIM).task
        for action in step_actions:
            task = apply(task, action).task
        return apply(task, final).task

    task = benchmark(sequence)
    assert task.status is Status.COMPLETED and task.version == 3 + steps


# -- delivery composition -------------------------------------------------------------------

TASK = running()
RESULTS: dict[str, dict[str, Any]] = {
    "pr_and_summary": {
        "status": "submitted",
        "agent_status": "Opened PR #42",
        "artifact": {"pr": PR},
        "working_summary": "Reordered the discounts; added a regression test.",
    },
    "text_only": {"status": "no_changes", "agent_status": "Already fixed upstream"},
    "failed": {"status": "failed", "agent_status": "Tests fail", "error": "3 failures"},
    "malformed_pr": {"status": "submitted", "artifact": {"pr": {"number": "x"}}},
}


@pytest.mark.parametrize("fields", list(RESULTS.values()), ids=list(RESULTS))
def test_compose(benchmark: BenchmarkFixture, fields: dict[str, Any]) -> None:
    result = Result(run_id=RUN, now_ms=T0 + 30, **fields)
    blocks = benchmark(compose, TASK.title, result)
    assert isinstance(blocks[0], OutcomeBlock) and isinstance(blocks[-1], ActionsBlock)
