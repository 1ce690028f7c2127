"""Delivery composition: the ordered, typed blocks a person sees when a run ends.

When a harness posts a final result, etherd turns it into a *delivery*: a short list of
blocks, each a JSON object whose ``type`` says how to render it. The same list travels in
``task.delivered`` (or ``task.failed``) and is kept on the task, so a page load shows exactly
what the live event showed. ``docs/delivery-blocks.md`` is the user-facing catalogue.

Blocks, always in this order:

1. ``outcome`` -- what happened, in etherd's words: ``completed``, ``no_changes`` or
   ``failed``, the task title and a one-line summary.
2. ``hero`` -- the main thing the run produced: a pull request when the result's artifact
   carries one (``artifact.pr`` with ``number``, ``branch`` and ``url``), otherwise the
   agent's own status line as text.
3. ``summary`` -- the agent's ``working_summary``, only when it gave one.
4. ``actions`` -- what the person can do next (open the pull request, reply, run again).

Everything that varies by outcome is data (``_OUTCOMES`` and ``_ACTIONS`` below), so a new
outcome or action is a table row, not a branch. Pure: no I/O, no clock; the caller stamps
the time.
"""

from __future__ import annotations

from typing import Any, Final, Literal, Protocol

import msgspec

__all__ = [
    "ActionId",
    "ActionItem",
    "ActionsBlock",
    "Block",
    "Delivery",
    "HeroBlock",
    "OutcomeBlock",
    "OutcomeStatus",
    "PullRequest",
    "ResultFacts",
    "SummaryBlock",
    "compose",
    "outcome_status",
    "pull_request",
]

OutcomeStatus = Literal["completed", "no_changes", "failed"]
ActionId = Literal["open_pr", "reply", "run_again"]


class OutcomeBlock(msgspec.Struct, tag="outcome", tag_field="type", kw_only=True, frozen=True):
    """How the run ended, for a status badge and a headline."""

    status: OutcomeStatus
    title: str
    summary: str


class HeroBlock(
    msgspec.Struct, tag="hero", tag_field="type", kw_only=True, frozen=True, omit_defaults=True
):
    """The main artifact: ``kind`` ``pull_request`` (number, branch, url) or ``text`` (text).

    One struct with optional fields rather than two, because both share ``type: "hero"``;
    fields that do not belong to the kind are left out of the JSON.
    """

    kind: Literal["pull_request", "text"]
    number: int | None = None
    branch: str | None = None
    url: str | None = None
    text: str | None = None


class SummaryBlock(msgspec.Struct, tag="summary", tag_field="type", kw_only=True, frozen=True):
    """The agent's working notes (``working_summary``), shown under the hero."""

    text: str


class ActionItem(msgspec.Struct, kw_only=True, frozen=True, omit_defaults=True):
    """One button. ``id`` is stable for programs; ``label`` is for people; ``url`` for links."""

    id: ActionId
    label: str
    url: str | None = None


class ActionsBlock(msgspec.Struct, tag="actions", tag_field="type", kw_only=True, frozen=True):
    """What the person can do next, most relevant first."""

    items: list[ActionItem]


Block = OutcomeBlock | HeroBlock | SummaryBlock | ActionsBlock


class Delivery(msgspec.Struct, kw_only=True, frozen=True):
    """A composed delivery as the task keeps it for replay on page load."""

    blocks: list[Block]
    status: OutcomeStatus
    # RFC 3339 UTC with milliseconds: when the result was accepted.
    at: str


class PullRequest(msgspec.Struct, frozen=True):
    """``artifact.pr`` as the harness API documents it."""

    number: int
    branch: str
    url: str


# Per outcome: the summary used when the agent says nothing, and the actions in order.
_OUTCOMES: Final[dict[OutcomeStatus, str]] = {
    "completed": "The task is complete.",
    "no_changes": "The task is complete; no changes were needed.",
    "failed": "The task failed.",
}
# ``open_pr`` is dropped when there is no pull request. After a failure, running again is
# the likely next step, so it comes first and says so.
_OPEN_PR: Final[tuple[ActionId, str]] = ("open_pr", "Open pull request")
_ACTIONS: Final[dict[OutcomeStatus, tuple[tuple[ActionId, str], ...]]] = {
    "completed": (_OPEN_PR, ("reply", "Reply"), ("run_again", "Run again")),
    "no_changes": (_OPEN_PR, ("reply", "Reply"), ("run_again", "Run again")),
    "failed": (_OPEN_PR, ("run_again", "Try again"), ("reply", "Reply")),
}
_RESULT_OUTCOME: Final[dict[str, OutcomeStatus]] = {
    "submitted": "completed",
    "no_changes": "no_changes",
    "failed": "failed",
}


def outcome_status(result_status: str) -> OutcomeStatus:
    """The outcome of a final result status (``submitted``, ``no_changes`` or ``failed``).

    Raises:
        ValueError: for ``blocked`` or anything else that does not end a task with a delivery.
    """
    try:
        return _RESULT_OUTCOME[result_status]
    except KeyError:
        raise ValueError(f"result status {result_status!r} has no delivery") from None


def pull_request(artifact: dict[str, Any] | None) -> PullRequest | None:
    """The pull request in ``artifact.pr``, or ``None`` when absent or not well formed."""
    if not artifact or "pr" not in artifact:
        return None
    try:
        return msgspec.convert(artifact["pr"], PullRequest)
    except msgspec.ValidationError:
        return None


class ResultFacts(Protocol):
    """What composition reads of a harness result (``core.tasks.Result`` has it all)."""

    @property
    def status(self) -> str: ...
    @property
    def agent_status(self) -> str: ...
    @property
    def artifact(self) -> dict[str, Any] | None: ...
    @property
    def working_summary(self) -> str | None: ...
    @property
    def error(self) -> str | None: ...


def _agent_status(result: ResultFacts) -> str:
    """The agent's status line: the result's, else the one the docs also show in the artifact."""
    if result.agent_status.strip():
        return result.agent_status.strip()
    nested = (result.artifact or {}).get("agent_status")
    return nested.strip() if isinstance(nested, str) else ""


def compose(title: str, result: ResultFacts) -> list[Block]:
    """Compose the delivery blocks for a final result.

    Args:
        title: the task's title, which heads the outcome.
        result: a result with status ``submitted``, ``no_changes`` or ``failed``.

    Returns:
        ``outcome``, ``hero``, ``summary`` (only when ``working_summary`` is not blank) and
        ``actions``, in that order.

    Raises:
        ValueError: for a ``blocked`` result, which pauses the task instead of delivering.
    """
    status = outcome_status(result.status)
    agent_status = _agent_status(result)
    summary = _OUTCOMES[status]
    if status == "failed" and result.error and result.error.strip():
        summary = f"The task failed: {result.error.strip()}"
    blocks: list[Block] = [OutcomeBlock(status=status, title=title, summary=summary)]

    pr = pull_request(result.artifact)
    if pr is not None:
        blocks.append(
            HeroBlock(kind="pull_request", number=pr.number, branch=pr.branch, url=pr.url)
        )
    else:
        blocks.append(HeroBlock(kind="text", text=agent_status or summary))

    if result.working_summary and result.working_summary.strip():
        blocks.append(SummaryBlock(text=result.working_summary.strip()))

    items = [
        ActionItem(id=action_id, label=label, url=pr.url if action_id == "open_pr" and pr else None)
        for action_id, label in _ACTIONS[status]
        if action_id != "open_pr" or pr is not None
    ]
    blocks.append(ActionsBlock(items=items))
    return blocks
