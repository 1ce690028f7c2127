"""Signing in with a real token in Chromium: asked for, checked, kept for the tab only."""

from __future__ import annotations

from pathlib import Path

from selenium.webdriver import Chrome
from selenium.webdriver.common.by import By

from tests.browser.conftest import (
    console_errors,
    find,
    storage,
    texts,
    wait_for,
    wait_live,
)
from tests.browser.harness import create_task
from tests.conftest import Etherd, make_token


def sign_in(page: Chrome, token: str) -> None:
    field = wait_for(page, lambda d: d.find_element(By.ID, "token-input"), "the sign-in form")
    field.clear()
    field.send_keys(token)
    find(page, "main form button[type=submit]").click()


def test_with_real_auth_the_page_asks_for_a_token_and_keeps_it_for_the_tab(
    page: Chrome, tmp_path: Path
) -> None:
    server = Etherd(tmp_path, {"auth": {"dev": False}}).start()
    try:
        alice = make_token("alice")
        mine = create_task(server, "Alice's first task", token=alice)
        create_task(server, "Bob's task", token=make_token("bob"))
        code, config = server.request("GET", "/api/realtime/config")
        assert code == 200 and "dev_token" not in config

        page.get(server.base + "/")
        wait_for(page, lambda d: d.find_element(By.ID, "sign-in-title"), "the sign-in page")
        assert find(page, "#conn").get_attribute("data-state") == "idle"
        # The development token means nothing here, and the page says why.
        sign_in(page, "test")
        error = wait_for(page, lambda d: d.find_element(By.CSS_SELECTOR, "main .notice").text, "e")
        assert error.startswith("That token was refused: development mode is off")
        assert storage(page, "sessionStorage") == {}

        sign_in(page, alice)
        wait_live(page)
        wait_for(page, lambda d: texts(d, ".task-row .task-link"), "alice's tasks")
        assert texts(page, ".task-row .task-link") == ["Alice's first task"]
        assert find(page, "#who-name").text == "alice"
        assert not find(page, '[data-nav="ops"]').is_displayed(), "a user is no operator"
        assert storage(page, "sessionStorage") == {"etherd.token": alice}
        assert storage(page, "localStorage") == {}

        # A reload keeps the session; the task page works with the user's token.
        page.get(f"{server.base}/#/tasks/{mine['id']}")
        page.refresh()
        wait_for(
            page, lambda d: d.find_element(By.ID, "task-title").text == "Alice's first task", "t"
        )
        wait_live(page)
        page.get(f"{server.base}/#/ops")
        wait_for(
            page,
            lambda d: "needs an admin token" in d.find_element(By.TAG_NAME, "main").text,
            "the operator view to be refused",
        )
        code, body = server.request("GET", "/api/admin/stats", token=alice)
        assert code == 403 and body["error"]["code"] == "forbidden"

        find(page, "#sign-out").click()
        wait_for(page, lambda d: d.find_element(By.ID, "sign-in-title"), "the sign-in page")
        assert "You are signed out." in find(page, "main").text
        assert storage(page, "sessionStorage") == {}
        page.refresh()
        wait_for(page, lambda d: d.find_element(By.ID, "sign-in-title"), "still signed out")
        # The refused sign-in answered 401 once; nothing else failed.
        assert console_errors(page, allow=("401",)) == []
    finally:
        server.kill()


def test_in_development_mode_the_page_works_at_once(page: Chrome, etherd: Etherd) -> None:
    code, config = etherd.request("GET", "/api/realtime/config")
    assert code == 200 and config["dev_token"] == "test"
    page.get(etherd.base + "/")
    wait_live(page)
    assert find(page, "#who-name").text == "dev (development mode)"
    assert not find(page, "#sign-out").is_displayed()
    assert find(page, '[data-nav="ops"]').is_displayed(), "the development token is an admin"
    assert storage(page, "sessionStorage") == {}, "nothing is stored for the development token"
