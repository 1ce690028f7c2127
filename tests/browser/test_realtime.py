"""The page's realtime connection in Chromium against a server that goes away: WebSocket
resume with ``since`` after a kill and restart, and Server-Sent Events when the
configuration turns WebSockets off (resuming with the browser's own ``Last-Event-ID``)."""

from __future__ import annotations

from pathlib import Path

from selenium.webdriver import Chrome
from selenium.webdriver.common.by import By

from tests.browser.conftest import (
    conn_state,
    console_errors,
    find,
    open_app,
    texts,
    wait_for,
    wait_live,
)
from tests.browser.harness import Harness, create_task
from tests.conftest import Etherd

# What Chromium logs while the server is down.
OFFLINE_NOISE = (
    "WebSocket connection to",
    "ERR_CONNECTION_REFUSED",
    "ERR_EMPTY_RESPONSE",
    "ERR_INCOMPLETE_CHUNKED_ENCODING",
)


def narration(page: Chrome) -> list[str]:
    return texts(page, "#narration .step-message")


def offsets(page: Chrome) -> list[int]:
    return [
        int(li.get_attribute("data-offset") or -1)
        for li in page.find_elements(By.CSS_SELECTOR, "#narration li")
    ]


def wait_narration(page: Chrome, expected: list[str]) -> None:
    wait_for(page, lambda d: narration(d) == expected, f"the narration {expected}")


def wait_state(page: Chrome, state: str) -> None:
    wait_for(page, lambda d: conn_state(d) == state, f"the connection to be {state}")


def test_a_killed_and_restarted_server_ends_with_every_step_once(
    page: Chrome, tmp_path: Path
) -> None:
    server = Etherd(tmp_path).start()
    try:
        task = create_task(server, "Migrate the billing tables")
        harness = Harness(server, task["id"]).claim()
        said = ["Reading the schema", "Writing the migration"]
        for message in said:
            harness.step(message)
        open_app(page, server, f"#/tasks/{task['id']}")
        wait_narration(page, said)
        assert find(page, "#conn").get_attribute("data-transport") == "websocket"

        server.kill()
        wait_state(page, "reconnecting")
        assert find(page, "#conn").text.startswith("Reconnecting")
        # Same data directory and port: the task, its run and its events survive the kill.
        server.start()
        for message in ["Running the migration", "Checking the row counts"]:
            harness.step(message)
            said.append(message)
        wait_live(page, "websocket")
        wait_narration(page, said)
        harness.step("Done migrating")
        said.append("Done migrating")
        wait_narration(page, said)
        shown = offsets(page)
        assert shown == sorted(set(shown)), "each step once, in order"
        # The resume asked for what was missing only: nothing came twice to be dropped.
        assert find(page, "#conn").get_attribute("data-duplicates") == "0"
        page.refresh()
        wait_narration(page, said)
        assert console_errors(page, allow=OFFLINE_NOISE) == []
    finally:
        server.kill()


def test_server_sent_events_when_websockets_are_off(page: Chrome, tmp_path: Path) -> None:
    server = Etherd(tmp_path, {"realtime": {"prefer_websocket": False}}).start()
    try:
        task = create_task(server, "Tidy the logging setup")
        harness = Harness(server, task["id"]).claim()
        harness.step("Looking at logging.py", "read")
        open_app(page, server, f"#/tasks/{task['id']}")
        wait_live(page, "sse")
        assert find(page, "#conn").text == "Live · SSE"
        said = ["Looking at logging.py"]
        wait_narration(page, said)
        harness.step("Moving the handlers into one place", "edit")
        said.append("Moving the handlers into one place")
        wait_narration(page, said)
        code, stats = server.request("GET", "/api/admin/stats", token="test")
        assert code == 200
        assert stats["connections"]["websocket"] == 0 and stats["connections"]["sse"] >= 1

        # The server goes away; the browser's EventSource reconnects by itself after its
        # retry delay (3 s in Chromium) and sends Last-Event-ID.
        server.kill()
        wait_state(page, "reconnecting")
        server.start()
        for message in ["Adding a JSON formatter", "Updating the docs"]:
            harness.step(message)
            said.append(message)
        assert conn_state(page) == "reconnecting", (
            "the stream came back before the steps were posted; this run does not prove "
            "the Last-Event-ID resume"
        )
        wait_narration(page, said)
        wait_live(page, "sse")
        shown = offsets(page)
        assert shown == sorted(set(shown))
        assert find(page, "#conn").get_attribute("data-duplicates") == "0"
        harness.interrupt("Keep the old format as an option?", ["Yes", "No"])
        wait_for(page, lambda d: d.find_elements(By.ID, "parked"), "the parked card over SSE")
        find(page, '#parked .option[data-option="Yes"]').click()
        assert harness.wait_for_answer()["answer"]["answer"] == "Yes"
        wait_for(page, lambda d: not d.find_elements(By.ID, "parked"), "task.resumed over SSE")
        assert console_errors(page, allow=OFFLINE_NOISE) == []
    finally:
        server.kill()
