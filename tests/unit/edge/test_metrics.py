"""Metrics building blocks: the cheap histogram, route-template labels, the exposition."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families

from etherd.core.config import Config
from etherd.edge.http.request import Request
from etherd.edge.http.router import LabelledRouter
from etherd.edge.ops.exposition import render
from etherd.edge.ops.metrics import Histogram
from etherd.server import Services


def test_histogram_buckets_are_cumulative_and_inclusive() -> None:
    hist = Histogram([0.1, 1.0, 10.0])
    for v in (0.05, 0.1, 0.5, 1.0, 20.0):
        hist.observe(v)
    assert hist.cumulative() == [("0.1", 2), ("1.0", 4), ("10.0", 4), ("+Inf", 5)]
    assert hist.count == 5
    assert hist.sum == pytest.approx(21.65)


def test_histogram_needs_increasing_bounds() -> None:
    with pytest.raises(ValueError, match="increasing"):
        Histogram([1.0, 0.5])


def test_labelled_router_names_templates_not_paths() -> None:
    router: LabelledRouter[str] = LabelledRouter()
    router.add("GET", "/healthz", "h")
    router.add("GET", "/api/tasks/{id}", "task")
    router.add("POST", "/api/tasks/{id}/answer", "answer")
    assert router.template("GET", "/healthz") == "/healthz"
    assert router.template("HEAD", "/healthz") == "/healthz"
    assert router.template("GET", "/api/tasks/task_1") == "/api/tasks/{id}"
    assert router.template("POST", "/api/tasks/task_2/answer") == "/api/tasks/{id}/answer"
    assert router.template("GET", "/api/tasks/x/answer") == "other"  # wrong method
    assert router.template("GET", "/nope/123") == "other"
    assert router.resolve("GET", "/api/tasks/t")[0] == "task"  # still a Router


def _request(method: str, path: str) -> Request:
    return Request(method, path, "token=secret", {}, b"", True, False, "127.0.0.1:1")


def test_exposition_parses_and_counts_by_template(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = msgspec.convert(
        {"server": {"data_dir": str(tmp_path)}, "log": {"access_log": True}}, Config
    )

    async def go() -> bytes:
        metrics = Services(config, asyncio.get_running_loop()).metrics
        with caplog.at_level(logging.INFO, logger="etherd.access"):
            metrics.response(_request("GET", "/api/tasks/a"), 200)
            metrics.response(_request("GET", "/api/tasks/b"), 404)
            metrics.response(_request("GET", "/elsewhere"), 404)
            metrics.response(None, 400)
        metrics.on_commit(0.002, 7)
        return render(metrics)

    text = asyncio.run(go()).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    requests = {
        (s.labels["route"], s.labels["status"]): s.value
        for s in families["etherd_http_requests"].samples
    }
    assert requests == {
        ("/api/tasks/{id}", "200"): 1,
        ("/api/tasks/{id}", "404"): 1,
        ("other", "404"): 1,
        ("other", "400"): 1,
    }
    counts = {
        s.labels["route"]: s.value
        for s in families["etherd_http_request_duration_seconds"].samples
        if s.name.endswith("_count")
    }
    assert counts == {"/api/tasks/{id}": 2, "other": 1}
    batch = {s.name: s.value for s in families["etherd_store_batch_rows"].samples if not s.labels}
    assert batch == {"etherd_store_batch_rows_count": 1, "etherd_store_batch_rows_sum": 7}
    for name in (
        "etherd_websocket_connections_open",
        "etherd_websocket_connections_accepted",
        "etherd_messages_published",
        "etherd_event_loop_lag_seconds",
        "etherd_store_commit_duration_seconds",
        "process_resident_memory_bytes",
        "python_info",
    ):
        assert name in families, name
    paths = [getattr(r, "path", None) for r in caplog.records]
    assert paths == ["/api/tasks/a", "/api/tasks/b", "/elsewhere"]
    assert all("secret" not in r.getMessage() for r in caplog.records)
