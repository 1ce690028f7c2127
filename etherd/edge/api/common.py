"""What every route needs: the route and handler types, request dispatch (every refusal
becomes its JSON error), authentication, JSON bodies and ``Idempotency-Key``.

Handlers take a parsed ``Request`` and the path parameters and return a ``Response`` (or a
``Stream`` or an ``Upgrade``); refusals are raised as ``Refusal`` and rendered by
``Dispatcher``, which is also the one place an unexpected exception becomes a 500.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final, Literal, NamedTuple, TypeVar

import msgspec

from etherd.core.auth import Authenticator, AuthError, Principal
from etherd.core.errors import Refusal
from etherd.core.events import Idempotency, IdempotentAnswer
from etherd.core.wire import ENCODER, MAX_INT
from etherd.edge.http.request import Request
from etherd.edge.http.response import Headers, Response, Result, error_response
from etherd.edge.http.router import LabelledRouter

__all__ = [
    "HARNESS_APP",
    "IDEMPOTENCY_KEY",
    "MAX_INT",
    "TOKEN_QUERY",
    "Answered",
    "Body",
    "Dispatcher",
    "Handler",
    "Param",
    "Route",
    "answer_of",
    "authenticate",
    "decode_json",
    "idempotency",
    "int_param",
    "int_query",
    "json_response",
    "parse_int",
]

log = logging.getLogger("etherd")

T = TypeVar("T")
Handler = Callable[[Request, dict[str, str]], Awaitable[Result]]


class Param(NamedTuple):
    """A query, header or path parameter, as the OpenAPI document shows it."""

    name: str
    location: Literal["query", "header", "path"]
    schema: Mapping[str, Any]
    required: bool = False
    description: str = ""


class Body(NamedTuple):
    """A response body that is not a JSON Struct: its media type and, if any, its schema."""

    media_type: str
    schema: Mapping[str, Any] | None = None


# What a status answers: a Struct type (JSON), a ``Body``, or None (no body).
Answered = type | Body | None


class Route(NamedTuple):
    """One entry of the route table, with what the OpenAPI document needs to describe it.

    ``body`` is the request body's Struct (``body_required`` says whether it may be left
    out); ``responses`` maps each success status to what it answers; ``errors`` lists the
    error statuses beyond those every route can answer (``edge.api.openapi`` adds 400, 408,
    413, 431 and 503, and 401/403 when ``auth``).

    ``streams``: the route may answer with a ``Stream`` or an ``Upgrade`` (it takes the
    connection over), so pipelined requests after it wait until it has answered.
    """

    method: str
    template: str
    handler: Handler
    streams: bool = False
    summary: str = ""
    body: type | None = None
    body_required: bool = True
    responses: Mapping[int, Answered] | None = None
    errors: tuple[int, ...] = ()
    params: tuple[Param, ...] = ()
    auth: bool = True
    tag: str = ""


# Parameters many routes share.
IDEMPOTENCY_KEY: Final = Param(
    "Idempotency-Key",
    "header",
    {"type": "string", "minLength": 1, "maxLength": 255},
    description="A retry with the same key and body answers the first answer and stores "
    "nothing new (http.max_idempotency_key_chars)",
)
HARNESS_APP: Final = Param(
    "X-Ether-Harness-App",
    "header",
    {"type": "string", "minLength": 1},
    required=True,
    description="The harness app id (auth.harness_apps may restrict it)",
)
TOKEN_QUERY: Final = Param(
    "token",
    "query",
    {"type": "string"},
    description="The bearer token, for clients that cannot set headers (browsers)",
)


def parse_int(text: str, name: str) -> int:
    """A non-negative decimal integer a client sent, below 2^63.

    Raises:
        Refusal: ``bad_request`` naming ``name`` for anything else (signs, spaces,
            non-ASCII digits that ``str.isdigit`` accepts, numbers past 63 bits).
    """
    if not (text.isascii() and text.isdigit()) or len(text) > 19 or int(text) > MAX_INT:
        raise Refusal(
            "bad_request",
            f"{name} must be a non-negative integer below 2^63, got {text[:40]!r}",
        )
    return int(text)


def int_param(request: Request, name: str, default: int) -> int:
    """A non-negative integer query parameter (``default`` when absent or empty)."""
    text = request.param(name)
    if text is None or text == "":
        return default
    return parse_int(text, name)


def int_query(name: str, description: str) -> Param:
    """A non-negative integer query parameter."""
    schema = {"type": "integer", "minimum": 0, "maximum": MAX_INT}
    return Param(name, "query", schema, description=description)


class Dispatcher:
    """Routes a request and turns every refusal into its JSON error response."""

    def __init__(self, router: LabelledRouter[Handler], limit_hits: Counter[str]) -> None:
        self.router = router
        self._limit_hits = limit_hits

    async def __call__(self, request: Request) -> Result:
        try:
            handler, params = self.router.resolve(request.method, request.path)
            return await handler(request, params)
        except Refusal as exc:
            if exc.limit is not None:
                self._limit_hits[exc.limit] += 1
            headers: Headers = ()
            if exc.code == "unauthorized":
                headers = ((b"WWW-Authenticate", b'Bearer realm="etherd"'),)
            elif exc.code == "upgrade_required":
                headers = ((b"Upgrade", b"websocket"), (b"Sec-WebSocket-Version", b"13"))
            return error_response(exc, headers)
        except Exception:
            log.exception("%s %s failed", request.method, request.path)
            return error_response(Refusal("internal", "the server failed this request"))


def json_response(status: int, body: object) -> Response:
    """A JSON response from a Struct or plain data."""
    return Response(status, ENCODER.encode(body))


def answer_of(answer: tuple[int, bytes] | IdempotentAnswer) -> Response:
    """The response of a change: its own answer, or the one stored for an earlier retry."""
    if isinstance(answer, IdempotentAnswer):
        return Response(answer.status, answer.body, headers=((b"Idempotent-Replayed", b"true"),))
    return Response(answer[0], answer[1])


def authenticate(auth: Authenticator, request: Request, *, query_token: bool = False) -> Principal:
    """The caller's principal from ``Authorization: Bearer`` (or ``?token=`` when allowed)."""
    try:
        header = request.headers.get("authorization")
        if header is None and query_token:
            token = request.param("token")
            if token is not None:
                return auth.verify(token)
        return auth.bearer(header)
    except AuthError as exc:
        raise Refusal(exc.code, exc.message) from None


def decode_json(request: Request, typ: type[T]) -> T:
    """Decode a JSON body into a Struct: 415 if not JSON, 400 if malformed, 422 if invalid."""
    ctype = request.headers.get("content-type", "")
    if ctype.split(";", 1)[0].strip().lower() != "application/json":
        raise Refusal(
            "unsupported_media_type",
            f"expected Content-Type: application/json, got {ctype or 'none'!r}",
        )
    try:
        return msgspec.json.decode(request.body, type=typ)
    except msgspec.ValidationError as exc:
        raise Refusal("unprocessable", f"invalid body: {exc}") from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise Refusal("bad_request", f"body is not valid JSON: {exc}") from None


def idempotency(request: Request, principal: Principal, max_chars: int) -> Idempotency | None:
    """The request's ``Idempotency-Key``, scoped to the caller and route, if any."""
    key = request.headers.get("idempotency-key")
    if key is None:
        return None
    if not key or len(key) > max_chars:
        raise Refusal(
            "bad_request",
            f"Idempotency-Key must be 1 to {max_chars} chars (http.max_idempotency_key_chars)",
            limit="http.max_idempotency_key_chars",
        )
    fingerprint = hashlib.sha256(request.body).hexdigest()
    return Idempotency(key, f"{principal.sub}:{request.method}:{request.path}", fingerprint)
