"""What the client raises: one base class, and a subclass per thing a caller may handle.

An answer with an error body (``{"error": {"code", "message"}}``) becomes an ``ApiError``
carrying the HTTP status, the code and the message; codes a program usually branches on
have their own subclass (``api_error`` picks it). Runs that are over raise a ``RunEnded``:
``LeaseExpired``, ``RunMismatch`` or ``TaskCancelled``.
"""

from __future__ import annotations

from typing import Any, Final

__all__ = [
    "AlreadyClaimed",
    "ApiError",
    "EtherdError",
    "Forbidden",
    "LeaseExpired",
    "NotFound",
    "RunEnded",
    "RunMismatch",
    "SubscriptionRefused",
    "TaskCancelled",
    "TokenExpired",
    "TransportError",
    "Unauthorized",
    "api_error",
]


class EtherdError(Exception):
    """Anything the client raises on purpose."""


class TransportError(EtherdError):
    """The server could not be reached, or the connection broke before an answer."""


class ApiError(EtherdError):
    """The server answered with an error: its HTTP status, error code and message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}" if code else message)
        self.status = status
        self.code = code
        self.message = message


class Unauthorized(ApiError):
    """401: no token, or one the server does not accept."""


class Forbidden(ApiError):
    """403: the token may not do this."""


class NotFound(ApiError):
    """404: no such task (or someone else's) or route."""


class AlreadyClaimed(ApiError):
    """409 ``already_claimed``: another run holds the task."""


class RunEnded(ApiError):
    """The run is over: stop working on the task (the subclass says why)."""


class LeaseExpired(RunEnded):
    """409 ``lease_expired``: the run's lease lapsed (no heartbeat in time)."""


class RunMismatch(RunEnded):
    """409 ``run_mismatch``: another run (or none) holds the task now."""


class TaskCancelled(RunEnded):
    """409 ``cancelled``: the owner cancelled the task."""


class SubscriptionRefused(EtherdError):
    """The server refused topics of a subscribe: ``errors`` lists them with their codes."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        shown = "; ".join(f"{e.get('topic')}: {e.get('message')}" for e in errors)
        super().__init__(f"subscription refused: {shown}")
        self.errors = errors


class TokenExpired(EtherdError):
    """The WebSocket was closed with 4001 and no ``token_provider`` can give a new token."""


_BY_STATUS: Final[dict[int, type[ApiError]]] = {
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
}
_BY_CODE: Final[dict[str, type[ApiError]]] = {
    "already_claimed": AlreadyClaimed,
    "lease_expired": LeaseExpired,
    "run_mismatch": RunMismatch,
    "cancelled": TaskCancelled,
}


def api_error(status: int, body: object) -> ApiError:
    """The exception for an error answer (``body`` is the decoded JSON, if it was JSON)."""
    code, message = "", f"HTTP {status}"
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        detail = body["error"]
        code = str(detail.get("code", ""))
        message = str(detail.get("message", message))
    kind = _BY_CODE.get(code) or _BY_STATUS.get(status) or ApiError
    return kind(status, code, message)
