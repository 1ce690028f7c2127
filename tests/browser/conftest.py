"""Browser-test fixtures: one headless Chromium for the session, page helpers, screenshots.

Needs Debian's ``chromium`` and ``chromium-driver``; ``make test`` installs them through
``tests/browser/ensure-browser.sh``. Without them these tests fail, never skip.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from selenium import webdriver
from selenium.common.exceptions import (
    NoSuchElementException,
    StaleElementReferenceException,
    TimeoutException,
)
from selenium.webdriver import Chrome
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

from tests.conftest import Etherd

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WAIT_S = 15.0
WIDE = (1280, 900)
NARROW = (400, 860)
# Screenshots land here (gitignored) so a person can look at them after a run.
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"

T = TypeVar("T")


@pytest.fixture(scope="session")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chrome]:
    """One headless Chromium for every browser test, with a fresh profile."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} not found: the browser tests need Debian's chromium and "
            f"chromium-driver; `make test` installs them (tests/browser/ensure-browser.sh), "
            f"or run: apt-get install chromium chromium-driver"
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
        "--force-color-profile=srgb",
        "--lang=en-US",
        f"--window-size={WIDE[0]},{WIDE[1]}",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def page(browser: Chrome) -> Iterator[Chrome]:
    """The browser at 1280 px wide with an empty console; left on a blank page after."""
    set_viewport(browser, WIDE)
    console_errors(browser)
    yield browser
    browser.get("about:blank")


def set_viewport(driver: Chrome, size: tuple[int, int]) -> None:
    """Lay the page out at exactly ``size`` CSS pixels (a window cannot be made narrower
    than about 500 px, so narrow layouts are emulated)."""
    width, height = size
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
    )


def overflows(driver: Chrome) -> list[str]:
    """Elements that stick out past the right edge of the viewport (a layout that does not
    fit its width), as ``tag.class right-edge``."""
    found: list[str] = driver.execute_script(
        """
        const width = document.documentElement.clientWidth;
        const out = [];
        for (const el of document.querySelectorAll("body *")) {
          const r = el.getBoundingClientRect();
          if (r.width && r.right > width + 0.5) {
            out.push(`${el.tagName}.${el.className} ${r.right}`);
          }
        }
        return out;
        """
    )
    return found


def console_errors(driver: Chrome, allow: tuple[str, ...] = ()) -> list[str]:
    """Console messages at error level since the last call (CSP violations land here),
    except those containing one of ``allow``."""
    # Chrome.get_log is unannotated; this is the same WebDriver command.
    entries: list[dict[str, Any]] = driver.execute("getLog", {"type": "browser"})["value"]
    return [
        str(e["message"])
        for e in entries
        if e.get("level") == "SEVERE" and not any(a in str(e["message"]) for a in allow)
    ]


def wait_for(driver: Chrome, condition: Callable[[Chrome], T | bool | None], what: str) -> T:
    """Wait until ``condition`` returns something truthy; fail saying ``what`` was awaited."""

    def check(d: Chrome) -> Any:
        try:
            return condition(d)
        except (NoSuchElementException, StaleElementReferenceException):
            return None

    try:
        result: T = WebDriverWait(driver, WAIT_S).until(check)
    except TimeoutException:
        body = driver.find_element(By.TAG_NAME, "body").text
        pytest.fail(f"timed out waiting for {what}; the page shows:\n{body[:3000]}")
    return result


def open_app(driver: Chrome, server: Etherd, route: str = "#/") -> None:
    """Load the page at a route and wait until its realtime connection is live."""
    driver.get(f"{server.base}/{route}")
    wait_live(driver)


def wait_live(driver: Chrome, transport: str | None = None) -> None:
    """Wait until the header says the realtime connection is open (over ``transport``)."""

    def live(d: Chrome) -> bool:
        conn = d.find_element(By.ID, "conn")
        return conn.get_attribute("data-state") == "open" and (
            transport is None or conn.get_attribute("data-transport") == transport
        )

    wait_for(driver, live, f"a live connection{f' over {transport}' if transport else ''}")


def conn_state(driver: Chrome) -> str:
    return driver.find_element(By.ID, "conn").get_attribute("data-state") or ""


def texts(driver: Chrome, css: str) -> list[str]:
    """The visible text of every element matching ``css``, in page order."""
    return [el.text for el in driver.find_elements(By.CSS_SELECTOR, css)]


def find(driver: Chrome, css: str) -> WebElement:
    return driver.find_element(By.CSS_SELECTOR, css)


def shot(driver: Chrome, name: str, *, full_page: bool = False, height: int = 0) -> Path:
    """Save a screenshot as ``tests/browser/artifacts/<name>.png``: the viewport, the whole
    page when ``full_page``, or the top ``height`` pixels; return its path."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    if not full_page and not height:
        driver.save_screenshot(str(path))
        return path
    # The capture lays the page out without a scrollbar, so clip to the viewport's width.
    size = driver.execute_script(
        "return [Math.max(innerWidth, document.documentElement.scrollWidth),"
        " document.documentElement.scrollHeight]"
    )
    if height:
        size[1] = min(size[1], height)
    shot_data = driver.execute_cdp_cmd(
        "Page.captureScreenshot",
        {
            "format": "png",
            "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": size[0], "height": size[1], "scale": 1},
        },
    )
    path.write_bytes(base64.b64decode(shot_data["data"]))
    return path


def storage(driver: Chrome, kind: str) -> dict[str, str]:
    """The page's ``sessionStorage`` or ``localStorage`` as a dict."""
    raw = driver.execute_script(f"return JSON.stringify(Object.assign({{}}, {kind}))")
    data: dict[str, str] = json.loads(raw)
    return data
