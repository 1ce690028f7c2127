"""The task board in Chromium: the list, live rows, the create form, both widths."""

from __future__ import annotations

from selenium.webdriver import ActionChains, Chrome
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


def row(task_id: str) -> str:
    return f'.task-row[data-task-id="{task_id}"]'


def test_board_lists_tasks_and_changes_a_row_in_place(page: Chrome, etherd: Etherd) -> None:
    parked = create_task(etherd, "Upgrade the payment SDK to v5", "Upgrade the payment SDK")
    busy = create_task(
        etherd, "Fix the checkout bug: coupons round the wrong way", "Fix the checkout bug"
    )
    idle = create_task(etherd, "Update the README with the new install steps")
    open_app(page, etherd)
    wait_for(page, lambda d: d.find_elements(By.CSS_SELECTOR, row(idle["id"])), "the rows")
    titles = texts(page, ".task-row .task-link")
    # Newest change first.
    assert titles[:3] == [
        "Update the README with the new install steps",
        "Fix the checkout bug",
        "Upgrade the payment SDK",
    ]
    element = find(page, row(busy["id"]))
    assert element.get_attribute("data-status") == "queued"
    assert "Queued" in element.text and "No progress reported yet." in element.text

    # A harness starts work: the same row element changes, live.
    harness = Harness(etherd, busy["id"]).claim()
    wait_for(page, lambda d: element.get_attribute("data-status") == "running", "status running")
    assert "Running" in element.text
    harness.step("Reading cart/total.py…", "read_files")
    wait_for(page, lambda d: "Reading cart/total.py…" in element.text, "the narration line")
    other = Harness(etherd, parked["id"]).claim()
    other.step("Checking which calls changed in v5")
    other.interrupt("Migrate refunds too, or keep them on v4?", ["Migrate", "Keep v4"])
    parked_row = find(page, row(parked["id"]))
    wait_for(page, lambda d: parked_row.get_attribute("data-status") == "interrupted", "parked")
    assert "Needs your answer" in parked_row.text
    harness.result(
        "submitted",
        agent_status="Opened PR #42",
        artifact={
            "pr": {
                "number": 42,
                "branch": "ether/fix",
                "url": "https://github.com/acme/shop/pull/42",
            }
        },
    )
    wait_for(page, lambda d: element.get_attribute("data-status") == "completed", "completed")
    assert element.find_element(By.CSS_SELECTOR, ".badge").text == "Completed"
    assert find(page, row(busy["id"])) == element, "the row was changed in place"

    # The row opens the task.
    element.find_element(By.CSS_SELECTOR, ".task-link").click()
    wait_for(page, lambda d: d.find_elements(By.ID, "delivery"), "the task page")
    assert page.current_url.endswith(f"#/tasks/{busy['id']}")
    page.back()
    wait_for(page, lambda d: d.find_elements(By.CSS_SELECTOR, row(busy["id"])), "the board")
    # A task created elsewhere while the board is open comes in on top, live.
    late = create_task(etherd, "Add retries to the webhook sender")
    fresh = wait_for(page, lambda d: d.find_element(By.CSS_SELECTOR, row(late["id"])), "new row")
    assert texts(page, ".task-row .task-link")[0] == "Add retries to the webhook sender"
    Harness(etherd, late["id"]).claim().step("Writing the retry loop with backoff…")
    wait_for(page, lambda d: "Writing the retry loop" in fresh.text, "its narration line")
    ActionChains(page).move_to_element(find(page, "h1")).perform()
    shot(page, "board-1280", height=660)
    set_viewport(page, NARROW)
    assert overflows(page) == []
    shot(page, "board-400", full_page=True)
    assert console_errors(page) == []


def test_the_form_creates_a_task_a_harness_can_claim(page: Chrome, etherd: Etherd) -> None:
    open_app(page, etherd)
    find(page, "#new-prompt").send_keys(
        "Rename the config loader\nand keep the old name as an alias"
    )
    find(page, "#new-task summary").click()
    find(page, "#new-repo").send_keys("acme/shop")
    find(page, "#new-task button[type=submit]").click()
    notice = wait_for(
        page, lambda d: d.find_element(By.ID, "create-notice").text or None, "the created notice"
    )
    assert notice.startswith("Created Rename the config loader")
    link = find(page, "#create-notice a").get_attribute("href") or ""
    task_id = link.rsplit("/", 1)[1]
    element = find(page, row(task_id))
    assert element.get_attribute("data-status") == "queued"
    assert find(page, "#new-prompt").get_attribute("value") == "", "the form was cleared"
    status, task = etherd.request("GET", f"/api/tasks/{task_id}", token="test")
    assert status == 200 and task["scope"] == {"repo": "acme/shop"}
    assert task["prompt"] == "Rename the config loader\nand keep the old name as an alias"
    status, claimable = etherd.request(
        "GET", "/api/harness/tasks/claimable", token="test", headers={"X-Ether-Harness-App": "t"}
    )
    assert task_id in [t["task_id"] for t in claimable["tasks"]]
    # An empty prompt is refused in the page with a message, not sent.
    find(page, "#new-task button[type=submit]").click()
    assert "Describe the task first." in find(page, "#new-task .error").text
    assert console_errors(page) == []
