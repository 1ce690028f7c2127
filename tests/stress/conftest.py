"""Fixtures of the stress scenarios: a real etherd on each store, and the one-line figure
every scenario reports (printed, and repeated in the terminal summary)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Etherd
from tests.integration.conftest import pg_server, pg_url, store_url  # noqa: F401 - fixtures

FIGURES: list[str] = []

StartServer = Callable[[dict[str, Any]], Etherd]


@pytest.fixture
def figure(request: pytest.FixtureRequest) -> Callable[[str], None]:
    """Report a scenario's invariant and measured figure as one line."""

    def report(line: str) -> None:
        text = f"{request.node.name}: {line}"
        FIGURES.append(text)
        print(text)

    return report


@pytest.fixture
def closing() -> Iterator[contextlib.ExitStack]:
    """Sockets a scenario opens, closed at its end whether it passed or not."""
    with contextlib.ExitStack() as stack:
        yield stack


@pytest.fixture
def start_server(store_url: str, tmp_path: Path) -> Iterator[StartServer]:  # noqa: F811
    """Start etherd on the scenario's store with extra configuration; killed afterwards."""
    started: list[Etherd] = []

    def start(config: dict[str, Any]) -> Etherd:
        work = tmp_path / f"node{len(started)}"
        work.mkdir()
        merged = {"log": {"level": "warning"}, **config}
        merged["store"] = {**config.get("store", {}), "url": store_url}
        server = Etherd(work, merged).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.kill()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Repeat every figure at the end, so one run reads as a table."""
    if FIGURES:
        terminalreporter.section("stress figures")
        for line in FIGURES:
            terminalreporter.write_line(line)
