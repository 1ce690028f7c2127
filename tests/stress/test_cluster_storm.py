"""The recovery storm across a two-node cluster: subscribers on node B resume while the
publisher writes on node A, over a real nats-server and one PostgreSQL database."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.cluster.conftest import Nats, bus_state, node, wait_for
from tests.conftest import Etherd
from tests.stress.test_resume import check_storm, recovery_storm


@pytest.fixture
def pair(pg_url: str, tmp_path: Path) -> Iterator[tuple[Etherd, Etherd]]:
    """Nodes A and B on one database and one bus, both with the bus up."""
    bus = Nats().start()
    nodes = [node(tmp_path, pg_url, bus.url, name, log={"level": "warning"}) for name in ("a", "b")]
    try:
        for n in nodes:
            n.start()
        for n in nodes:
            wait_for(lambda n=n: bus_state(n) == "connected", "the bus on both nodes")
        yield nodes[0], nodes[1]
    finally:
        for n in nodes:
            n.kill()
        bus.stop()


def test_recovery_storm_across_nodes(
    pair: tuple[Etherd, Etherd], figure: Callable[[str], None]
) -> None:
    a, b = pair
    clients = 300
    tally, heads, behind = asyncio.run(
        recovery_storm(f"{b.ws_url}?token=test", a.base, clients, rounds=3)
    )
    check_storm(tally, heads, behind, clients, lambda line: figure(f"A -> B, {line}"))
