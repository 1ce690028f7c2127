"""The task lifecycle: one transition table, and the events each transition publishes.

Theory of operation
===================

Everything that changes a task goes through ``apply(task, action)``, and everything that
decides whether a change is allowed lives in this file. ``apply`` is pure: it takes the task
as the store holds it (``None`` before it exists) and an *action* (a msgspec Struct carrying
the request's fields plus ``now_ms``), and returns an ``Outcome``: the new task and the events
to publish, in order. It never reads a clock, makes an id or touches I/O; the caller passes
``now_ms``, the new ``task_id`` and ``run_id``, and stores the outcome with optimistic
concurrency on ``Task.version``. A refused action raises ``Refusal`` and changes nothing
(tasks are immutable, so "nothing" is guaranteed rather than promised).

Statuses: ``queued`` (claimable), ``running`` (a run holds the lease), ``interrupted``
(parked, waiting for the user), and the final ``completed``, ``failed``, ``cancelled``.

A *run* is one attempt by one harness: ``run_id``, ``holder`` (the harness principal),
``app_id`` and ``lease_expires_ms`` are set together by a claim and cleared together when the
run ends. A lease is valid while ``now_ms < lease_expires_ms``. ``interrupted`` comes in two
kinds: after ``interrupt`` the run stays alive (the harness keeps heartbeating and learns the
answer from the heartbeat); after a ``blocked`` result the run has ended and an answer puts
the task back in the queue for a fresh claim.

``TRANSITIONS[status][type(action)]`` is the table (h11 ``_state.py`` style). A missing entry
is ``invalid_transition`` (or ``run_mismatch``, see the guard order below); a present entry
names the handler and the statuses it may lead to (checked on every call):

=============  ===========  ==========================  =======================================
from           action       to                          guards
=============  ===========  ==========================  =======================================
(none)         Create       queued                      non-empty prompt
queued         Claim        running                     new run, lease
queued         Cancel       cancelled
running        Claim        running                     only once the lease lapsed (takeover),
                                                        else ``already_claimed``
running        Heartbeat    running                     run, lease; extends the lease
running        Step         running                     run, lease
running        Interrupt    interrupted                 run, lease; the run stays alive
running        Result       completed | interrupted |   run, lease; submitted and no_changes
                            failed                      complete, blocked parks (the run
                                                        ends), failed fails
running        Expire       queued                      lease lapsed, else ``conflict``
running        Cancel       cancelled                   the run ends; it hears ``cancelled``
interrupted    Heartbeat    interrupted                 run alive, run, lease
interrupted    Answer       running | queued            running if the run's lease is still
                                                        valid, else queued
interrupted    Cancel       cancelled
interrupted    Expire       interrupted                 the run's lease lapsed: the run ends
=============  ===========  ==========================  =======================================

Guards run in a fixed order: existence (``not_found``, ``conflict`` for a second create),
cancellation (``cancelled``), run (``run_mismatch`` or ``lease_expired``), table
(``invalid_transition``), lease (``lease_expired``), then the payload (``unprocessable``).
Every run call (heartbeat, step, interrupt, result) on a cancelled task is ``cancelled``:
that is how a harness learns that the owner cancelled the task it was running. The run
guard applies to the run calls on a task that is not final, and it comes before the table:
a ``run_id`` that is not the task's current run is ``run_mismatch`` whatever the status, so
a harness whose run is over (a ``blocked`` result parked it, another harness took it over)
hears exactly that, never ``invalid_transition``; except the run whose lease lapsed last
(``Task.lapsed_run``: the sweep requeued the task, or a takeover claim ended it), which
hears ``lease_expired``. A run call from the current run that the status does not take (a
step while interrupted) is ``invalid_transition``, and so is every run call on a completed
or failed task.

Events. A handler returns its *primary* events (``os.harness.step``, ``task.interrupted``,
``task.resumed``, ``task.delivered``, ``task.failed``) and its timeline entries; ``apply``
then adds the rest by rule, so the order is always: primary, ``task.timeline``,
``activity.list_updated`` on ``activity/{owner}`` when the status changed, and
``task.harness.ready`` on ``harness`` when the task became ``queued``. Event data is the
event's own fields as a JSON object; the envelope (``type``, ``event``, ``topic``,
``offset``, ``ts``) is added where events are published.

Bookkeeping. ``version`` grows by one per accepted action (heartbeats included: the lease
changed). ``updated_ms`` moves only when something a person can see happened, that is when
the action published events: heartbeats do not reorder the task grid. Every answer is
appended to ``answers`` (the next bundle carries them all); an answer given while the run is
alive is also kept in ``pending_answer`` for the heartbeat until the run moves on (its next
step, interrupt or result), ends, or acknowledges it: a heartbeat with ``answer_seen`` drops
an answer an earlier heartbeat already told (``answer_told``), so an acknowledgement can
never swallow an answer the harness has not heard yet.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any, ClassVar, Final, Literal, NamedTuple

import msgspec

from etherd.core.delivery import Block, Delivery, OutcomeBlock, compose, outcome_status
from etherd.core.errors import Refusal
from etherd.core.events import NewEvent
from etherd.core.rfc3339 import rfc3339_ms

__all__ = [
    "HARNESS_TOPIC",
    "TERMINAL",
    "TRANSITIONS",
    "Action",
    "ActivityListUpdated",
    "Answer",
    "AnswerEntry",
    "Cancel",
    "Claim",
    "Create",
    "Expire",
    "HarnessReady",
    "HarnessStep",
    "Heartbeat",
    "Interrupt",
    "LapsedRun",
    "LastStep",
    "Outcome",
    "Result",
    "Rule",
    "Status",
    "Step",
    "Task",
    "TaskDelivered",
    "TaskFailed",
    "TaskInterrupted",
    "TaskResumed",
    "TaskTimeline",
    "TimelineEntry",
    "activity_topic",
    "apply",
    "task_topic",
]

HARNESS_TOPIC: Final = "harness"
# A title made from the prompt is cut to this many characters (an ellipsis included).
TITLE_MAX_CHARS: Final = 80
# The question a blocked result parks with when the harness gave neither question nor status.
BLOCKED_QUESTION: Final = "The agent is blocked and needs your input to continue."


class Status(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    INTERRUPTED = "interrupted"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL: Final = frozenset({Status.COMPLETED, Status.FAILED, Status.CANCELLED})


def task_topic(task_id: str) -> str:
    """The topic that carries everything about one task."""
    return f"tasks/{task_id}"


def activity_topic(owner: str) -> str:
    """The topic of one user's task grid."""
    return f"activity/{owner}"


# ---------------------------------------------------------------------------------------------
# The task row


class AnswerEntry(msgspec.Struct, kw_only=True, frozen=True):
    """A question the task asked and the user's answer to it."""

    question: str
    answer: str
    option: str | None = None
    # RFC 3339 UTC with milliseconds.
    at: str


class LastStep(msgspec.Struct, kw_only=True, frozen=True):
    """The latest step a harness reported, for the task view on page load."""

    phase: str
    user_message: str
    internal_label: str
    run_id: str
    at: str


class LapsedRun(msgspec.Struct, kw_only=True, frozen=True):
    """The latest run whose lease lapsed, so its late calls hear ``lease_expired``."""

    run_id: str
    lease_expires_ms: int


class Task(msgspec.Struct, kw_only=True, frozen=True):
    """One task as the store keeps it. Times are milliseconds since the epoch (UTC)."""

    id: str
    owner: str
    title: str
    prompt: str
    definition_of_done: str | None = None
    scope: dict[str, Any] = msgspec.field(default_factory=dict)
    context_refs: list[Any] = msgspec.field(default_factory=list)
    status: Status
    created_ms: int
    updated_ms: int
    # +1 per accepted action; the store writes only if the version it read is still current.
    version: int = 1
    # The current run: all four set together by a claim, cleared together when it ends.
    run_id: str | None = None
    holder: str | None = None
    app_id: str | None = None
    lease_expires_ms: int | None = None
    # The pending question while interrupted.
    question: str | None = None
    options: list[str] = msgspec.field(default_factory=list)
    answers: list[AnswerEntry] = msgspec.field(default_factory=list)
    pending_answer: AnswerEntry | None = None
    # Whether a heartbeat already told ``pending_answer`` (only such an answer can be acked).
    answer_told: bool = False
    lapsed_run: LapsedRun | None = None
    last_step: LastStep | None = None
    delivery: Delivery | None = None
    error: str | None = None
    # How many times the task was claimed.
    attempts: int = 0


# ---------------------------------------------------------------------------------------------
# Actions: the inputs of apply()


class Create(msgspec.Struct, kw_only=True, frozen=True):
    task_id: str
    owner: str
    prompt: str
    # Made from the prompt's first line when missing or blank.
    title: str | None = None
    definition_of_done: str | None = None
    scope: dict[str, Any] = msgspec.field(default_factory=dict)
    context_refs: list[Any] = msgspec.field(default_factory=list)
    now_ms: int


class Claim(msgspec.Struct, kw_only=True, frozen=True):
    app_id: str
    # The harness principal (token ``sub``) that will hold the run.
    holder: str
    # The new run's id, made by the caller.
    run_id: str
    now_ms: int
    lease_ms: int


class Heartbeat(msgspec.Struct, kw_only=True, frozen=True):
    run_id: str
    now_ms: int
    lease_ms: int
    # The harness heard the answer an earlier heartbeat told: stop repeating it.
    answer_seen: bool = False


class Step(msgspec.Struct, kw_only=True, frozen=True):
    run_id: str
    phase: str
    user_message: str
    internal_label: str = ""
    now_ms: int


class Interrupt(msgspec.Struct, kw_only=True, frozen=True):
    run_id: str
    question: str
    options: list[str] = msgspec.field(default_factory=list)
    now_ms: int


class Answer(msgspec.Struct, kw_only=True, frozen=True):
    answer: str
    # One of the offered options, when the question offered some.
    option: str | None = None
    now_ms: int


class Result(msgspec.Struct, kw_only=True, frozen=True):
    run_id: str
    status: Literal["submitted", "no_changes", "blocked", "failed"]
    agent_status: str = ""
    artifact: dict[str, Any] | None = None
    working_summary: str | None = None
    # For ``blocked``: what to ask the user.
    question: str | None = None
    options: list[str] = msgspec.field(default_factory=list)
    # For ``failed``: what went wrong.
    error: str | None = None
    now_ms: int


class Cancel(msgspec.Struct, kw_only=True, frozen=True):
    now_ms: int


class Expire(msgspec.Struct, kw_only=True, frozen=True):
    """The lease sweep: ends a run whose lease has lapsed."""

    now_ms: int


Action = Create | Claim | Heartbeat | Step | Interrupt | Answer | Result | Cancel | Expire


# ---------------------------------------------------------------------------------------------
# Events: each struct is the event's data (no envelope); ``name`` is the event name.


class HarnessStep(msgspec.Struct, kw_only=True, frozen=True):
    name: ClassVar[str] = "os.harness.step"
    task_id: str
    run_id: str
    phase: str
    user_message: str
    internal_label: str


class TaskInterrupted(msgspec.Struct, kw_only=True, frozen=True):
    name: ClassVar[str] = "task.interrupted"
    task_id: str
    run_id: str
    question: str
    options: list[str]


class TaskResumed(msgspec.Struct, kw_only=True, frozen=True):
    name: ClassVar[str] = "task.resumed"
    task_id: str
    answer: str
    # ``running`` when the run goes on, ``queued`` when a new claim must pick the task up.
    status: Status


class TaskDelivered(msgspec.Struct, kw_only=True, frozen=True):
    name: ClassVar[str] = "task.delivered"
    task_id: str
    run_id: str
    blocks: list[Block]


class TaskFailed(msgspec.Struct, kw_only=True, frozen=True):
    name: ClassVar[str] = "task.failed"
    task_id: str
    run_id: str
    blocks: list[Block]


class TimelineEntry(msgspec.Struct, kw_only=True, frozen=True, omit_defaults=True):
    """One line of a task's timeline; fields that do not apply are left out."""

    kind: Literal[
        "created",
        "claimed",
        "step",
        "interrupted",
        "answered",
        "delivered",
        "blocked",
        "failed",
        "lease_expired",
        "cancelled",
    ]
    at: str
    summary: str
    # The task's status after this entry.
    status: Status
    run_id: str | None = None
    phase: str | None = None
    # The result status, for entries a result made.
    result: str | None = None


class TaskTimeline(msgspec.Struct, kw_only=True, frozen=True):
    name: ClassVar[str] = "task.timeline"
    task_id: str
    entry: TimelineEntry


class ActivityListUpdated(msgspec.Struct, kw_only=True, frozen=True):
    name: ClassVar[str] = "activity.list_updated"
    task_id: str
    status: Status
    title: str
    updated_at: str


class HarnessReady(msgspec.Struct, kw_only=True, frozen=True):
    name: ClassVar[str] = "task.harness.ready"
    task_id: str
    title: str
    created_at: str


_PrimaryEvent = HarnessStep | TaskInterrupted | TaskResumed | TaskDelivered | TaskFailed


class Outcome(msgspec.Struct, frozen=True):
    """What an accepted action produced: the task to store and the events to publish."""

    task: Task
    events: list[NewEvent]


class _Change(NamedTuple):
    """What a handler returns; ``apply`` stamps it and turns it into an ``Outcome``."""

    task: Task
    primary: list[_PrimaryEvent]
    timeline: list[TimelineEntry]


# ---------------------------------------------------------------------------------------------
# Guards

# The fields of a run, cleared together when the run ends.
_NO_RUN: Final[dict[str, Any]] = {
    "run_id": None,
    "holder": None,
    "app_id": None,
    "lease_expires_ms": None,
    "pending_answer": None,
    "answer_told": False,
}


def _lease_live(task: Task, now_ms: int) -> bool:
    return task.lease_expires_ms is not None and now_ms < task.lease_expires_ms


def _run_mismatch(task: Task, run_id: str) -> Refusal | None:
    """``run_mismatch`` when ``run_id`` is not the task's current run, else None.

    The run whose lease lapsed last hears ``lease_expired`` instead: that is why it lost
    the task.
    """
    if run_id == task.run_id:
        return None
    lapsed = task.lapsed_run
    if lapsed is not None and lapsed.run_id == run_id:
        expired = rfc3339_ms(lapsed.lease_expires_ms)
        return Refusal(
            "lease_expired",
            f"the lease of run {run_id} on task {task.id} expired at {expired} and the run "
            f"ended (the task is {task.status} now); claim the task again once it is queued",
        )
    if task.run_id is None:
        return Refusal(
            "run_mismatch",
            f"run {run_id} is not the current run of task {task.id}: it has no active run "
            f"(it is {task.status}; the run ended, claim the task again once it is queued)",
        )
    return Refusal(
        "run_mismatch",
        f"run {run_id} is not the current run of task {task.id} (current: {task.run_id})",
    )


def _check_run(task: Task, run_id: str, now_ms: int) -> None:
    """Refuse unless ``run_id`` is the task's current run and its lease is still valid."""
    mismatch = _run_mismatch(task, run_id)
    if mismatch is not None:
        raise mismatch
    if not _lease_live(task, now_ms):
        expired = rfc3339_ms(task.lease_expires_ms or 0)
        raise Refusal(
            "lease_expired",
            f"the lease of run {run_id} on task {task.id} expired at {expired}; "
            "claim the task again once it is queued",
        )


def _text(value: str, what: str) -> str:
    """``value`` stripped, or ``unprocessable`` when it is blank."""
    stripped = value.strip()
    if not stripped:
        raise Refusal("unprocessable", f"{what} must not be empty")
    return stripped


def _title_from(prompt: str) -> str:
    """A title from the prompt's first non-blank line, cut to ``TITLE_MAX_CHARS``."""
    line = next(line for line in prompt.splitlines() if line.strip())
    title = " ".join(line.split())
    if len(title) > TITLE_MAX_CHARS:
        title = title[: TITLE_MAX_CHARS - 1].rstrip() + "…"
    return title


# ---------------------------------------------------------------------------------------------
# Handlers: one per table entry. Each checks its guards and returns the change.


def _create(_: None, a: Create) -> _Change:
    prompt = _text(a.prompt, "prompt")
    title = (a.title or "").strip() or _title_from(prompt)
    task = Task(
        id=a.task_id,
        owner=a.owner,
        title=title,
        prompt=a.prompt,
        definition_of_done=a.definition_of_done,
        scope=a.scope,
        context_refs=a.context_refs,
        status=Status.QUEUED,
        created_ms=a.now_ms,
        updated_ms=a.now_ms,
    )
    entry = TimelineEntry(
        kind="created", at=rfc3339_ms(a.now_ms), summary="Task created", status=Status.QUEUED
    )
    return _Change(task, [], [entry])


def _claim(task: Task, a: Claim) -> _Change:
    at = rfc3339_ms(a.now_ms)
    timeline: list[TimelineEntry] = []
    if task.status is Status.RUNNING:
        # A running task is claimable again only once its lease lapsed and the sweep has not
        # requeued it yet: the new claim takes over and the old run ends here.
        if _lease_live(task, a.now_ms):
            until = rfc3339_ms(task.lease_expires_ms or 0)
            raise Refusal(
                "already_claimed",
                f"task {task.id} is already claimed by run {task.run_id} until {until}",
            )
        timeline.append(
            TimelineEntry(
                kind="lease_expired",
                at=at,
                summary=f"The lease of run {task.run_id} expired",
                status=Status.RUNNING,
                run_id=task.run_id,
            )
        )
        task = msgspec.structs.replace(task, lapsed_run=_lapsed(task))
    attempts = task.attempts + 1
    new = msgspec.structs.replace(
        task,
        status=Status.RUNNING,
        run_id=a.run_id,
        holder=a.holder,
        app_id=a.app_id,
        lease_expires_ms=a.now_ms + a.lease_ms,
        pending_answer=None,
        answer_told=False,
        attempts=attempts,
    )
    timeline.append(
        TimelineEntry(
            kind="claimed",
            at=at,
            summary=f"Claimed by {a.app_id} (attempt {attempts})",
            status=Status.RUNNING,
            run_id=a.run_id,
        )
    )
    return _Change(new, [], timeline)


def _heartbeat(task: Task, a: Heartbeat) -> _Change:
    _check_run(task, a.run_id, a.now_ms)
    pending = task.pending_answer
    told = pending is not None
    if a.answer_seen and task.answer_told:
        # Only an answer a heartbeat already told can be acknowledged: one that arrived
        # since is still news, and this heartbeat tells it.
        pending, told = None, False
    new = msgspec.structs.replace(
        task, lease_expires_ms=a.now_ms + a.lease_ms, pending_answer=pending, answer_told=told
    )
    return _Change(new, [], [])


def _step(task: Task, a: Step) -> _Change:
    _check_run(task, a.run_id, a.now_ms)
    at = rfc3339_ms(a.now_ms)
    step = LastStep(
        phase=a.phase,
        user_message=a.user_message,
        internal_label=a.internal_label,
        run_id=a.run_id,
        at=at,
    )
    new = msgspec.structs.replace(task, last_step=step, pending_answer=None, answer_told=False)
    event = HarnessStep(
        task_id=task.id,
        run_id=a.run_id,
        phase=a.phase,
        user_message=a.user_message,
        internal_label=a.internal_label,
    )
    entry = TimelineEntry(
        kind="step",
        at=at,
        summary=a.user_message,
        status=Status.RUNNING,
        run_id=a.run_id,
        phase=a.phase,
    )
    return _Change(new, [event], [entry])


def _interrupt(task: Task, a: Interrupt) -> _Change:
    _check_run(task, a.run_id, a.now_ms)
    question = _text(a.question, "question")
    new = msgspec.structs.replace(
        task,
        status=Status.INTERRUPTED,
        question=question,
        options=list(a.options),
        pending_answer=None,
        answer_told=False,
    )
    event = TaskInterrupted(
        task_id=task.id, run_id=a.run_id, question=question, options=list(a.options)
    )
    entry = TimelineEntry(
        kind="interrupted",
        at=rfc3339_ms(a.now_ms),
        summary=question,
        status=Status.INTERRUPTED,
        run_id=a.run_id,
    )
    return _Change(new, [event], [entry])


def _answer(task: Task, a: Answer) -> _Change:
    if a.option is not None and a.option not in task.options:
        offered = ", ".join(repr(o) for o in task.options) or "none"
        raise Refusal(
            "unprocessable",
            f"option {a.option!r} is not one of the options task {task.id} offered ({offered})",
        )
    text = a.answer.strip() or (a.option or "")
    if not text:
        raise Refusal("unprocessable", "answer must not be empty (give an answer or an option)")
    at = rfc3339_ms(a.now_ms)
    entry = AnswerEntry(question=task.question or "", answer=text, option=a.option, at=at)
    answered: dict[str, Any] = {
        "question": None,
        "options": [],
        "answers": [*task.answers, entry],
    }
    if task.run_id is not None and _lease_live(task, a.now_ms):
        # The run that asked is still alive: it goes on and hears the answer by heartbeat.
        new = msgspec.structs.replace(
            task, status=Status.RUNNING, pending_answer=entry, answer_told=False, **answered
        )
    else:
        # No live run to hear it: the answer waits in the next claim's bundle.
        new = msgspec.structs.replace(task, status=Status.QUEUED, **answered, **_NO_RUN)
    event = TaskResumed(task_id=task.id, answer=text, status=new.status)
    line = TimelineEntry(
        kind="answered", at=at, summary=f"Answered: {text}", status=new.status, run_id=new.run_id
    )
    return _Change(new, [event], [line])


def _result(task: Task, a: Result) -> _Change:
    _check_run(task, a.run_id, a.now_ms)
    at = rfc3339_ms(a.now_ms)
    if a.status == "blocked":
        question = (a.question or "").strip() or a.agent_status.strip() or BLOCKED_QUESTION
        new = msgspec.structs.replace(
            task,
            status=Status.INTERRUPTED,
            question=question,
            options=list(a.options),
            **_NO_RUN,
        )
        event: _PrimaryEvent = TaskInterrupted(
            task_id=task.id, run_id=a.run_id, question=question, options=list(a.options)
        )
        entry = TimelineEntry(
            kind="blocked",
            at=at,
            summary=question,
            status=new.status,
            run_id=a.run_id,
            result=a.status,
        )
        return _Change(new, [event], [entry])

    blocks = compose(task.title, a)
    outcome = outcome_status(a.status)
    failed = outcome == "failed"
    new = msgspec.structs.replace(
        task,
        status=Status.FAILED if failed else Status.COMPLETED,
        delivery=Delivery(blocks=blocks, status=outcome, at=at),
        error=((a.error or "").strip() or None) if failed else None,
        question=None,
        options=[],
        **_NO_RUN,
    )
    if failed:
        event = TaskFailed(task_id=task.id, run_id=a.run_id, blocks=blocks)
    else:
        event = TaskDelivered(task_id=task.id, run_id=a.run_id, blocks=blocks)
    headline = blocks[0]
    assert isinstance(headline, OutcomeBlock)  # compose() always leads with the outcome
    summary = a.agent_status.strip() or headline.summary
    entry = TimelineEntry(
        kind="failed" if failed else "delivered",
        at=at,
        summary=summary,
        status=new.status,
        run_id=a.run_id,
        result=a.status,
    )
    return _Change(new, [event], [entry])


def _expire(task: Task, a: Expire) -> _Change:
    if task.run_id is None:
        raise Refusal(
            "conflict", f"task {task.id} holds no lease: it is {task.status} and its run ended"
        )
    if _lease_live(task, a.now_ms):
        until = rfc3339_ms(task.lease_expires_ms or 0)
        raise Refusal(
            "conflict", f"the lease of run {task.run_id} on task {task.id} is valid until {until}"
        )
    # A running task goes back to the queue; an interrupted one keeps waiting for its answer,
    # which will then queue it instead of resuming the run.
    status = Status.QUEUED if task.status is Status.RUNNING else Status.INTERRUPTED
    new = msgspec.structs.replace(task, status=status, lapsed_run=_lapsed(task), **_NO_RUN)
    entry = TimelineEntry(
        kind="lease_expired",
        at=rfc3339_ms(a.now_ms),
        summary=f"The lease of run {task.run_id} expired",
        status=status,
        run_id=task.run_id,
    )
    return _Change(new, [], [entry])


def _lapsed(task: Task) -> LapsedRun:
    """The task's current run, as the run whose lease lapsed."""
    assert task.run_id is not None and task.lease_expires_ms is not None
    return LapsedRun(run_id=task.run_id, lease_expires_ms=task.lease_expires_ms)


def _cancel(task: Task, a: Cancel) -> _Change:
    new = msgspec.structs.replace(
        task, status=Status.CANCELLED, question=None, options=[], **_NO_RUN
    )
    # A running task's run ends here; its harness hears ``cancelled`` on its next call.
    entry = TimelineEntry(
        kind="cancelled",
        at=rfc3339_ms(a.now_ms),
        summary="Task cancelled",
        status=new.status,
        run_id=task.run_id,
    )
    return _Change(new, [], [entry])


# ---------------------------------------------------------------------------------------------
# The table


class Rule(NamedTuple):
    """One table entry: who handles the action and which statuses it may lead to."""

    handler: Callable[[Any, Any], _Change]
    targets: frozenset[Status]


def _rule(handler: Callable[[Any, Any], _Change], *targets: Status) -> Rule:
    return Rule(handler, frozenset(targets))


TRANSITIONS: Final[dict[Status | None, dict[type[Any], Rule]]] = {
    None: {
        Create: _rule(_create, Status.QUEUED),
    },
    Status.QUEUED: {
        Claim: _rule(_claim, Status.RUNNING),
        Cancel: _rule(_cancel, Status.CANCELLED),
    },
    Status.RUNNING: {
        Claim: _rule(_claim, Status.RUNNING),
        Heartbeat: _rule(_heartbeat, Status.RUNNING),
        Step: _rule(_step, Status.RUNNING),
        Interrupt: _rule(_interrupt, Status.INTERRUPTED),
        Result: _rule(_result, Status.COMPLETED, Status.INTERRUPTED, Status.FAILED),
        Expire: _rule(_expire, Status.QUEUED),
        Cancel: _rule(_cancel, Status.CANCELLED),
    },
    Status.INTERRUPTED: {
        Heartbeat: _rule(_heartbeat, Status.INTERRUPTED),
        Answer: _rule(_answer, Status.RUNNING, Status.QUEUED),
        Cancel: _rule(_cancel, Status.CANCELLED),
        Expire: _rule(_expire, Status.INTERRUPTED),
    },
    Status.COMPLETED: {},
    Status.FAILED: {},
    Status.CANCELLED: {},
}

_VERBS: Final[dict[type[Any], str]] = {
    Create: "create",
    Claim: "claim",
    Heartbeat: "heartbeat",
    Step: "report a step on",
    Interrupt: "interrupt",
    Answer: "answer",
    Result: "post a result on",
    Cancel: "cancel",
    Expire: "expire the lease of",
}
# Where each action is accepted, for refusals; test_tasks.py keeps these in step with the table.
_ALLOWED: Final[dict[type[Any], str]] = {
    Claim: "claimable only when queued",
    Heartbeat: "heartbeats are accepted only while running or interrupted with a live run",
    Step: "steps are accepted only while running",
    Interrupt: "interrupts are accepted only while running",
    Answer: "answers are accepted only while interrupted",
    Result: "results are accepted only while running",
    Cancel: "cancellable only while queued, running or interrupted",
    Expire: "only a running or interrupted task holds a lease",
}


def _refusal(task: Task, action: Action) -> Refusal:
    """Why the table has no entry for ``action`` in the task's status.

    A run call from a run that is not the task's current one is ``run_mismatch`` (its run is
    over) or ``lease_expired`` (its lease lapsed) unless the task is final; everything else
    is ``invalid_transition`` naming the status, the action and where it is accepted.
    """
    if isinstance(action, Heartbeat | Step | Interrupt | Result) and task.status not in TERMINAL:
        mismatch = _run_mismatch(task, action.run_id)
        if mismatch is not None:
            return mismatch
    kind = type(action)
    state = f"it is {task.status}"
    if kind is Answer:
        state += " and asks no question"
    elif task.status in TERMINAL:
        state += ", which is final"
    return Refusal(
        "invalid_transition", f"cannot {_VERBS[kind]} task {task.id}: {state} ({_ALLOWED[kind]})"
    )


_encode = msgspec.json.Encoder().encode


def apply(task: Task | None, action: Action) -> Outcome:
    """Apply one action to a task.

    Args:
        task: the task as stored, or ``None`` when it does not exist yet.
        action: what was asked, with the caller's ``now_ms``.

    Returns:
        The new task (``version`` + 1) and the events to publish, in order.

    Raises:
        Refusal: ``not_found``, ``conflict``, ``cancelled``, ``invalid_transition``,
            ``run_mismatch``, ``lease_expired``, ``already_claimed`` or ``unprocessable``;
            nothing changed.
    """
    if task is None and not isinstance(action, Create):
        raise Refusal("not_found", f"cannot {_VERBS[type(action)]} a task that does not exist")
    if task is not None and isinstance(action, Create):
        raise Refusal("conflict", f"task {task.id} already exists")
    if (
        task is not None
        and task.status is Status.CANCELLED
        and isinstance(action, Heartbeat | Step | Interrupt | Result)
    ):
        raise Refusal(
            "cancelled",
            f"task {task.id} was cancelled by its owner; stop working on it "
            f"(run {action.run_id} ended)",
        )
    old_status = task.status if task is not None else None
    rule = TRANSITIONS[old_status].get(type(action))
    if rule is None:
        assert task is not None  # from None, the only action (Create) is in the table
        raise _refusal(task, action)
    change = rule.handler(task, action)
    new = change.task
    assert new.status in rule.targets, (old_status, type(action), new.status)

    visible = bool(change.primary or change.timeline)
    if task is not None:
        new = msgspec.structs.replace(
            new,
            version=task.version + 1,
            updated_ms=action.now_ms if visible else task.updated_ms,
        )
    topic = task_topic(new.id)
    events = [NewEvent(topic, event.name, _encode(event)) for event in change.primary]
    events.extend(
        NewEvent(topic, TaskTimeline.name, _encode(TaskTimeline(task_id=new.id, entry=entry)))
        for entry in change.timeline
    )
    if new.status != old_status:
        activity = ActivityListUpdated(
            task_id=new.id,
            status=new.status,
            title=new.title,
            updated_at=rfc3339_ms(new.updated_ms),
        )
        events.append(NewEvent(activity_topic(new.owner), activity.name, _encode(activity)))
        if new.status is Status.QUEUED:
            ready = HarnessReady(
                task_id=new.id, title=new.title, created_at=rfc3339_ms(new.created_ms)
            )
            events.append(NewEvent(HARNESS_TOPIC, ready.name, _encode(ready)))
    return Outcome(new, events)
