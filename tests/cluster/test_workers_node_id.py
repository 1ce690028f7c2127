"""``serve --workers N`` with ``cluster.node_id`` set (what a machine of a multi-machine
cluster naturally sets): each worker gets its own name, ``<node_id>-<n>``.

Peers are counted by name and presence keys its counts by name, so workers sharing one
name would never count each other (``/readyz`` would say ``peers: 0``) and presence would
report one worker's subscribers only.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import tomli_w

from tests.cluster.conftest import Subscriber, wait_for
from tests.cluster.test_workers import Supervised


def test_workers_sharing_a_configured_node_id_count_every_subscriber(
    tmp_path: Path, pg_url: str
) -> None:
    server = Supervised(tmp_path, pg_url, 2)
    server.config["cluster"] = {"node_id": "web1"}
    server.config_path.write_bytes(tomli_w.dumps(server.config).encode())
    server.start()
    topic = f"workers/presence-{uuid.uuid4().hex[:8]}"
    # 12 connections: all on one worker with probability 2 / 2**12.
    subs = [Subscriber(server, topic) for _ in range(12)]
    try:

        def counted() -> int:
            status, body = server.request(
                "GET", f"/api/topics/{topic.replace('/', '%2F')}/presence", token="test"
            )
            assert status == 200, body
            total: int = body["subscribers"]
            return total

        wait_for(lambda: counted() == 12, "presence to count all 12 subscribers", 10)
        assert server.nodes(30) <= {"web1-1", "web1-2"}
    finally:
        for sub in subs:
            sub.close()
        server.stop()
