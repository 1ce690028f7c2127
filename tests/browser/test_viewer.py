"""The built-in viewer page in a real headless Chromium: the browser's own, unmodified
``WebSocket`` and ``EventSource`` against a real etherd process.

Needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them). Without
them these tests fail, never skip.
"""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver import Chrome
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tests.conftest import Etherd

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WAIT_S = 20.0


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chrome]:
    """One headless Chromium per module, with a fresh profile."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} not found: the browser tests need Debian's chromium and "
            f"chromium-driver; install them as .ci/run does "
            f"(apt-get update -qq && apt-get install -y -qq chromium chromium-driver)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-quic",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    try:
        yield driver
    finally:
        driver.quit()


def console_errors(driver: Chrome) -> list[str]:
    """Console messages at error level since the last call (CSP violations land here)."""
    # Chrome.get_log is unannotated; this is the same WebDriver command.
    entries: list[dict[str, Any]] = driver.execute("getLog", {"type": "browser"})["value"]
    return [str(e["message"]) for e in entries if e.get("level") == "SEVERE"]


def open_viewer(
    driver: Chrome, server: Etherd, transport: str, topic: str, since: str = ""
) -> None:
    """Load the page, fill the form, connect, and wait until the subscription is live."""
    driver.get(server.base + "/")
    console_errors(driver)
    topic_input = driver.find_element(By.ID, "topic")
    topic_input.clear()
    topic_input.send_keys(topic)
    driver.find_element(By.ID, "since").send_keys(since)
    driver.find_element(By.ID, f"transport-{transport}").click()
    driver.find_element(By.ID, "connect").click()
    wait_for_state(driver, "open")


def wait_for_state(driver: Chrome, state: str) -> None:
    status = driver.find_element(By.ID, "status")
    try:
        WebDriverWait(driver, WAIT_S).until(lambda d: status.get_attribute("data-state") == state)
    except TimeoutException:
        pytest.fail(f"status never became {state!r}: {status.text!r}")


def listed(driver: Chrome) -> list[tuple[int, str, dict[str, Any]]]:
    """(offset, event name, the JSON shown) for every event on the page, in page order."""
    out = []
    for li in driver.find_elements(By.CSS_SELECTOR, "#events li"):
        shown = json.loads(li.find_element(By.TAG_NAME, "code").text)
        out.append(
            (int(li.get_attribute("data-offset") or 0), li.get_attribute("data-event") or "", shown)
        )
    return out


def wait_for_events(driver: Chrome, count: int) -> list[tuple[int, str, dict[str, Any]]]:
    try:
        WebDriverWait(driver, WAIT_S).until(
            lambda d: len(d.find_elements(By.CSS_SELECTOR, "#events li")) >= count
        )
    except TimeoutException:
        status = driver.find_element(By.ID, "status").text
        pytest.fail(f"the page lists {listed(driver)} (status {status!r}); expected {count} events")
    return listed(driver)


def duplicates(driver: Chrome) -> int:
    return int(driver.find_element(By.ID, "events").get_attribute("data-duplicates") or 0)


@pytest.mark.parametrize("transport", ["ws", "sse"])
def test_live_events_reach_the_page(browser: Chrome, etherd: Etherd, transport: str) -> None:
    topic = f"tasks/viewer_live_{transport}"
    open_viewer(browser, etherd, transport, topic)
    # Markup in event data must be shown as text, never parsed.
    markup = "<img src=x onerror=\"document.title='pwned'\">"
    etherd.publish(topic, "hello", text="one")
    etherd.publish(topic, "task.timeline", entry={"kind": "step", "summary": markup})
    etherd.publish(topic, "note", n=3)
    events = wait_for_events(browser, 3)
    assert [(offset, name) for offset, name, _ in events] == [
        (1, "hello"),
        (2, "task.timeline"),
        (3, "note"),
    ]
    assert events[0][2]["text"] == "one" and events[0][2]["topic"] == topic
    assert events[1][2]["entry"]["summary"] == markup
    assert not browser.find_elements(By.CSS_SELECTOR, "#events img")
    assert browser.title == "etherd live viewer"
    assert duplicates(browser) == 0
    assert console_errors(browser) == []


@pytest.mark.parametrize("transport", ["ws", "sse"])
def test_since_replays_stored_events_then_goes_live(
    browser: Chrome, etherd: Etherd, transport: str
) -> None:
    topic = f"tasks/viewer_replay_{transport}"
    for n in range(1, 4):
        etherd.publish(topic, "hello", n=n)
    open_viewer(browser, etherd, transport, topic, since="1")
    assert [offset for offset, _, _ in wait_for_events(browser, 2)] == [2, 3]
    etherd.publish(topic, "hello", n=4)
    assert [offset for offset, _, _ in wait_for_events(browser, 3)] == [2, 3, 4]
    assert duplicates(browser) == 0
    assert console_errors(browser) == []


def test_event_source_resumes_with_last_event_id(browser: Chrome, tmp_path: Path) -> None:
    """A restart drops the stream; EventSource reconnects by itself and sends Last-Event-ID,
    so events stored while it was away arrive once, in order (the page asked for live only).
    """
    server = Etherd(tmp_path, {"realtime": {"prefer_websocket": False}}).start()
    try:
        browser.get(server.base + "/")
        # The default transport follows GET /api/realtime/config.
        sse = browser.find_element(By.ID, "transport-sse")
        WebDriverWait(browser, WAIT_S).until(lambda d: sse.is_selected())
        browser.find_element(By.ID, "connect").click()
        wait_for_state(browser, "open")
        topic = "tasks/task_abc"
        for n in range(1, 4):
            server.publish(topic, "hello", n=n)
        wait_for_events(browser, 3)
        assert server.stop() == 0
        wait_for_state(browser, "connecting")
        server.start()
        started = time.monotonic()
        server.publish(topic, "hello", n=4)
        server.publish(topic, "hello", n=5)
        # Chromium waits 3 s before reconnecting, so both events were stored before the
        # stream came back: only the Last-Event-ID replay can deliver them.
        state = browser.find_element(By.ID, "status").get_attribute("data-state")
        assert state == "connecting", (
            f"EventSource reconnected within {time.monotonic() - started:.1f} s of the restart, "
            f"before the events were published; this run does not prove the resume"
        )
        events = wait_for_events(browser, 5)
        assert [offset for offset, _, _ in events] == [1, 2, 3, 4, 5]
        assert [shown["n"] for _, _, shown in events] == [1, 2, 3, 4, 5]
        wait_for_state(browser, "open")
        assert duplicates(browser) == 0
    finally:
        server.kill()


def test_page_is_served_with_a_strict_policy(etherd: Etherd) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", etherd.port, timeout=5)
    try:
        conn.request("GET", "/")
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    assert resp.status == 200
    assert resp.getheader("Content-Type") == "text/html; charset=utf-8"
    assert resp.getheader("X-Content-Type-Options") == "nosniff"
    csp = resp.getheader("Content-Security-Policy") or ""
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
    assert directives["default-src"] == "'none'"
    assert directives["script-src"].startswith("'sha256-") and " " not in directives["script-src"]
    assert directives["connect-src"] == (
        f"'self' ws://127.0.0.1:{etherd.port} wss://127.0.0.1:{etherd.port}"
    )
    # Nothing is loaded from elsewhere: no script or style files, no remote URLs.
    assert b"src=" not in body and b"://" not in body
