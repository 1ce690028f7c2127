"""Every error code etherd answers with, its HTTP status, and the WebSocket close codes.

Two planes, as in the contract: an ``ApiError`` is a reply (HTTP error body or a WebSocket
``{"type":"error"}`` message) after which the session goes on; a close code ends a
WebSocket session. Codes are stable strings a program can branch on.
"""

from __future__ import annotations

from typing import Final

# code -> HTTP status (contract section 8)
STATUS: Final[dict[str, int]] = {
    "bad_request": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "method_not_allowed": 405,
    "request_timeout": 408,
    "conflict": 409,
    "run_mismatch": 409,
    "lease_expired": 409,
    "invalid_transition": 409,
    "already_claimed": 409,
    "idempotency_conflict": 409,
    "payload_too_large": 413,
    "unsupported_media_type": 415,
    "unprocessable": 422,
    "upgrade_required": 426,
    "headers_too_large": 431,
    "rate_limited": 429,
    "internal": 500,
    "not_ready": 503,
    "overloaded": 503,
}


class ApiError(Exception):
    """A refusal with a stable code and a message a person can act on."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def status(self) -> int:
        """The HTTP status that goes with the code."""
        return STATUS[self.code]


# RFC 6455 section 7.4.1 close codes, and ours in the 4000-4999 private range.
CLOSE_NORMAL: Final = 1000
CLOSE_GOING_AWAY: Final = 1001  # server stopping
CLOSE_PROTOCOL_ERROR: Final = 1002
CLOSE_UNSUPPORTED_DATA: Final = 1003  # binary frame where JSON text is expected
CLOSE_INVALID_PAYLOAD: Final = 1007  # text that is not UTF-8
CLOSE_POLICY_VIOLATION: Final = 1008  # too many connections for the token subject
CLOSE_MESSAGE_TOO_BIG: Final = 1009
CLOSE_INTERNAL_ERROR: Final = 1011
CLOSE_SERVICE_RESTART: Final = 1012
CLOSE_PING_TIMEOUT: Final = 4000  # the client stopped answering pings
CLOSE_TOKEN_EXPIRED: Final = 4001
CLOSE_SLOW_CONSUMER: Final = 4008  # unsent bytes passed ws.max_pending_bytes; resume with since


def valid_close_code(code: int) -> bool:
    """Whether a peer may send this close code (RFC 6455 section 7.4)."""
    if 1000 <= code <= 1003 or 1007 <= code <= 1014:
        return True
    return 3000 <= code <= 4999
