"""Delivery composition: which blocks, in which order, with which fields, as JSON."""

from __future__ import annotations

from typing import Any, Literal

import msgspec
import pytest

from etherd.core.delivery import (
    ActionsBlock,
    Block,
    Delivery,
    HeroBlock,
    OutcomeBlock,
    SummaryBlock,
    compose,
    outcome_status,
    pull_request,
)
from etherd.core.tasks import Result, Status, Task

PR = {"number": 42, "branch": "ether/fix", "url": "https://github.com/org/repo/pull/42"}
TASK = Task(
    id="task_1",
    owner="user_1",
    title="Fix the checkout bug",
    prompt="Fix the checkout bug",
    status=Status.RUNNING,
    created_ms=0,
    updated_ms=0,
)
ResultStatus = Literal["submitted", "no_changes", "blocked", "failed"]


def result(status: ResultStatus = "submitted", **fields: Any) -> Result:
    return Result(run_id="run_1", status=status, now_ms=1, **fields)


def as_json(blocks: list[Block]) -> list[dict[str, Any]]:
    decoded = msgspec.json.decode(msgspec.json.encode(blocks))
    assert isinstance(decoded, list)
    return decoded


def test_submitted_with_a_pull_request() -> None:
    blocks = compose(
        TASK.title,
        result(agent_status="Opened PR #42", artifact={"pr": PR}, working_summary=" Notes. "),
    )
    assert as_json(blocks) == [
        {
            "type": "outcome",
            "status": "completed",
            "title": "Fix the checkout bug",
            "summary": "The task is complete.",
        },
        {
            "type": "hero",
            "kind": "pull_request",
            "number": 42,
            "branch": "ether/fix",
            "url": "https://github.com/org/repo/pull/42",
        },
        {"type": "summary", "text": "Notes."},
        {
            "type": "actions",
            "items": [
                {"id": "open_pr", "label": "Open pull request", "url": PR["url"]},
                {"id": "reply", "label": "Reply"},
                {"id": "run_again", "label": "Run again"},
            ],
        },
    ]


def test_submitted_without_an_artifact() -> None:
    blocks = compose(TASK.title, result(agent_status="Updated the docs"))
    assert [type(b) for b in blocks] == [OutcomeBlock, HeroBlock, ActionsBlock]
    hero = as_json(blocks)[1]
    assert hero == {"type": "hero", "kind": "text", "text": "Updated the docs"}
    actions = blocks[-1]
    assert isinstance(actions, ActionsBlock)
    assert [item.id for item in actions.items] == ["reply", "run_again"]


def test_agent_status_inside_the_artifact_is_used_when_the_result_has_none() -> None:
    blocks = compose(TASK.title, result(artifact={"agent_status": "Opened nothing"}))
    assert as_json(blocks)[1] == {"type": "hero", "kind": "text", "text": "Opened nothing"}


def test_no_status_at_all_falls_back_to_the_outcome_summary() -> None:
    blocks = compose(TASK.title, result(artifact={}))
    assert as_json(blocks)[1]["text"] == "The task is complete."


def test_no_changes() -> None:
    blocks = as_json(compose(TASK.title, result("no_changes", agent_status="Already fixed")))
    assert blocks[0] == {
        "type": "outcome",
        "status": "no_changes",
        "title": "Fix the checkout bug",
        "summary": "The task is complete; no changes were needed.",
    }
    assert blocks[1] == {"type": "hero", "kind": "text", "text": "Already fixed"}
    assert [b["type"] for b in blocks] == ["outcome", "hero", "actions"]


def test_failed() -> None:
    blocks = as_json(
        compose(TASK.title, result("failed", agent_status="Tests fail", error="3 failures"))
    )
    assert blocks == [
        {
            "type": "outcome",
            "status": "failed",
            "title": "Fix the checkout bug",
            "summary": "The task failed: 3 failures",
        },
        {"type": "hero", "kind": "text", "text": "Tests fail"},
        {
            "type": "actions",
            "items": [
                {"id": "run_again", "label": "Try again"},
                {"id": "reply", "label": "Reply"},
            ],
        },
    ]


def test_failed_without_an_error() -> None:
    blocks = as_json(compose(TASK.title, result("failed")))
    assert blocks[0]["summary"] == "The task failed."


def test_failed_with_a_draft_pull_request_still_links_it() -> None:
    blocks = compose(TASK.title, result("failed", artifact={"pr": PR}))
    actions = blocks[-1]
    assert isinstance(actions, ActionsBlock)
    assert [item.id for item in actions.items] == ["open_pr", "run_again", "reply"]


@pytest.mark.parametrize("summary", [None, "", "  \n"])
def test_summary_block_only_when_given(summary: str | None) -> None:
    blocks = compose(TASK.title, result(working_summary=summary))
    assert not any(isinstance(b, SummaryBlock) for b in blocks)


@pytest.mark.parametrize(
    "artifact",
    [
        None,
        {},
        {"pr": None},
        {"pr": {"number": 42, "branch": "b"}},
        {"pr": {"number": "42", "branch": "b", "url": "u"}},
        {"pr": {"number": True, "branch": "b", "url": "u"}},
        {"pr": "https://github.com/org/repo/pull/42"},
    ],
)
def test_malformed_pull_requests_give_a_text_hero(artifact: dict[str, Any] | None) -> None:
    assert pull_request(artifact) is None
    hero = compose(TASK.title, result(agent_status="s", artifact=artifact))[1]
    assert isinstance(hero, HeroBlock)
    assert hero.kind == "text"


@pytest.mark.parametrize("status", ["submitted", "no_changes", "failed"])
@pytest.mark.parametrize("artifact", [None, {"pr": PR}])
@pytest.mark.parametrize("summary", [None, "notes"])
def test_order_is_fixed(status: ResultStatus, artifact: Any, summary: str | None) -> None:
    types = [
        b["type"]
        for b in as_json(
            compose(TASK.title, result(status, artifact=artifact, working_summary=summary))
        )
    ]
    expected = ["outcome", "hero", *(["summary"] if summary else []), "actions"]
    assert types == expected


def test_blocked_has_no_delivery() -> None:
    with pytest.raises(ValueError, match="blocked"):
        compose(TASK.title, result("blocked"))
    with pytest.raises(ValueError, match="blocked"):
        outcome_status("blocked")


def test_delivery_round_trips_through_json() -> None:
    blocks = compose(TASK.title, result(artifact={"pr": PR}, working_summary="notes"))
    delivery = Delivery(blocks=blocks, status="completed", at="2026-11-29T07:16:08.123Z")
    encoded = msgspec.json.encode(delivery)
    assert msgspec.json.decode(encoded, type=Delivery) == delivery
    # The tag comes first in every block, so a streaming client can switch on it early.
    for block in msgspec.json.decode(encoded)["blocks"]:
        assert next(iter(block)) == "type"
