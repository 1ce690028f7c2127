"""The operator view in Chromium: the server's stats as they change, the publish form, and
the live tail over WebSocket and over Server-Sent Events (live delivery, ``since``
replay, markup shown as text)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from selenium.webdriver import Chrome
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select
from websockets.sync.client import ClientConnection, connect

from tests.browser.conftest import console_errors, find, open_app, shot, wait_for
from tests.conftest import Etherd


@contextmanager
def subscriber(server: Etherd, topic: str) -> Iterator[ClientConnection]:
    """A WebSocket client subscribed to ``topic`` (acknowledged) for the block's duration."""
    with connect(server.ws_url + "?token=test", proxy=None) as ws:
        ws.send(json.dumps({"action": "subscribe", "topics": [topic], "id": "x"}))
        reply = json.loads(ws.recv(timeout=5))
        assert reply["type"] == "subscribed" and not reply["errors"], reply
        yield ws


def subscribers(page: Chrome, topic: str) -> int | None:
    """The count the page shows for ``topic``, or None when the topic is not listed."""
    rows = page.find_elements(By.CSS_SELECTOR, f'#topics-body tr[data-topic="{topic}"]')
    return int(rows[0].find_elements(By.TAG_NAME, "td")[1].text) if rows else None


def wait_subscribers(page: Chrome, topic: str, count: int | None) -> None:
    wait_for(page, lambda d: subscribers(d, topic) == count, f"{count} subscribers of {topic}")


def test_the_subscriber_count_follows_clients_as_they_come_and_go(
    page: Chrome, etherd: Etherd
) -> None:
    open_app(page, etherd, "#/ops")
    wait_for(page, lambda d: d.find_element(By.ID, "stat-node").text != "–", "the stats")
    assert find(page, "#store-up").text == "Up"
    assert find(page, "#store-kind").text == "SQLite"
    # The page's own connection (the first read may have raced its upgrade).
    wait_for(page, lambda d: int(d.find_element(By.ID, "stat-websocket").text) >= 1, "it")
    topic = "ops/watched"
    assert subscribers(page, topic) is None
    with subscriber(etherd, topic):
        wait_subscribers(page, topic, 1)
        with subscriber(etherd, topic):
            etherd.publish(topic, "note", text="one")
            # The rates cover the last few seconds, computed by the server.
            wait_for(
                page,
                lambda d: (
                    subscribers(d, topic) == 2
                    and float(d.find_element(By.ID, "rate-published").text) > 0
                ),
                "2 subscribers and a publish rate",
            )
            shot(page, "operator-1280")
        wait_subscribers(page, topic, 1)
    wait_subscribers(page, topic, None)
    assert console_errors(page) == []


@pytest.mark.parametrize("transport", ["websocket", "sse"])
def test_the_tail_replays_with_since_then_shows_published_events_live(
    page: Chrome, etherd: Etherd, transport: str
) -> None:
    topic = f"ops/tail_{transport}"
    for n in range(1, 4):
        etherd.publish(topic, "hello", n=n)
    open_app(page, etherd, "#/ops")
    tail_topic = find(page, "#tail-topic")
    tail_topic.clear()
    tail_topic.send_keys(topic)
    find(page, "#tail-since").send_keys("1")
    Select(find(page, "#tail-transport")).select_by_value(transport)
    find(page, "#tail-toggle").click()
    status = find(page, "#tail-status")
    wait_for(page, lambda d: status.get_attribute("data-state") == "open", "the tail to follow")
    via = "Server-Sent Events" if transport == "sse" else "WebSocket"
    assert status.text == f"Following {topic} over {via}."

    def shown() -> list[tuple[int, str, dict[str, object]]]:
        return [
            (
                int(li.get_attribute("data-offset") or 0),
                li.get_attribute("data-event") or "",
                json.loads(li.find_element(By.TAG_NAME, "pre").text),
            )
            for li in page.find_elements(By.CSS_SELECTOR, "#tail-events li[data-offset]")
        ]

    wait_for(page, lambda d: len(shown()) == 2, "the replay after offset 1")
    assert [(o, e, d["n"]) for o, e, d in shown()] == [(2, "hello", 2), (3, "hello", 3)]

    # The publish form, then markup from elsewhere: shown as text, never parsed.
    pub_topic = find(page, "#pub-topic")
    pub_topic.clear()
    pub_topic.send_keys(topic)
    find(page, "#publish-form button[type=submit]").click()
    result = find(page, "#pub-result")
    wait_for(page, lambda d: result.text, "the publish answer")
    assert result.text == f"Published note on {topic} at offset 4."
    markup = "<img src=x onerror=\"document.title='pwned'\">"
    etherd.publish(topic, "note", text=markup)
    wait_for(page, lambda d: len(shown()) == 4, "two live events")
    events = shown()
    assert [(o, e) for o, e, _ in events] == [(2, "hello"), (3, "hello"), (4, "note"), (5, "note")]
    assert events[2][2]["text"] == "hello from the operator view"
    assert events[3][2]["text"] == markup and events[3][2]["topic"] == topic
    assert not page.find_elements(By.CSS_SELECTOR, "#tail-events img")
    assert "pwned" not in page.title
    assert find(page, "#tail-events").get_attribute("data-duplicates") == "0"

    # A bad data field is answered in the form, not sent.
    data = find(page, "#pub-data")
    data.clear()
    data.send_keys("[1, 2]")
    find(page, "#publish-form button[type=submit]").click()
    assert find(page, "#pub-error").text.startswith("Data must be a JSON object")
    find(page, "#tail-toggle").click()
    wait_for(page, lambda d: status.text == "Stopped.", "the tail to stop")
    assert console_errors(page) == []
