"""The task page in Chromium, with a harness driving the task over HTTP: narration, the
parked card and its answer, the delivery card, reload, cancel, and a replay the server
cannot give."""

from __future__ import annotations

from pathlib import Path

import pytest
from selenium.webdriver import Chrome
from selenium.webdriver.common.by import By

from tests.browser.conftest import (
    NARROW,
    console_errors,
    find,
    open_app,
    overflows,
    set_viewport,
    shot,
    texts,
    wait_for,
)
from tests.browser.harness import Harness, create_task
from tests.conftest import Etherd

PR = {"number": 42, "branch": "ether/fix-rounding", "url": "https://github.com/acme/shop/pull/42"}


def narration(page: Chrome) -> list[str]:
    return texts(page, "#narration .step-message")


def wait_narration(page: Chrome, expected: list[str]) -> None:
    wait_for(page, lambda d: narration(d) == expected, f"the narration {expected}")


def offsets(page: Chrome) -> list[int]:
    return [
        int(li.get_attribute("data-offset") or -1)
        for li in page.find_elements(By.CSS_SELECTOR, "#narration li")
    ]


def wait_synced(page: Chrome) -> None:
    """Wait until the page has applied the replay of the task's retained events."""
    wait_for(
        page,
        lambda d: d.find_element(By.ID, "narration").get_attribute("data-synced") == "true",
        "the replay",
    )


def status(page: Chrome) -> str:
    return find(page, ".task-title-row .badge").get_attribute("data-status") or ""


def wait_status(page: Chrome, expected: str) -> None:
    wait_for(page, lambda d: status(d) == expected, f"status {expected}")


def test_narration_arrives_as_steps_do_and_labels_only_in_debug(
    page: Chrome, etherd: Etherd
) -> None:
    task = create_task(etherd, "Fix the checkout bug", scope={"repo": "acme/shop"})
    open_app(page, etherd, f"#/tasks/{task['id']}")
    wait_for(page, lambda d: d.find_element(By.ID, "narration-empty").is_displayed(), "empty")
    assert find(page, "#narration-empty").text == "Waiting for a harness to pick this task up."
    assert find(page, "#narration").get_attribute("aria-live") == "polite"
    harness = Harness(etherd, task["id"]).claim()
    wait_status(page, "running")
    said: list[str] = []
    for message, internal in [
        ("Reading acme/shop…", "read_files"),
        ("Found the rounding in cart/total.py", "grep"),
        # Markup from a harness is text, never HTML.
        ("<img src=x onerror=\"document.title='pwned'\"> changing it", "edit"),
    ]:
        harness.step(message, internal)
        said.append(message)
        wait_narration(page, said)
    assert not page.find_elements(By.CSS_SELECTOR, "#narration img")
    label = find(page, "#narration li:first-child .internal-label")
    assert not label.is_displayed(), "internal_label is hidden outside debug mode"
    find(page, "#debug-toggle").click()
    assert label.is_displayed() and label.text == "coding_agent · read_files"
    timeline = texts(page, "#timeline .timeline-summary")
    assert timeline[:2] == ["Task created", "Claimed by browser-tests (attempt 1)"]
    assert timeline[2:] == said
    find(page, "#debug-toggle").click()
    assert "pwned" not in page.title
    assert console_errors(page) == []


def test_answering_a_parked_task_in_the_page_resumes_it(page: Chrome, etherd: Etherd) -> None:
    task = create_task(etherd, "Upgrade the payment SDK to v5", "Upgrade the payment SDK")
    harness = Harness(etherd, task["id"]).claim()
    harness.step("Checking which calls changed in v5")
    harness.interrupt(
        "v5 drops the legacy refund API. Migrate refunds too, or keep them on v4?",
        ["Migrate refunds", "Keep v4 for refunds"],
    )
    open_app(page, etherd, f"#/tasks/{task['id']}")
    wait_synced(page)
    assert status(page) == "interrupted"
    assert find(page, "#question").text.startswith("v5 drops the legacy refund API.")
    assert texts(page, "#parked .option") == ["Migrate refunds", "Keep v4 for refunds"]
    assert find(page, "#cancel-task").is_displayed()
    shot(page, "task-parked-1280")
    find(page, '#parked .option[data-option="Migrate refunds"]').click()
    # The harness, heartbeating while parked, hears the answer; the page moves on only when
    # task.resumed arrives.
    beat = harness.wait_for_answer()
    assert beat["status"] == "running"
    assert beat["answer"]["answer"] == "Migrate refunds"
    assert beat["answer"]["option"] == "Migrate refunds"
    wait_for(page, lambda d: not d.find_elements(By.ID, "parked"), "the card to go")
    wait_status(page, "running")
    assert not find(page, "#cancel-task").is_displayed(), "a running task cannot be cancelled"
    harness.step("Going ahead: migrating refunds too")
    wait_narration(
        page, ["Checking which calls changed in v5", "Going ahead: migrating refunds too"]
    )

    # A second question, answered in words.
    harness.interrupt("Which branch should the pull request target?", [])
    wait_for(
        page, lambda d: d.find_element(By.ID, "question").text.startswith("Which branch"), "q2"
    )
    assert texts(page, "#parked .option") == []
    find(page, "#answer-text").send_keys("release/2.4, please")
    find(page, "#parked button[type=submit]").click()
    assert harness.wait_for_answer()["answer"]["answer"] == "release/2.4, please"
    wait_for(page, lambda d: not d.find_elements(By.ID, "parked"), "the second card to go")
    timeline = texts(page, "#timeline .timeline-summary")
    assert "Answered: Migrate refunds" in timeline and "Answered: release/2.4, please" in timeline
    assert console_errors(page) == []


def test_the_delivery_card_shows_every_block(page: Chrome, etherd: Etherd) -> None:
    task = create_task(
        etherd,
        "Fix the checkout bug: coupons round the total the wrong way",
        "Fix the checkout bug",
        scope={"repo": "acme/shop"},
    )
    harness = Harness(etherd, task["id"]).claim()
    open_app(page, etherd, f"#/tasks/{task['id']}")
    wait_status(page, "running")
    for message in [
        "Reading acme/shop…",
        "Found the rounding in cart/total.py",
        "Running the tests…",
    ]:
        harness.step(message, "work")
    harness.step("Opening the pull request…", "open_pr")
    harness.result(
        "submitted",
        agent_status="Opened PR #42",
        artifact={"pr": PR},
        working_summary="Coupon totals now round half-up, as the tests expect.\nTwo tests added.",
    )
    card = wait_for(page, lambda d: d.find_element(By.ID, "delivery"), "the delivery card")
    wait_status(page, "completed")
    blocks = [b.get_attribute("data-block") for b in card.find_elements(By.CSS_SELECTOR, ".block")]
    assert blocks == ["outcome", "hero", "summary", "actions"]
    outcome = find(page, '[data-block="outcome"]')
    assert outcome.get_attribute("data-status") == "completed"
    assert outcome.find_element(By.CSS_SELECTOR, ".outcome-status").text == "Completed"
    assert outcome.find_element(By.TAG_NAME, "h2").text == "The task is complete."
    pr = find(page, '[data-block="hero"]')
    assert pr.get_attribute("data-kind") == "pull_request"
    link = pr.find_element(By.TAG_NAME, "a")
    assert link.text == "Pull request #42" and link.get_attribute("href") == PR["url"]
    assert pr.find_element(By.TAG_NAME, "code").text == "ether/fix-rounding"
    summary = find(page, '[data-block="summary"] .summary-text').text
    assert summary == "Coupon totals now round half-up, as the tests expect.\nTwo tests added."
    actions = card.find_elements(By.CSS_SELECTOR, '[data-block="actions"] > *')
    assert [(a.tag_name, a.get_attribute("data-action"), a.text) for a in actions] == [
        ("a", "open_pr", "Open pull request"),
        ("button", "reply", "Reply"),
        ("button", "run_again", "Run again"),
    ]
    assert actions[0].get_attribute("href") == PR["url"]
    assert actions[0].get_attribute("target") == "_blank"
    assert "noopener" in (actions[0].get_attribute("rel") or "")
    assert not find(page, "#cancel-task").is_displayed()
    page.execute_script("window.scrollTo(0, 0)")
    shot(page, "task-delivered-1280")
    set_viewport(page, NARROW)
    assert overflows(page) == []
    shot(page, "task-delivered-400", full_page=True)
    set_viewport(page, (1280, 900))

    # Reply opens a follow-up form; run again makes a new task with the same request.
    find(page, '[data-action="reply"]').click()
    assert find(page, "#reply-form").is_displayed()
    find(page, '[data-action="run_again"]').click()
    wait_for(page, lambda d: task["id"] not in d.current_url, "the new task's page")
    new_id = page.current_url.rsplit("/", 1)[1]
    wait_for(
        page, lambda d: d.find_element(By.ID, "task-title").text == "Fix the checkout bug", "it"
    )
    status_code, again = etherd.request("GET", f"/api/tasks/{new_id}", token="test")
    assert status_code == 200 and again["prompt"] == task["prompt"]
    assert again["scope"] == {"repo": "acme/shop"} and again["status"] == "queued"
    assert console_errors(page) == []


@pytest.mark.parametrize(
    ("result", "outcome", "hero", "first_action"),
    [
        (
            {
                "status": "failed",
                "agent_status": "Could not make the tests pass",
                "error": "3 tests fail",
            },
            ("failed", "Failed", "The task failed: 3 tests fail"),
            "Could not make the tests pass",
            ("run_again", "Try again"),
        ),
        (
            {"status": "no_changes", "agent_status": "Nothing to change"},
            (
                "no_changes",
                "Completed, no changes needed",
                "The task is complete; no changes were needed.",
            ),
            "Nothing to change",
            ("reply", "Reply"),
        ),
    ],
)
def test_failed_and_unchanged_deliveries(
    page: Chrome,
    etherd: Etherd,
    result: dict[str, str],
    outcome: tuple[str, str, str],
    hero: str,
    first_action: tuple[str, str],
) -> None:
    task = create_task(etherd, f"Try something that ends {result['status']}")
    harness = Harness(etherd, task["id"]).claim()
    harness.step("Trying…")
    harness.result(**result)
    open_app(page, etherd, f"#/tasks/{task['id']}")
    wait_synced(page)
    card = find(page, "#delivery")
    assert card.get_attribute("data-outcome") == outcome[0]
    assert find(page, ".outcome-status").text == outcome[1]
    assert find(page, "#delivery-title").text == outcome[2]
    assert find(page, '[data-block="hero"]').get_attribute("data-kind") == "text"
    assert find(page, ".hero-text").text == hero
    assert not page.find_elements(By.CSS_SELECTOR, '[data-block="summary"]')
    first = find(page, '[data-block="actions"] > *')
    assert (first.get_attribute("data-action"), first.text) == first_action
    assert "primary" in (first.get_attribute("class") or "")
    assert console_errors(page) == []


def test_a_link_that_is_not_http_is_not_a_link(page: Chrome, etherd: Etherd) -> None:
    task = create_task(etherd, "Deliver a hostile link")
    harness = Harness(etherd, task["id"]).claim()
    hostile = {"number": 7, "branch": "x", "url": "javascript:document.title='pwned'"}
    harness.result("submitted", artifact={"pr": hostile})
    open_app(page, etherd, f"#/tasks/{task['id']}")
    wait_synced(page)
    assert find(page, ".pr-title").text == "Pull request #7"
    assert not page.find_elements(By.CSS_SELECTOR, "#delivery a")
    assert texts(page, '[data-block="actions"] > *') == ["Reply", "Run again"]


def test_reload_mid_task_shows_the_same_narration_once(page: Chrome, etherd: Etherd) -> None:
    task = create_task(etherd, "Rename the config loader")
    harness = Harness(etherd, task["id"]).claim()
    said = [f"Step {n} of the rename" for n in range(1, 4)]
    for message in said:
        harness.step(message)
    open_app(page, etherd, f"#/tasks/{task['id']}")
    wait_narration(page, said)
    first = offsets(page)
    for _ in range(2):
        page.refresh()
        wait_narration(page, said)
        assert offsets(page) == first
    harness.step("Step 4 of the rename")
    wait_narration(page, [*said, "Step 4 of the rename"])
    assert len(set(offsets(page))) == 4
    harness.interrupt("Keep the old name as an alias?", ["Yes", "No"])
    wait_for(page, lambda d: d.find_elements(By.ID, "parked"), "the parked card")
    page.refresh()
    wait_for(page, lambda d: d.find_elements(By.ID, "parked"), "the parked card after reload")
    assert find(page, "#question").text == "Keep the old name as an alias?"
    assert len(narration(page)) == 4
    assert console_errors(page) == []


def test_cancel_is_offered_where_the_status_allows_it(page: Chrome, etherd: Etherd) -> None:
    task = create_task(etherd, "Something nobody picks up")
    open_app(page, etherd, f"#/tasks/{task['id']}")
    wait_status(page, "queued")
    find(page, "#cancel-task").click()
    wait_status(page, "cancelled")
    assert not find(page, "#cancel-task").is_displayed()
    assert texts(page, "#timeline .timeline-summary")[-1] == "Task cancelled"
    code, body = etherd.request("GET", f"/api/tasks/{task['id']}", token="test")
    assert code == 200 and body["status"] == "cancelled"


def test_an_unknown_task_says_so(page: Chrome, etherd: Etherd) -> None:
    open_app(page, etherd, "#/tasks/task_nope")
    heading = wait_for(page, lambda d: d.find_element(By.TAG_NAME, "h1"), "a heading")
    wait_for(page, lambda d: heading.text == "No such task", "the not-found heading")
    assert "no task task_nope" in find(page, "main .error").text
    # The 404 of the task read is expected; nothing else.
    assert console_errors(page, allow=("404",)) == []


def test_a_replay_the_server_cannot_give_reloads_over_http(page: Chrome, tmp_path: Path) -> None:
    server = Etherd(tmp_path, {"realtime": {"replay_max_events": 5}}).start()
    try:
        task = create_task(server, "A long task")
        harness = Harness(server, task["id"]).claim()
        said = [f"Part {n}" for n in range(1, 7)]
        for message in said:
            harness.step(message, "label")
        # More events than the server replays: the subscribe answers recovered: false.
        open_app(page, server, f"#/tasks/{task['id']}")
        wait_narration(page, said)
        assert find(page, "#main .notice").text.startswith("The server no longer keeps")
        harness.step("Part 7")
        wait_narration(page, [*said, "Part 7"])
        assert len(set(offsets(page))) == 7
        assert console_errors(page) == []
    finally:
        server.kill()
