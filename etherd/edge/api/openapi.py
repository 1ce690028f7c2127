"""``GET /api/openapi.json``: an OpenAPI 3.1 document generated from the route table.

Each ``Route`` says what it takes and answers (request body Struct, response Structs by
status, parameters, error statuses); the Structs become JSON Schemas through
``msgspec.json.schema_components``, so the document and the code cannot drift: a field
added to a Struct appears in the document, and ``make openapi`` writes the same document
to ``docs/openapi.json`` (a test compares the two).

Every error answer is the one body of contract section 8, ``ErrorBody``. Statuses every
route may answer are added to each: 400 (malformed request), 408 (request not whole in
time), 413 (body too large), 431 (headers too large) and 503 (overloaded or not ready); with
a token, 401 and 403 as well.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Final

import msgspec

from etherd import __version__
from etherd.core.errors import CODES
from etherd.core.wire import ENCODER, ErrorBody
from etherd.edge.api.common import Body, Route
from etherd.edge.http.request import Request
from etherd.edge.http.response import STATUS, Response

__all__ = ["OpenApiRoutes", "document"]

OPENAPI_PATH: Final = "/api/openapi.json"
_REF: Final = "#/components/schemas/{name}"
COMMON_ERRORS: Final = (400, 408, 413, 431, 503)
AUTH_ERRORS: Final = (401, 403)
_REASONS: Final = {
    400: "Malformed request, parameter or JSON",
    401: "No token, or one that does not verify",
    403: "The token may not do this",
    404: "Unknown route or resource (someone else's task too)",
    408: "The request did not arrive whole in time",
    409: "Conflict: run, lease, status or idempotency",
    413: "A body, field or batch over its limit",
    415: "The body is not JSON",
    422: "The JSON does not match the schema",
    426: "The route speaks WebSocket: send an upgrade",
    429: "Too many connections or commands",
    431: "Request headers over their limit",
    503: "Not ready (store down, draining) or overloaded",
}


def _codes_for(status: int) -> list[str]:
    return sorted(code for code, st in STATUS.items() if st == status)


def document(routes: Sequence[Route]) -> dict[str, Any]:
    """The OpenAPI 3.1 document describing ``routes``."""
    types: list[type] = [ErrorBody]
    for route in routes:
        if route.body is not None:
            types.append(route.body)
        types.extend(a for a in (route.responses or {}).values() if isinstance(a, type))
    unique = list(dict.fromkeys(types))
    schemas, components = msgspec.json.schema_components(unique, ref_template=_REF)
    ref = {typ: schema for typ, schema in zip(unique, schemas, strict=True)}
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        paths.setdefault(route.template, {})[route.method.lower()] = _operation(route, ref)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "etherd",
            "version": __version__,
            "description": (
                "Realtime hub for AI agent harnesses: the task API for products and harnesses, "
                "publishing, Server-Sent Events and the WebSocket upgrade. Every error body is "
                '{"error": {"code", "message"}}; the codes are listed under x-error-codes.'
            ),
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "responses": {
                f"Error{status}": {
                    "description": f"{reason} ({', '.join(_codes_for(status))})",
                    "content": {"application/json": {"schema": ref[ErrorBody]}},
                }
                for status, reason in _REASONS.items()
            },
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "x-error-codes": {code: {"status": STATUS[code], "meaning": CODES[code]} for code in CODES},
    }


def _operation(route: Route, ref: dict[type, dict[str, Any]]) -> dict[str, Any]:
    op: dict[str, Any] = {
        "operationId": _operation_id(route),
        "summary": route.summary,
    }
    if route.tag:
        op["tags"] = [route.tag]
    params = [
        {
            "name": p.name,
            "in": p.location,
            "required": p.required,
            "schema": dict(p.schema),
            **({"description": p.description} if p.description else {}),
        }
        for p in route.params
    ]
    params += [
        {
            "name": seg[1:-1],
            "in": "path",
            "required": True,
            "schema": {"type": "string", "minLength": 1},
        }
        for seg in route.template.split("/")
        if seg.startswith("{") and seg.endswith("}")
    ]
    if params:
        op["parameters"] = params
    if route.body is not None:
        op["requestBody"] = {
            "required": route.body_required,
            "content": {"application/json": {"schema": ref[route.body]}},
        }
    responses: dict[str, Any] = {}
    for status, answered in (route.responses or {200: None}).items():
        responses[str(status)] = _response(status, answered, ref)
    errors = set(COMMON_ERRORS) | set(route.errors)
    if route.auth:
        errors |= set(AUTH_ERRORS)
        op["security"] = [{"bearer": []}]
    else:
        op["security"] = []
    if "{" in route.template:
        errors.add(404)
    if route.body is not None:
        errors |= {415, 422}
    for status in sorted(errors):
        responses[str(status)] = {"$ref": f"#/components/responses/Error{status}"}
    op["responses"] = dict(sorted(responses.items()))
    return op


def _response(status: int, answered: object, ref: dict[type, dict[str, Any]]) -> dict[str, Any]:
    if answered is None:
        return {"description": "No body" if status != 101 else "Switching to WebSocket"}
    if isinstance(answered, Body):
        media: dict[str, Any] = {}
        if answered.schema is not None:
            media["schema"] = dict(answered.schema)
        return {"description": "OK", "content": {answered.media_type: media}}
    assert isinstance(answered, type)
    return {"description": "OK", "content": {"application/json": {"schema": ref[answered]}}}


def _operation_id(route: Route) -> str:
    words = [
        seg.strip("{}") if seg.startswith("{") else seg
        for seg in route.template.strip("/").split("/")
        if seg and seg != "api"
    ]
    name = "_".join(w.replace(".", "_").replace("-", "_") for w in words) or "root"
    return f"{route.method.lower()}_{name}"


class OpenApiRoutes:
    """Serves the document of the running route table (built once, on first request)."""

    def __init__(self, routes: Callable[[], Sequence[Route]]) -> None:
        self._routes = routes
        self._body: bytes | None = None

    def routes(self) -> list[Route]:
        """The route table entry."""
        return [
            Route(
                "GET",
                OPENAPI_PATH,
                lambda req, p: self.serve(req),
                summary="This document (OpenAPI 3.1)",
                responses={200: Body("application/json", {"type": "object"})},
                auth=False,
                tag="operations",
            )
        ]

    async def serve(self, request: Request) -> Response:
        """``GET /api/openapi.json``."""
        if self._body is None:
            self._body = render(self._routes())
        return Response(200, self._body)


def render(routes: Sequence[Route]) -> bytes:
    """The document as the server sends it and ``docs/openapi.json`` holds it."""
    formatted = msgspec.json.format(ENCODER.encode(document(routes)), indent=2)
    return formatted + b"\n"
