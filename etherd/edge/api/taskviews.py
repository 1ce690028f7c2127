"""The response bodies of the task routes: what a page, a task grid and a harness see.

Each is a msgspec Struct, so the shapes are declared in one place (and can be described
as JSON Schema). Times go out as RFC 3339 with milliseconds; the task row's internal
fields (``version``, ``holder`` and the millisecond times) are never shown.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec

from etherd.core.delivery import Block, Delivery, OutcomeStatus
from etherd.core.rfc3339 import rfc3339_ms
from etherd.core.tasks import AnswerEntry, LastStep, Status, Task, task_topic

__all__ = [
    "BUNDLE_SCHEMA_VERSION",
    "ActivityItem",
    "ActivityPage",
    "Bundle",
    "Callbacks",
    "ClaimView",
    "ClaimableItem",
    "ClaimablePage",
    "DeliveryView",
    "HeartbeatView",
    "ResultView",
    "RunView",
    "TaskView",
    "TimelineItem",
    "TimelinePage",
    "bundle",
    "claim_view",
    "heartbeat_view",
    "run_view",
    "task_view",
]

BUNDLE_SCHEMA_VERSION: Final = 2


def _at(ms: int | None) -> str | None:
    return None if ms is None else rfc3339_ms(ms)


class TaskView(msgspec.Struct, kw_only=True):
    """``GET /api/tasks/{id}``: everything a page needs on load.

    ``task_id`` names the task as every other body does; ``id`` carries the same value for
    clients written before ``task_id`` was added.
    """

    task_id: str
    id: str
    owner: str
    title: str
    prompt: str
    definition_of_done: str | None
    scope: dict[str, Any]
    context_refs: list[Any]
    status: Status
    run_id: str | None
    app_id: str | None
    question: str | None
    options: list[str]
    answers: list[AnswerEntry]
    pending_answer: AnswerEntry | None
    last_step: LastStep | None
    delivery: Delivery | None
    error: str | None
    attempts: int
    created_at: str
    updated_at: str
    lease_expires_at: str | None
    topic: str


def task_view(task: Task) -> TaskView:
    """The page's view of a task."""
    return TaskView(
        task_id=task.id,
        id=task.id,
        owner=task.owner,
        title=task.title,
        prompt=task.prompt,
        definition_of_done=task.definition_of_done,
        scope=task.scope,
        context_refs=task.context_refs,
        status=task.status,
        run_id=task.run_id,
        app_id=task.app_id,
        question=task.question,
        options=task.options,
        answers=task.answers,
        pending_answer=task.pending_answer,
        last_step=task.last_step,
        delivery=task.delivery,
        error=task.error,
        attempts=task.attempts,
        created_at=rfc3339_ms(task.created_ms),
        updated_at=rfc3339_ms(task.updated_ms),
        lease_expires_at=_at(task.lease_expires_ms),
        topic=task_topic(task.id),
    )


class DeliveryView(msgspec.Struct, kw_only=True):
    """``GET /api/tasks/{id}/delivery``: the persisted delivery card."""

    task_id: str
    blocks: list[Block]
    status: OutcomeStatus
    # RFC 3339 UTC with milliseconds: when the result was accepted.
    at: str


def delivery_view(task: Task, delivery: Delivery) -> DeliveryView:
    """A task's delivery as ``GET /api/tasks/{id}/delivery`` answers it."""
    return DeliveryView(
        task_id=task.id, blocks=delivery.blocks, status=delivery.status, at=delivery.at
    )


class TimelineItem(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One timeline entry with the offset of the ``task.timeline`` event that carried it."""

    offset: int
    kind: str
    at: str
    summary: str
    # The task's status after this entry.
    status: Status
    run_id: str | None = None
    phase: str | None = None
    result: str | None = None


class TimelinePage(msgspec.Struct, kw_only=True):
    """``GET /api/tasks/{id}/timeline``: entries after ``since``; ``next`` continues."""

    task_id: str
    entries: list[TimelineItem]
    next: int


class ActivityItem(msgspec.Struct, kw_only=True):
    """One row of the caller's task grid."""

    task_id: str
    status: Status
    title: str
    last_step_message: str | None
    updated_at: str


class ActivityPage(msgspec.Struct, kw_only=True):
    """``GET /api/activity``: a page of the grid, newest change first."""

    tasks: list[ActivityItem]
    next_cursor: str | None


def activity_item(task: Task) -> ActivityItem:
    """A task as a row of the task grid."""
    return ActivityItem(
        task_id=task.id,
        status=task.status,
        title=task.title,
        last_step_message=task.last_step.user_message if task.last_step else None,
        updated_at=rfc3339_ms(task.updated_ms),
    )


class ClaimableItem(msgspec.Struct, kw_only=True):
    """One queued task a harness may claim."""

    task_id: str
    title: str
    status: Status
    created_at: str
    updated_at: str


class ClaimablePage(msgspec.Struct, kw_only=True):
    """``GET /api/harness/tasks/claimable``: queued tasks, oldest first."""

    tasks: list[ClaimableItem]


def claimable_item(task: Task) -> ClaimableItem:
    """A task as a claimable entry."""
    return ClaimableItem(
        task_id=task.id,
        title=task.title,
        status=task.status,
        created_at=rfc3339_ms(task.created_ms),
        updated_at=rfc3339_ms(task.updated_ms),
    )


class HeartbeatView(msgspec.Struct, kw_only=True, frozen=True, omit_defaults=True):
    """The heartbeat answer: the lease, the task's status and, after an answer, the answer."""

    status: Status
    lease_expires_at: str | None
    answer: AnswerEntry | None = None


def heartbeat_view(task: Task) -> HeartbeatView:
    """The heartbeat response body for a task after an accepted heartbeat.

    ``answer`` ({question, answer, option, at}) is present only while an answer given to the
    live run is pending.
    """
    return HeartbeatView(
        status=task.status, lease_expires_at=_at(task.lease_expires_ms), answer=task.pending_answer
    )


class RunView(msgspec.Struct, kw_only=True):
    """The answer to a step or an interrupt: where the run stands."""

    task_id: str
    status: Status
    run_id: str | None
    lease_expires_at: str | None


def run_view(task: Task) -> RunView:
    """The run's standing after a step or an interrupt."""
    return RunView(
        task_id=task.id,
        status=task.status,
        run_id=task.run_id,
        lease_expires_at=_at(task.lease_expires_ms),
    )


class ResultView(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The answer to a result: the new status and, when the task ended, its delivery."""

    task_id: str
    status: Status
    delivery: Delivery | None = None


def result_view(task: Task) -> ResultView:
    """The answer to a result (no delivery while parked by a ``blocked`` result)."""
    shown = task.delivery if task.status is not Status.INTERRUPTED else None
    return ResultView(task_id=task.id, status=task.status, delivery=shown)


class Callbacks(msgspec.Struct, kw_only=True, frozen=True):
    """Absolute URLs a harness reports to, and the topic its run is narrated on."""

    report_step_url: str
    heartbeat_url: str
    interrupt_url: str
    result_url: str
    websocket_topic: str


class Bundle(msgspec.Struct, kw_only=True, frozen=True):
    """The execution bundle (schema version 2): everything one attempt needs."""

    schema_version: int = BUNDLE_SCHEMA_VERSION
    task_id: str
    # ``None`` in a preview of a task nobody holds.
    run_id: str | None
    prompt: str
    definition_of_done: str | None
    scope: dict[str, Any]
    context_refs: list[Any]
    answers: list[AnswerEntry]
    callbacks: Callbacks


def bundle(task: Task, base_url: str) -> Bundle:
    """The execution bundle of a task (contract section 7).

    Args:
        task: the task; its current ``run_id`` is included (``None`` for a preview).
        base_url: the public base URL, e.g. ``https://ether.example``; callback URLs are
            absolute under it.
    """
    base = f"{base_url.rstrip('/')}/api/harness/tasks/{task.id}"
    return Bundle(
        task_id=task.id,
        run_id=task.run_id,
        prompt=task.prompt,
        definition_of_done=task.definition_of_done,
        scope=task.scope,
        context_refs=task.context_refs,
        answers=task.answers,
        callbacks=Callbacks(
            report_step_url=f"{base}/steps",
            heartbeat_url=f"{base}/heartbeat",
            interrupt_url=f"{base}/interrupt",
            result_url=f"{base}/result",
            websocket_topic=task_topic(task.id),
        ),
    )


class ClaimView(msgspec.Struct, kw_only=True, frozen=True):
    """The claim answer: the run, its lease and the bundle."""

    run_id: str | None
    lease_expires_at: str | None
    bundle: Bundle


def claim_view(task: Task, base_url: str) -> ClaimView:
    """The claim response body: ``run_id``, ``lease_expires_at`` and the ``bundle``."""
    return ClaimView(
        run_id=task.run_id,
        lease_expires_at=_at(task.lease_expires_ms),
        bundle=bundle(task, base_url),
    )
