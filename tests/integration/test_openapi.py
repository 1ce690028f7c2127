"""The OpenAPI document: served at ``/api/openapi.json``, committed as ``docs/openapi.json``,
complete, and true: schemathesis drives every route of a live server with generated valid
and invalid requests, and every answer must be a documented status with a body that matches
the document, never a 5xx.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import Case, GenerationMode, Response
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import Etherd

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "docs" / "openapi.json"
# Examples per operation and generation mode: enough to reach every status of a route,
# few enough that the whole run stays well under a minute.
EXAMPLES = 25


@pytest.fixture(scope="module")
def api_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Etherd]:
    server = Etherd(tmp_path_factory.mktemp("openapi"), {"log": {"level": "error"}}).start()
    try:
        yield server
    finally:
        server.kill()


def test_the_committed_document_is_what_the_server_serves(api_server: Etherd) -> None:
    status, body = api_server.request("GET", "/api/openapi.json")
    assert status == 200
    assert json.loads(COMMITTED.read_text()) == body, "run `make openapi` and commit the result"
    printed = subprocess.run(
        [sys.executable, "-m", "etherd", "openapi"], capture_output=True, check=True, cwd=ROOT
    ).stdout
    assert printed == COMMITTED.read_bytes()


def test_every_route_is_documented_with_its_errors(api_server: Etherd) -> None:
    _, doc = api_server.request("GET", "/api/openapi.json")
    operations = {
        (method.upper(), path): op
        for path, item in doc["paths"].items()
        for method, op in item.items()
    }
    expected = {
        ("GET", "/"),
        ("GET", "/client.js"),
        ("GET", "/web/{name}"),
        ("GET", "/api/whoami"),
        ("GET", "/api/admin/stats"),
        ("GET", "/api/topics/{topic}/presence"),
        ("GET", "/healthz"),
        ("GET", "/readyz"),
        ("GET", "/metrics"),
        ("GET", "/api/openapi.json"),
        ("GET", "/api/realtime"),
        ("GET", "/api/realtime/config"),
        ("GET", "/api/events"),
        ("POST", "/api/publish"),
        ("POST", "/api/tasks"),
        ("GET", "/api/tasks/{id}"),
        ("GET", "/api/tasks/{id}/delivery"),
        ("GET", "/api/tasks/{id}/timeline"),
        ("GET", "/api/tasks/{id}/events"),
        ("POST", "/api/tasks/{id}/answer"),
        ("POST", "/api/tasks/{id}/cancel"),
        ("GET", "/api/activity"),
        *(
            (method, f"/api/harness/tasks/{path}")
            for method, path in (
                ("GET", "claimable"),
                ("GET", "{id}/execution"),
                ("POST", "{id}/claim"),
                ("POST", "{id}/heartbeat"),
                ("POST", "{id}/steps"),
                ("POST", "{id}/interrupt"),
                ("POST", "{id}/result"),
            )
        ),
    }
    assert set(operations) == expected
    error = {"$ref": "#/components/schemas/ErrorBody"}
    assert doc["components"]["responses"]["Error409"]["content"]["application/json"] == {
        "schema": error
    }
    for (method, path), op in operations.items():
        assert op["summary"], (method, path)
        statuses = set(op["responses"])
        assert {"400", "413", "503"} <= statuses, (method, path)
        if op["security"]:
            assert {"401", "403"} <= statuses, (method, path)
        if "requestBody" in op:
            assert {"415", "422"} <= statuses, (method, path)
        assert any(s.startswith(("1", "2")) for s in statuses), (method, path)
    task = doc["paths"]["/api/tasks/{id}"]["get"]["responses"]["200"]
    view = doc["components"]["schemas"]["TaskView"]
    assert task["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/TaskView"
    }
    assert {"task_id", "id", "status", "delivery"} <= set(view["properties"])
    cancel = doc["paths"]["/api/harness/tasks/{id}/heartbeat"]["post"]["responses"]
    assert cancel["409"] == {"$ref": "#/components/responses/Error409"}
    assert "cancelled" in doc["components"]["responses"]["Error409"]["description"]


@pytest.fixture(scope="module")
def api_schema(api_server: Etherd) -> Any:
    config = schemathesis.Config.from_dict({"headers": {"Authorization": "Bearer test"}})
    return schemathesis.openapi.from_url(f"{api_server.base}/api/openapi.json", config=config)


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def _can_be_invalid(op: dict[str, Any]) -> bool:
    """Whether invalid requests exist for an operation: a query or header parameter or a
    body to break (schemathesis keeps path parameters valid, as they shape the URL)."""
    params = [p for p in op.get("parameters", []) if p["in"] != "path"]
    return bool(params) or "requestBody" in op


# Every operation of the committed document (the first test keeps it equal to the served
# one), with valid requests and, where they exist, invalid ones.
CASES = sorted(
    (method.upper(), path, mode)
    for path, item in json.loads(COMMITTED.read_text())["paths"].items()
    for method, op in item.items()
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    if mode is GenerationMode.POSITIVE or _can_be_invalid(op)
)


def check(case: Case[Any]) -> None:
    """Send one generated request and hold the answer against the document."""
    streaming = "text/event-stream" in json.dumps(case.operation.definition.raw["responses"])
    if not streaming:
        case.call_and_validate(checks=CHECKS, timeout=10)
        return
    # A Server-Sent Events stream never ends: check its head, then let it go.
    kwargs = case.as_transport_kwargs(base_url=case.operation.base_url)
    with requests.request(**kwargs, stream=True, timeout=10) as raw:
        if raw.status_code == 200:
            assert raw.headers["content-type"].startswith("text/event-stream")
            return
        raw.content  # noqa: B018 - an error answer is whole: read it, then validate it
        case.validate_response(Response.from_requests(raw, verify=False), checks=CHECKS)


@pytest.mark.parametrize(("method", "path", "mode"), CASES)
def test_every_route_answers_as_documented(
    api_schema: Any, method: str, path: str, mode: GenerationMode
) -> None:
    operation = api_schema[path][method]

    @given(operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
        derandomize=True,
    )
    def run(case: Case[Any]) -> None:
        check(case)

    run()
