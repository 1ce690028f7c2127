"""The Grafana dashboard in conf/ queries only metrics etherd really exports: every metric
name in every query is found in a live server's ``/metrics``."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from tests.conftest import Etherd

DASHBOARD = Path(__file__).resolve().parents[2] / "conf" / "grafana-etherd.json"
# Metric names in PromQL: what our exporters name (etherd_, process_), not functions or labels.
METRIC = re.compile(r"\b((?:etherd|process|python)_[a-z_]+)\b")


def exported(server: Etherd) -> set[str]:
    status, body = server.request("GET", "/metrics", token="test")
    assert status == 200
    text = body.decode() if isinstance(body, bytes) else str(body)
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line[:1].isalpha()}


def test_every_dashboard_query_names_an_exported_metric(tmp_path: Path) -> None:
    config = {"metrics": {"task_count_interval_s": 0.1}, "log": {"level": "warning"}}
    server = Etherd(tmp_path, config).start()
    try:
        # Make the families that appear only once something happened: a request, a commit,
        # a counted task.
        status, _ = server.request("POST", "/api/tasks", {"prompt": "count me"}, token="test")
        assert status == 201
        server.publish("t/grafana", "n")
        # And a limit hit (etherd_limit_hits_total has a sample per limit that was hit).
        long_key = {"Idempotency-Key": "k" * 300}
        body = {"events": [{"topic": "t/grafana", "event": "n"}]}
        status, _ = server.request("POST", "/api/publish", body, token="test", headers=long_key)
        assert status == 400
        deadline = time.monotonic() + 10
        names = exported(server)
        while "etherd_tasks" not in names and time.monotonic() < deadline:
            time.sleep(0.1)
            names = exported(server)
    finally:
        server.kill()
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(queries) >= 20
    used = {name for expr in queries for name in METRIC.findall(expr)}
    # The cluster's families exist only on a clustered node: tests/cluster checks those.
    missing = sorted(n for n in used - names if not n.startswith("etherd_cluster_"))
    assert not missing, f"the dashboard queries metrics etherd does not export: {missing}"
    # Every etherd family is on the dashboard somewhere (histograms through their buckets).
    families = {
        n.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count")
        for n in names
        if n.startswith("etherd_")
    }
    shown = {n.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count") for n in used}
    assert families <= shown, sorted(families - shown)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
