"""The task lifecycle: every transition of the table with its events, every refusal, a
property test that random action sequences stay inside the table, and the task row cache
``task_api.mutate`` decides from."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import msgspec
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from etherd.core.errors import Refusal
from etherd.core.events import NewEvent
from etherd.core.rfc3339 import rfc3339_ms
from etherd.core.tasks import (
    TERMINAL,
    TRANSITIONS,
    Action,
    Answer,
    Cancel,
    Claim,
    Create,
    Expire,
    Heartbeat,
    Interrupt,
    Outcome,
    Result,
    Status,
    Step,
    Task,
    apply,
)
from etherd.edge.api import taskviews
from etherd.edge.http.response import STATUS


# The harness API's views, as the JSON the routes send.
def bundle(task: Task, base_url: str) -> dict[str, Any]:
    out: dict[str, Any] = msgspec.to_builtins(taskviews.bundle(task, base_url))
    return out


def claim_view(task: Task, base_url: str) -> dict[str, Any]:
    out: dict[str, Any] = msgspec.to_builtins(taskviews.claim_view(task, base_url))
    return out


def heartbeat_view(task: Task) -> dict[str, Any]:
    out: dict[str, Any] = msgspec.to_builtins(taskviews.heartbeat_view(task))
    return out


T0 = 1_800_000_000_000
LEASE = 60_000
TASK = "task_1"
OWNER = "user_1"
RUN = "run_1"
PR = {"number": 42, "branch": "ether/fix", "url": "https://github.com/org/repo/pull/42"}

TASK_TOPIC = f"tasks/{TASK}"
ACTIVITY_TOPIC = f"activity/{OWNER}"


# ---------------------------------------------------------------------------------------------
# Helpers


def data(event: NewEvent) -> dict[str, Any]:
    decoded = msgspec.json.decode(event.data)
    assert isinstance(decoded, dict)
    return decoded


def shape(outcome: Outcome) -> list[tuple[str, str]]:
    return [(e.topic, e.event) for e in outcome.events]


def snapshot(task: Task | None) -> bytes:
    return msgspec.json.encode(task)


def create(now: int = T0, **fields: Any) -> Outcome:
    fields.setdefault("prompt", "Fix the checkout bug\n\nThe total is wrong with coupons.")
    return apply(None, Create(task_id=TASK, owner=OWNER, now_ms=now, **fields))


def queued() -> Task:
    return create().task


def running(now: int = T0 + 1_000, run_id: str = RUN) -> Task:
    claim = Claim(app_id="acme", holder="harness_1", run_id=run_id, now_ms=now, lease_ms=LEASE)
    return apply(queued(), claim).task


def interrupted_live() -> Task:
    action = Interrupt(
        run_id=RUN, question="Which branch?", options=["main", "dev"], now_ms=T0 + 2_000
    )
    return apply(running(), action).task


def interrupted_parked() -> Task:
    action = Result(run_id=RUN, status="blocked", question="Need a token", now_ms=T0 + 2_000)
    return apply(running(), action).task


def completed() -> Task:
    action = Result(run_id=RUN, status="submitted", agent_status="Done", now_ms=T0 + 2_000)
    return apply(running(), action).task


def failed() -> Task:
    action = Result(run_id=RUN, status="failed", error="tests failed", now_ms=T0 + 2_000)
    return apply(running(), action).task


def cancelled() -> Task:
    return apply(queued(), Cancel(now_ms=T0 + 500)).task


STATES: dict[str, Callable[[], Task]] = {
    "queued": queued,
    "running": running,
    "interrupted_live": interrupted_live,
    "interrupted_parked": interrupted_parked,
    "completed": completed,
    "failed": failed,
    "cancelled": cancelled,
}

# Every action at T0 + 3 s: inside the lease of ``running()`` (claimed at T0 + 1 s).
NOW = T0 + 3_000
ACTIONS: dict[str, Action] = {
    "create": Create(task_id=TASK, owner=OWNER, prompt="again", now_ms=NOW),
    "claim": Claim(app_id="acme", holder="harness_2", run_id="run_2", now_ms=NOW, lease_ms=LEASE),
    "heartbeat": Heartbeat(run_id=RUN, now_ms=NOW, lease_ms=LEASE),
    "step": Step(run_id=RUN, phase="coding_agent", user_message="Working", now_ms=NOW),
    "interrupt": Interrupt(run_id=RUN, question="Sure?", now_ms=NOW),
    "answer": Answer(answer="yes", now_ms=NOW),
    "result": Result(run_id=RUN, status="submitted", now_ms=NOW),
    "cancel": Cancel(now_ms=NOW),
    "expire": Expire(now_ms=NOW),
}

RUN_BOUND: list[Callable[[str, int], Action]] = [
    lambda run, now: Heartbeat(run_id=run, now_ms=now, lease_ms=LEASE),
    lambda run, now: Step(run_id=run, phase="p", user_message="m", now_ms=now),
    lambda run, now: Interrupt(run_id=run, question="q", now_ms=now),
    lambda run, now: Result(run_id=run, status="submitted", now_ms=now),
]


OK = "ok"
INV = "invalid_transition"
MISMATCH = "run_mismatch"
CANCELLED = "cancelled"
RUN_CALLS = ("heartbeat", "step", "interrupt", "result")
# The whole status x action matrix, written out by hand (not derived from the table).
MATRIX: dict[str, dict[str, str]] = {
    "queued": {
        "create": "conflict",
        "claim": OK,
        # The run that held the task is over (no run holds a queued task).
        "heartbeat": MISMATCH,
        "step": MISMATCH,
        "interrupt": MISMATCH,
        "answer": INV,
        "result": MISMATCH,
        "cancel": OK,
        "expire": INV,
    },
    "running": {
        "create": "conflict",
        "claim": "already_claimed",
        "heartbeat": OK,
        "step": OK,
        "interrupt": OK,
        "answer": INV,
        "result": OK,
        "cancel": OK,
        "expire": "conflict",
    },
    "interrupted_live": {
        "create": "conflict",
        "claim": INV,
        "heartbeat": OK,
        "step": INV,
        "interrupt": INV,
        "answer": OK,
        "result": INV,
        "cancel": OK,
        "expire": "conflict",
    },
    "interrupted_parked": {
        "create": "conflict",
        "claim": INV,
        "heartbeat": MISMATCH,
        # The blocked result ended the run.
        "step": MISMATCH,
        "interrupt": MISMATCH,
        "answer": OK,
        "result": MISMATCH,
        "cancel": OK,
        "expire": "conflict",
    },
    **{
        final: {name: "conflict" if name == "create" else INV for name in ACTIONS}
        for final in ("completed", "failed")
    },
    # Every run call on a cancelled task tells the harness why its run is over.
    "cancelled": {
        name: "conflict" if name == "create" else CANCELLED if name in RUN_CALLS else INV
        for name in ACTIONS
    },
}

CELLS = [(state, name, MATRIX[state][name]) for state in STATES for name in ACTIONS]
# A stale run's call on a task that is not final: refused (run_mismatch) before the table
# is consulted. Heartbeat while parked is not here: the table has it, and its handler checks
# the run.
BEFORE_THE_TABLE = {
    *[("queued", name) for name in ("heartbeat", "step", "interrupt", "result")],
    *[("interrupted_parked", name) for name in ("step", "interrupt", "result")],
}


def refused(task: Task | None, action: Action, code: str) -> Refusal:
    """Assert ``action`` is refused with ``code`` and leaves ``task`` as it was."""
    before = snapshot(task)
    with pytest.raises(Refusal) as info:
        apply(task, action)
    assert info.value.code == code, info.value.message
    assert snapshot(task) == before
    return info.value


# ---------------------------------------------------------------------------------------------
# The matrix


@pytest.mark.parametrize(("state", "name", "expected"), CELLS)
def test_matrix(state: str, name: str, expected: str) -> None:
    task = STATES[state]()
    action = ACTIONS[name]
    if expected == OK:
        outcome = apply(task, action)
        assert outcome.task.version == task.version + 1
        assert (task.status, type(action)) in {
            (s, a) for s, rules in TRANSITIONS.items() for a in rules
        }
    else:
        error = refused(task, action, expected)
        assert STATUS[error.code] == 409
        if expected == INV:
            assert TASK in error.message
            assert f"it is {task.status}" in error.message


def test_matrix_agrees_with_the_table() -> None:
    names = {type(action): name for name, action in ACTIONS.items()}
    table = {(s, names[a]) for s, rules in TRANSITIONS.items() if s is not None for a in rules}
    status_of = {state: STATES[state]().status for state in STATES}
    in_table = {
        (status_of[state], name)
        for state, name, code in CELLS
        if code not in (INV, CANCELLED) and (state, name) not in BEFORE_THE_TABLE
    }
    in_table -= {(status_of[state], "create") for state in STATES}
    assert in_table == table
    for state, name in BEFORE_THE_TABLE:
        assert MATRIX[state][name] == MISMATCH
        assert (status_of[state], name) not in table
    assert set(TRANSITIONS) == {None, *Status}
    assert all(not TRANSITIONS[s] for s in TERMINAL)


@pytest.mark.parametrize(
    ("state", "name", "message"),
    [
        (
            "completed",
            "cancel",
            "cannot cancel task task_1: it is completed, which is final "
            "(cancellable only while queued, running or interrupted)",
        ),
        (
            "completed",
            "claim",
            "cannot claim task task_1: it is completed, which is final "
            "(claimable only when queued)",
        ),
        (
            "queued",
            "answer",
            "cannot answer task task_1: it is queued and asks no question "
            "(answers are accepted only while interrupted)",
        ),
        (
            "interrupted_live",
            "step",
            "cannot report a step on task task_1: it is interrupted "
            "(steps are accepted only while running)",
        ),
    ],
)
def test_refusal_messages(state: str, name: str, message: str) -> None:
    assert refused(STATES[state](), ACTIONS[name], INV).message == message


def test_only_create_applies_to_a_missing_task() -> None:
    for name, action in ACTIONS.items():
        if name != "create":
            refused(None, action, "not_found")


# ---------------------------------------------------------------------------------------------
# Allowed transitions and their exact events


def test_create() -> None:
    outcome = create(
        definition_of_done="Tests pass", scope={"repo": "org/repo"}, context_refs=["d1"]
    )
    task = outcome.task
    assert task.status is Status.QUEUED
    assert (task.version, task.created_ms, task.updated_ms, task.attempts) == (1, T0, T0, 0)
    assert task.title == "Fix the checkout bug"
    assert (task.definition_of_done, task.scope, task.context_refs) == (
        "Tests pass",
        {"repo": "org/repo"},
        ["d1"],
    )
    assert shape(outcome) == [
        (TASK_TOPIC, "task.timeline"),
        (ACTIVITY_TOPIC, "activity.list_updated"),
        ("harness", "task.harness.ready"),
    ]
    timeline, activity, ready = map(data, outcome.events)
    assert timeline == {
        "task_id": TASK,
        "entry": {
            "kind": "created",
            "at": rfc3339_ms(T0),
            "summary": "Task created",
            "status": "queued",
        },
    }
    assert activity == {
        "task_id": TASK,
        "status": "queued",
        "title": "Fix the checkout bug",
        "updated_at": rfc3339_ms(T0),
    }
    assert ready == {"task_id": TASK, "title": "Fix the checkout bug", "created_at": rfc3339_ms(T0)}


def test_create_title() -> None:
    assert create(title="  Mine ").task.title == "Mine"
    assert create(prompt="\n\n  second   line  words\nx").task.title == "second line words"
    long = create(prompt="word " * 40).task.title
    assert len(long) == 80
    assert long.endswith("…")


def test_create_refusals() -> None:
    refused(None, Create(task_id=TASK, owner=OWNER, prompt="  \n ", now_ms=T0), "unprocessable")
    error = refused(queued(), ACTIONS["create"], "conflict")
    assert error.message == "task task_1 already exists"


def test_claim() -> None:
    task = queued()
    claim = Claim(app_id="acme", holder="harness_1", run_id=RUN, now_ms=T0 + 1_000, lease_ms=LEASE)
    outcome = apply(task, claim)
    new = outcome.task
    assert new.status is Status.RUNNING
    assert (new.run_id, new.holder, new.app_id) == (RUN, "harness_1", "acme")
    assert new.lease_expires_ms == T0 + 1_000 + LEASE
    assert (new.attempts, new.version, new.updated_ms) == (1, 2, T0 + 1_000)
    assert shape(outcome) == [
        (TASK_TOPIC, "task.timeline"),
        (ACTIVITY_TOPIC, "activity.list_updated"),
    ]
    entry = data(outcome.events[0])["entry"]
    assert entry["kind"] == "claimed"
    assert entry["run_id"] == RUN
    assert entry["status"] == "running"
    assert data(outcome.events[1])["status"] == "running"


def test_claim_while_the_lease_is_live_is_already_claimed() -> None:
    task = running()
    late = Claim(
        app_id="x", holder="h2", run_id="run_2", now_ms=T0 + 1_000 + LEASE - 1, lease_ms=LEASE
    )
    error = refused(task, late, "already_claimed")
    assert "run_1" in error.message


def test_claim_after_the_lease_lapsed_takes_over() -> None:
    task = running()
    now = T0 + 1_000 + LEASE
    outcome = apply(
        task, Claim(app_id="other", holder="h2", run_id="run_2", now_ms=now, lease_ms=LEASE)
    )
    new = outcome.task
    assert (new.status, new.run_id, new.holder, new.attempts) == (Status.RUNNING, "run_2", "h2", 2)
    assert new.lease_expires_ms == now + LEASE
    assert shape(outcome) == [(TASK_TOPIC, "task.timeline"), (TASK_TOPIC, "task.timeline")]
    expired, claimed = (data(e)["entry"] for e in outcome.events)
    assert (expired["kind"], expired["run_id"]) == ("lease_expired", RUN)
    assert (claimed["kind"], claimed["run_id"]) == ("claimed", "run_2")


def test_heartbeat_extends_the_lease_and_publishes_nothing() -> None:
    task = running()
    outcome = apply(task, Heartbeat(run_id=RUN, now_ms=T0 + 30_000, lease_ms=LEASE))
    assert outcome.events == []
    assert outcome.task.lease_expires_ms == T0 + 30_000 + LEASE
    assert outcome.task.version == task.version + 1
    assert outcome.task.updated_ms == task.updated_ms
    assert heartbeat_view(outcome.task) == {
        "status": "running",
        "lease_expires_at": rfc3339_ms(T0 + 30_000 + LEASE),
    }


def test_heartbeat_while_interrupted_with_a_live_run() -> None:
    task = interrupted_live()
    outcome = apply(task, Heartbeat(run_id=RUN, now_ms=T0 + 40_000, lease_ms=LEASE))
    assert outcome.events == []
    assert outcome.task.status is Status.INTERRUPTED
    assert heartbeat_view(outcome.task) == {
        "status": "interrupted",
        "lease_expires_at": rfc3339_ms(T0 + 40_000 + LEASE),
    }


def test_step() -> None:
    task = running()
    step = Step(
        run_id=RUN,
        phase="coding_agent",
        user_message="Making the changes…",
        internal_label="coding_agent",
        now_ms=T0 + 5_000,
    )
    outcome = apply(task, step)
    assert outcome.task.status is Status.RUNNING
    assert shape(outcome) == [(TASK_TOPIC, "os.harness.step"), (TASK_TOPIC, "task.timeline")]
    assert data(outcome.events[0]) == {
        "task_id": TASK,
        "run_id": RUN,
        "phase": "coding_agent",
        "user_message": "Making the changes…",
        "internal_label": "coding_agent",
    }
    entry = data(outcome.events[1])["entry"]
    assert (entry["kind"], entry["summary"], entry["phase"]) == (
        "step",
        "Making the changes…",
        "coding_agent",
    )
    last = outcome.task.last_step
    assert last is not None
    assert (last.phase, last.run_id, last.at) == ("coding_agent", RUN, rfc3339_ms(T0 + 5_000))


def test_step_without_internal_label_still_sends_it() -> None:
    outcome = apply(running(), Step(run_id=RUN, phase="p", user_message="m", now_ms=T0 + 5_000))
    assert data(outcome.events[0])["internal_label"] == ""


def test_interrupt_keeps_the_run() -> None:
    task = running()
    action = Interrupt(
        run_id=RUN, question=" Which branch? ", options=["main", "dev"], now_ms=T0 + 2_000
    )
    outcome = apply(task, action)
    new = outcome.task
    assert new.status is Status.INTERRUPTED
    assert (new.run_id, new.lease_expires_ms, new.holder) == (
        RUN,
        task.lease_expires_ms,
        task.holder,
    )
    assert (new.question, new.options) == ("Which branch?", ["main", "dev"])
    assert shape(outcome) == [
        (TASK_TOPIC, "task.interrupted"),
        (TASK_TOPIC, "task.timeline"),
        (ACTIVITY_TOPIC, "activity.list_updated"),
    ]
    assert data(outcome.events[0]) == {
        "task_id": TASK,
        "run_id": RUN,
        "question": "Which branch?",
        "options": ["main", "dev"],
    }
    assert data(outcome.events[1])["entry"]["kind"] == "interrupted"
    assert data(outcome.events[2])["status"] == "interrupted"


def test_interrupt_needs_a_question() -> None:
    refused(running(), Interrupt(run_id=RUN, question=" ", now_ms=T0 + 2_000), "unprocessable")


def test_answer_with_a_live_lease_resumes_the_same_run() -> None:
    task = interrupted_live()
    outcome = apply(task, Answer(answer="", option="dev", now_ms=T0 + 3_000))
    new = outcome.task
    assert new.status is Status.RUNNING
    assert (new.run_id, new.lease_expires_ms) == (RUN, task.lease_expires_ms)
    assert (new.question, new.options) == (None, [])
    assert shape(outcome) == [
        (TASK_TOPIC, "task.resumed"),
        (TASK_TOPIC, "task.timeline"),
        (ACTIVITY_TOPIC, "activity.list_updated"),
    ]
    assert data(outcome.events[0]) == {"task_id": TASK, "answer": "dev", "status": "running"}
    expected = {
        "question": "Which branch?",
        "answer": "dev",
        "option": "dev",
        "at": rfc3339_ms(T0 + 3_000),
    }
    assert msgspec.to_builtins(new.answers) == [expected]
    assert heartbeat_view(new)["answer"] == expected
    # The heartbeat keeps telling the answer until the run moves on.
    beat = apply(new, Heartbeat(run_id=RUN, now_ms=T0 + 4_000, lease_ms=LEASE)).task
    assert heartbeat_view(beat)["answer"] == expected
    moved = apply(beat, Step(run_id=RUN, phase="p", user_message="m", now_ms=T0 + 5_000)).task
    assert "answer" not in heartbeat_view(moved)
    assert len(moved.answers) == 1


def test_answer_after_the_lease_lapsed_requeues() -> None:
    task = interrupted_live()
    assert task.lease_expires_ms is not None
    outcome = apply(task, Answer(answer="main please", now_ms=task.lease_expires_ms))
    new = outcome.task
    assert new.status is Status.QUEUED
    assert (new.run_id, new.holder, new.app_id, new.lease_expires_ms, new.pending_answer) == (
        None,
    ) * 5
    assert shape(outcome) == [
        (TASK_TOPIC, "task.resumed"),
        (TASK_TOPIC, "task.timeline"),
        (ACTIVITY_TOPIC, "activity.list_updated"),
        ("harness", "task.harness.ready"),
    ]
    assert data(outcome.events[0]) == {"task_id": TASK, "answer": "main please", "status": "queued"}
    # The answer goes into the next claim's bundle.
    reclaimed = apply(
        new,
        Claim(
            app_id="acme",
            holder="h",
            run_id="run_2",
            now_ms=task.lease_expires_ms + 1,
            lease_ms=LEASE,
        ),
    ).task
    answers = bundle(reclaimed, "https://ether.example")["answers"]
    assert [(a["question"], a["answer"]) for a in answers] == [("Which branch?", "main please")]
    assert "answer" not in heartbeat_view(reclaimed)


def test_answer_after_a_blocked_result_requeues() -> None:
    outcome = apply(interrupted_parked(), Answer(answer="here: abc", now_ms=T0 + 3_000))
    assert outcome.task.status is Status.QUEUED
    assert [e.event for e in outcome.events] == [
        "task.resumed",
        "task.timeline",
        "activity.list_updated",
        "task.harness.ready",
    ]
    assert outcome.task.answers[0].question == "Need a token"


@pytest.mark.parametrize(
    ("answer", "option"),
    [("", None), ("   ", None), ("x", "staging"), ("", "Main")],
)
def test_answer_refusals(answer: str, option: str | None) -> None:
    refused(
        interrupted_live(), Answer(answer=answer, option=option, now_ms=T0 + 3_000), "unprocessable"
    )


def test_answer_twice_is_refused() -> None:
    answered = apply(interrupted_live(), Answer(answer="main", now_ms=T0 + 3_000)).task
    refused(answered, Answer(answer="dev", now_ms=T0 + 3_500), INV)


def test_result_submitted_completes_with_a_delivery() -> None:
    task = running()
    result = Result(
        run_id=RUN,
        status="submitted",
        agent_status="Opened PR #42",
        artifact={"pr": PR},
        working_summary="Changed the coupon rounding.",
        now_ms=T0 + 9_000,
    )
    outcome = apply(task, result)
    new = outcome.task
    assert new.status is Status.COMPLETED
    assert (new.run_id, new.holder, new.lease_expires_ms, new.error) == (None, None, None, None)
    assert shape(outcome) == [
        (TASK_TOPIC, "task.delivered"),
        (TASK_TOPIC, "task.timeline"),
        (ACTIVITY_TOPIC, "activity.list_updated"),
    ]
    delivered = data(outcome.events[0])
    assert (delivered["task_id"], delivered["run_id"]) == (TASK, RUN)
    assert [b["type"] for b in delivered["blocks"]] == ["outcome", "hero", "summary", "actions"]
    assert new.delivery is not None
    assert (new.delivery.status, new.delivery.at) == ("completed", rfc3339_ms(T0 + 9_000))
    assert msgspec.to_builtins(new.delivery.blocks) == delivered["blocks"]
    entry = data(outcome.events[1])["entry"]
    assert (entry["kind"], entry["summary"], entry["result"]) == (
        "delivered",
        "Opened PR #42",
        "submitted",
    )
    assert data(outcome.events[2])["status"] == "completed"


def test_result_no_changes_completes() -> None:
    outcome = apply(running(), Result(run_id=RUN, status="no_changes", now_ms=T0 + 9_000))
    assert outcome.task.status is Status.COMPLETED
    assert [e.event for e in outcome.events] == [
        "task.delivered",
        "task.timeline",
        "activity.list_updated",
    ]
    assert data(outcome.events[0])["blocks"][0]["status"] == "no_changes"


def test_result_blocked_parks_and_ends_the_run() -> None:
    result = Result(
        run_id=RUN,
        status="blocked",
        agent_status="Blocked on credentials",
        question="Which API key should I use?",
        options=["staging", "prod"],
        now_ms=T0 + 9_000,
    )
    outcome = apply(running(), result)
    new = outcome.task
    assert new.status is Status.INTERRUPTED
    assert (new.run_id, new.holder, new.lease_expires_ms) == (None, None, None)
    assert (new.question, new.options) == ("Which API key should I use?", ["staging", "prod"])
    assert shape(outcome) == [
        (TASK_TOPIC, "task.interrupted"),
        (TASK_TOPIC, "task.timeline"),
        (ACTIVITY_TOPIC, "activity.list_updated"),
    ]
    assert data(outcome.events[0]) == {
        "task_id": TASK,
        "run_id": RUN,
        "question": "Which API key should I use?",
        "options": ["staging", "prod"],
    }
    assert data(outcome.events[1])["entry"]["kind"] == "blocked"
    assert new.delivery is None


def test_result_blocked_without_a_question_asks_the_agent_status() -> None:
    result = Result(
        run_id=RUN, status="blocked", agent_status="Need repo access", now_ms=T0 + 9_000
    )
    assert apply(running(), result).task.question == "Need repo access"
    bare = Result(run_id=RUN, status="blocked", now_ms=T0 + 9_000)
    assert apply(running(), bare).task.question


def test_result_failed() -> None:
    result = Result(
        run_id=RUN,
        status="failed",
        agent_status="Tests fail",
        error=" 3 failures ",
        now_ms=T0 + 9_000,
    )
    outcome = apply(running(), result)
    new = outcome.task
    assert (new.status, new.error, new.run_id) == (Status.FAILED, "3 failures", None)
    assert shape(outcome) == [
        (TASK_TOPIC, "task.failed"),
        (TASK_TOPIC, "task.timeline"),
        (ACTIVITY_TOPIC, "activity.list_updated"),
    ]
    failed_event = data(outcome.events[0])
    assert (failed_event["task_id"], failed_event["run_id"]) == (TASK, RUN)
    assert failed_event["blocks"][0] == {
        "type": "outcome",
        "status": "failed",
        "title": "Fix the checkout bug",
        "summary": "The task failed: 3 failures",
    }
    assert new.delivery is not None
    assert new.delivery.status == "failed"
    assert data(outcome.events[1])["entry"]["kind"] == "failed"


def test_expire_requeues() -> None:
    task = running()
    assert task.lease_expires_ms is not None
    refused(task, Expire(now_ms=task.lease_expires_ms - 1), "conflict")
    outcome = apply(task, Expire(now_ms=task.lease_expires_ms))
    new = outcome.task
    assert new.status is Status.QUEUED
    assert (new.run_id, new.holder, new.app_id, new.lease_expires_ms) == (None,) * 4
    assert shape(outcome) == [
        (TASK_TOPIC, "task.timeline"),
        (ACTIVITY_TOPIC, "activity.list_updated"),
        ("harness", "task.harness.ready"),
    ]
    entry = data(outcome.events[0])["entry"]
    assert (entry["kind"], entry["run_id"], entry["status"]) == ("lease_expired", RUN, "queued")
    # The harness whose lease lapsed hears exactly that from then on, also after a new
    # claim; any other stale run still hears run_mismatch.
    later = task.lease_expires_ms + 1
    for make in RUN_BOUND:
        stale = refused(new, make(RUN, later), "lease_expired")
        assert stale.message.startswith(
            f"the lease of run {RUN} on task {TASK} expired at "
            f"{rfc3339_ms(task.lease_expires_ms)} and the run ended (the task is queued now)"
        )
    refused(new, Heartbeat(run_id="run_x", now_ms=later, lease_ms=LEASE), MISMATCH)
    again = Claim(app_id="a", holder="h", run_id="run_2", now_ms=later, lease_ms=LEASE)
    claimed = apply(new, again).task
    assert claimed.attempts == 2
    refused(claimed, Step(run_id=RUN, phase="p", user_message="m", now_ms=later), "lease_expired")


def test_a_takeover_claim_tells_the_old_run_its_lease_expired() -> None:
    task = running()
    assert task.lease_expires_ms is not None
    later = task.lease_expires_ms + 1
    taken = apply(
        task, Claim(app_id="b", holder="h2", run_id="run_2", now_ms=later, lease_ms=LEASE)
    ).task
    refused(taken, Heartbeat(run_id=RUN, now_ms=later, lease_ms=LEASE), "lease_expired")


def test_expire_while_interrupted_ends_the_run_and_the_answer_requeues() -> None:
    task = interrupted_live()
    assert task.lease_expires_ms is not None
    outcome = apply(task, Expire(now_ms=task.lease_expires_ms + 5))
    new = outcome.task
    assert (new.status, new.run_id, new.lease_expires_ms) == (Status.INTERRUPTED, None, None)
    assert new.question == "Which branch?"
    assert shape(outcome) == [(TASK_TOPIC, "task.timeline")]
    refused(new, Expire(now_ms=task.lease_expires_ms + 6), "conflict")
    answered = apply(new, Answer(answer="main", now_ms=task.lease_expires_ms + 10))
    assert answered.task.status is Status.QUEUED


@pytest.mark.parametrize("state", ["queued", "running", "interrupted_live", "interrupted_parked"])
def test_cancel(state: str) -> None:
    task = STATES[state]()
    outcome = apply(task, Cancel(now_ms=T0 + 4_000))
    new = outcome.task
    assert new.status is Status.CANCELLED
    assert (new.run_id, new.lease_expires_ms, new.question) == (None, None, None)
    assert shape(outcome) == [
        (TASK_TOPIC, "task.timeline"),
        (ACTIVITY_TOPIC, "activity.list_updated"),
    ]
    entry = data(outcome.events[0])["entry"]
    assert entry["kind"] == "cancelled"
    assert entry.get("run_id") == task.run_id
    assert data(outcome.events[1])["status"] == "cancelled"


@pytest.mark.parametrize("make", RUN_BOUND)
def test_the_run_of_a_cancelled_task_hears_cancelled(make: Callable[[str, int], Action]) -> None:
    new = apply(running(), Cancel(now_ms=T0 + 2_000)).task
    error = refused(new, make(RUN, T0 + 2_500), CANCELLED)
    assert STATUS[error.code] == 409
    assert error.message == (
        f"task {TASK} was cancelled by its owner; stop working on it (run {RUN} ended)"
    )


def test_an_acknowledged_answer_is_not_repeated() -> None:
    answered = apply(interrupted_live(), Answer(answer="main", now_ms=T0 + 2_500)).task
    assert answered.pending_answer is not None and not answered.answer_told

    def beat(task: Task, seen: bool, at: int) -> Task:
        action = Heartbeat(run_id=RUN, now_ms=at, lease_ms=LEASE, answer_seen=seen)
        return apply(task, action).task

    # An acknowledgement before any heartbeat told the answer cannot swallow it.
    told = beat(answered, True, T0 + 2_600)
    assert told.pending_answer == answered.pending_answer and told.answer_told
    again = beat(told, False, T0 + 2_700)
    assert again.pending_answer == answered.pending_answer
    acked = beat(again, True, T0 + 2_800)
    assert (acked.pending_answer, acked.answer_told) == (None, False)
    assert beat(acked, True, T0 + 2_900).pending_answer is None
    # The answer stays in the history for the next bundle.
    assert [a.answer for a in acked.answers] == ["main"]


# ---------------------------------------------------------------------------------------------
# Run and lease guards


@pytest.mark.parametrize("make", RUN_BOUND)
def test_run_mismatch(make: Callable[[str, int], Action]) -> None:
    error = refused(running(), make("run_x", T0 + 2_000), "run_mismatch")
    assert error.message == "run run_x is not the current run of task task_1 (current: run_1)"


@pytest.mark.parametrize("make", RUN_BOUND)
def test_lease_expired(make: Callable[[str, int], Action]) -> None:
    task = running()
    assert task.lease_expires_ms is not None
    error = refused(task, make(RUN, task.lease_expires_ms), "lease_expired")
    assert rfc3339_ms(task.lease_expires_ms) in error.message
    # One millisecond earlier the lease still holds.
    apply(task, make(RUN, task.lease_expires_ms - 1))


def test_mismatch_is_checked_before_the_lease() -> None:
    task = running()
    assert task.lease_expires_ms is not None
    refused(
        task,
        Heartbeat(run_id="run_x", now_ms=task.lease_expires_ms + 1, lease_ms=LEASE),
        "run_mismatch",
    )


def test_heartbeat_after_the_run_ended_has_no_active_run() -> None:
    error = refused(
        interrupted_parked(),
        Heartbeat(run_id=RUN, now_ms=T0 + 3_000, lease_ms=LEASE),
        "run_mismatch",
    )
    assert error.message.startswith(
        "run run_1 is not the current run of task task_1: it has no active run"
    )


@pytest.mark.parametrize("state", list(STATES))
@pytest.mark.parametrize("make", RUN_BOUND)
def test_a_stale_run_hears_that_its_run_is_over(
    state: str, make: Callable[[str, int], Action]
) -> None:
    """Whatever the status, a run that is not the current one gets run_mismatch, unless the
    task is final (then nothing is accepted: cancelled on a cancelled task, else
    invalid_transition)."""
    task = STATES[state]()
    code = CANCELLED if state == "cancelled" else INV if task.status in TERMINAL else MISMATCH
    refused(task, make("run_x", T0 + 2_500), code)


def test_heartbeat_while_interrupted_after_the_lease_lapsed() -> None:
    task = interrupted_live()
    assert task.lease_expires_ms is not None
    refused(
        task, Heartbeat(run_id=RUN, now_ms=task.lease_expires_ms, lease_ms=LEASE), "lease_expired"
    )


# ---------------------------------------------------------------------------------------------
# Views


def test_bundle() -> None:
    task = apply(
        create(
            definition_of_done="Tests pass",
            scope={"repo": "org/repo", "branch": "main"},
            context_refs=["doc_1"],
        ).task,
        Claim(app_id="acme", holder="h", run_id=RUN, now_ms=T0 + 1, lease_ms=LEASE),
    ).task
    base = "https://ether.example/api/harness/tasks/task_1"
    assert bundle(task, "https://ether.example/") == {
        "schema_version": 2,
        "task_id": TASK,
        "run_id": RUN,
        "prompt": "Fix the checkout bug\n\nThe total is wrong with coupons.",
        "definition_of_done": "Tests pass",
        "scope": {"repo": "org/repo", "branch": "main"},
        "context_refs": ["doc_1"],
        "answers": [],
        "callbacks": {
            "report_step_url": f"{base}/steps",
            "heartbeat_url": f"{base}/heartbeat",
            "interrupt_url": f"{base}/interrupt",
            "result_url": f"{base}/result",
            "websocket_topic": "tasks/task_1",
        },
    }
    assert bundle(queued(), "http://127.0.0.1:8080")["run_id"] is None
    view = claim_view(task, "https://ether.example")
    assert (view["run_id"], view["lease_expires_at"]) == (RUN, rfc3339_ms(T0 + 1 + LEASE))
    assert view["bundle"] == bundle(task, "https://ether.example")
    msgspec.json.encode(view)


def test_task_round_trips_through_json() -> None:
    for make in STATES.values():
        task = make()
        assert msgspec.json.decode(msgspec.json.encode(task), type=Task) == task


# ---------------------------------------------------------------------------------------------
# Property: random action sequences stay inside the table


RUN_STATUSES = {Status.RUNNING, Status.INTERRUPTED}
EXPECTED_CODES = {
    "invalid_transition",
    "cancelled",
    "run_mismatch",
    "lease_expired",
    "already_claimed",
    "conflict",
    "unprocessable",
}


RESULT_STATUSES: list[Literal["submitted", "no_changes", "blocked", "failed"]] = [
    "submitted",
    "no_changes",
    "blocked",
    "failed",
]


# Weighted so that runs get deep (few cancels and creates, which end or fail at once).
KINDS = [
    *["claim"] * 3,
    *["heartbeat"] * 3,
    *["step"] * 3,
    *["interrupt"] * 3,
    *["answer"] * 3,
    *["result"] * 3,
    *["expire"] * 2,
    "cancel",
    "create",
]
# Half of the draws pick from what the status usually sees next, to get deep into runs.
LIKELY = {
    Status.QUEUED: [*["claim"] * 4, "cancel"],
    Status.RUNNING: [
        "heartbeat",
        "step",
        "step",
        "interrupt",
        "result",
        "result",
        "expire",
        "claim",
    ],
    Status.INTERRUPTED: [*["answer"] * 3, "heartbeat", "heartbeat", "cancel", "expire"],
}
# Mostly a few seconds between actions, sometimes (one draw in four) up to two leases.
GAPS_MS = st.one_of(*[st.integers(0, 3_000)] * 3, st.integers(0, 2 * LEASE))


@st.composite
def action_for(draw: st.DrawFn, task: Task, now: int, step: int) -> Action:
    """An action of a random kind, with the right run id more often than not."""
    run_id = draw(
        st.sampled_from([task.run_id or RUN, task.run_id or RUN, "run_stale", f"run_{step}"])
    )
    # Mostly the default lease, sometimes a short or odd one.
    lease = draw(st.sampled_from([LEASE, LEASE, 1, 5_000]) | st.integers(1, 120_000))
    text = draw(st.sampled_from(["", "  ", "main", "dev", "something else"]))
    option = draw(st.sampled_from([None, *task.options, "not offered"]))
    kind = draw(st.sampled_from(LIKELY.get(task.status, KINDS)) | st.sampled_from(KINDS))
    options = draw(st.lists(st.sampled_from(["main", "dev"]), max_size=2, unique=True))
    match kind:
        case "claim":
            return Claim(
                app_id="acme", holder="h", run_id=f"run_{step}", now_ms=now, lease_ms=lease
            )
        case "heartbeat":
            return Heartbeat(run_id=run_id, now_ms=now, lease_ms=lease)
        case "step":
            return Step(run_id=run_id, phase="p", user_message=f"step {step}", now_ms=now)
        case "interrupt":
            return Interrupt(run_id=run_id, question=text, options=options, now_ms=now)
        case "answer":
            return Answer(answer=text, option=option, now_ms=now)
        case "result":
            status = draw(st.sampled_from(RESULT_STATUSES))
            artifact = draw(st.sampled_from([None, {}, {"pr": PR}, {"pr": {"number": "x"}}]))
            return Result(
                run_id=run_id,
                status=status,
                agent_status=text,
                artifact=artifact,
                question=draw(st.sampled_from([None, "", "Why?"])),
                options=options,
                now_ms=now,
            )
        case "cancel":
            return Cancel(now_ms=now)
        case "expire":
            return Expire(now_ms=now)
        case _:
            return Create(task_id=TASK, owner=OWNER, prompt=text or "x", now_ms=now)


def check_task(task: Task) -> None:
    """The invariants every stored task keeps."""
    run_fields = (task.run_id, task.holder, task.app_id, task.lease_expires_ms)
    if task.status is Status.RUNNING:
        assert None not in run_fields
        assert task.question is None
    elif task.status is Status.INTERRUPTED:
        # Either the run that asked is alive (all set) or it ended (none set).
        assert all(f is None for f in run_fields) or None not in run_fields
        assert task.question
        assert task.pending_answer is None
    else:
        assert all(f is None for f in run_fields)
        assert task.pending_answer is None
        assert task.question is None
    if task.pending_answer is not None:
        assert task.pending_answer == task.answers[-1]
    assert (task.delivery is not None) == (task.status in {Status.COMPLETED, Status.FAILED})
    assert task.updated_ms >= task.created_ms


def check_events(old: Task, outcome: Outcome, action: Action) -> None:
    new = outcome.task
    names = [e.event for e in outcome.events]
    topics = {e.topic for e in outcome.events}
    assert topics <= {TASK_TOPIC, ACTIVITY_TOPIC, "harness"}
    for published in outcome.events:
        data(published)
    status_changed = new.status != old.status
    assert names.count("activity.list_updated") == int(status_changed)
    assert names.count("task.harness.ready") == int(status_changed and new.status is Status.QUEUED)
    if isinstance(action, Heartbeat):
        assert names == []
        assert new.updated_ms == old.updated_ms
    else:
        assert "task.timeline" in names
        assert new.updated_ms == action.now_ms
    # Primary first, then timeline, then activity, then harness.ready.
    rank = {"task.timeline": 1, "activity.list_updated": 2, "task.harness.ready": 3}
    ranks = [rank.get(name, 0) for name in names]
    assert ranks == sorted(ranks)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_random_sequences_stay_inside_the_table(data_: st.DataObject) -> None:
    now = data_.draw(st.integers(0, 2**41), label="start")
    task = create(now=now).task
    check_task(task)
    for step in range(data_.draw(st.integers(1, 60), label="length")):
        now += data_.draw(GAPS_MS)
        action = data_.draw(action_for(task, now, step))
        before = snapshot(task)
        rule = TRANSITIONS[task.status].get(type(action))
        try:
            outcome = apply(task, action)
        except Refusal as error:
            event(f"refused {task.status} {type(action).__name__}: {error.code}")
            assert error.code in EXPECTED_CODES, error.message
            assert snapshot(task) == before
            if rule is None:
                if isinstance(action, Create):
                    expected = "conflict"
                elif task.status is Status.CANCELLED and isinstance(
                    action, Heartbeat | Step | Interrupt | Result
                ):
                    expected = CANCELLED
                elif (
                    isinstance(action, Heartbeat | Step | Interrupt | Result)
                    and task.status not in TERMINAL
                    and action.run_id != task.run_id
                ):
                    # A stale run: its run is over, whatever the status (the one whose
                    # lease lapsed hears why).
                    lapsed = task.lapsed_run
                    expired = lapsed is not None and lapsed.run_id == action.run_id
                    expected = "lease_expired" if expired else MISMATCH
                else:
                    expected = INV
                assert error.code == expected, error.message
            if task.status in TERMINAL and data_.draw(st.booleans(), label="restart"):
                # Absorption seen; go on with a new task so the sequence keeps exploring.
                task = create(now=now).task
            continue
        assert task.status not in TERMINAL, "terminal states absorb everything"
        assert rule is not None
        assert outcome.task.status in rule.targets
        assert outcome.task.version == task.version + 1
        assert outcome.task.id == task.id
        check_task(outcome.task)
        check_events(task, outcome, action)
        event(f"{task.status} {type(action).__name__} -> {outcome.task.status}")
        task = outcome.task
