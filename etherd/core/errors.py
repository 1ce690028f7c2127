"""The two error planes: refusals (a reply, the session goes on) and disconnects (it ends).

A ``Refusal`` carries a stable code a program can branch on and a message a person can act
on. The HTTP edge answers it as the JSON error body of contract section 8 with the status
``edge.http.response.STATUS`` gives the code; the WebSocket session answers it as a
``{"type":"error"}`` reply. The codes, and what each means, are listed in ``CODES``; nothing
else invents one.

A ``Disconnect`` ends a WebSocket session with an RFC 6455 close code and a reason (at most
123 bytes, the room a CLOSE frame leaves). Every close the server initiates is one of the
values below or made by one of the functions below, so the close codes a client can see are
all in this file. Codes 4000-4999 are ours; each of ours means "reconnect (and resume with
``since``)", except where noted.
"""

from __future__ import annotations

from typing import Final, NamedTuple

__all__ = [
    "CODES",
    "GOING_AWAY",
    "PEER_GONE",
    "PING_TIMEOUT",
    "REPLAY_FAILED",
    "SLOW_CONSUMER",
    "TOKEN_EXPIRED",
    "Disconnect",
    "Refusal",
    "binary_message",
    "echo_close",
    "invalid_utf8",
    "message_too_big",
    "protocol_error",
    "valid_close_code",
]

# Every refusal code and what it means (contract section 8).
CODES: Final[dict[str, str]] = {
    "bad_request": "the request is malformed",
    "unauthorized": "no token, or a token that does not verify",
    "forbidden": "the token may not do this",
    "not_found": "no such route, task or resource",
    "method_not_allowed": "the route exists with other methods",
    "request_timeout": "the request did not arrive whole in time",
    "conflict": "the resource changed or already exists",
    "run_mismatch": "the run is not the task's current run",
    "lease_expired": "the run's lease has lapsed",
    "cancelled": "the task was cancelled; its run is over",
    "invalid_transition": "the task's status does not allow this",
    "already_claimed": "another run holds the task",
    "idempotency_conflict": "the Idempotency-Key was used with another body",
    "payload_too_large": "a body, field or batch is over its limit",
    "unsupported_media_type": "the body is not JSON",
    "unprocessable": "the body is JSON but not what the route takes",
    "upgrade_required": "the route speaks WebSocket",
    "headers_too_large": "the request head is over its limit",
    "http_version_not_supported": "the request line names another HTTP than 1.0 or 1.1",
    "rate_limited": "too many connections or commands; slow down",
    "internal": "the server failed; nothing was changed",
    "not_ready": "the server cannot serve this now (store down, draining)",
    "overloaded": "too much work is queued; retry shortly",
}


class Refusal(Exception):
    """A refused request: a stable ``code`` (one of ``CODES``) and a ``message``; ``limit``
    names the configuration key when a configured limit was hit (counted by kind)."""

    def __init__(self, code: str, message: str, limit: str | None = None) -> None:
        if code not in CODES:
            raise ValueError(f"unknown refusal code {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message
        self.limit = limit


# RFC 6455 section 7.4.1 close codes, and ours in the 4000-4999 private range.
CLOSE_NORMAL: Final = 1000
CLOSE_GOING_AWAY: Final = 1001
CLOSE_PROTOCOL_ERROR: Final = 1002
CLOSE_UNSUPPORTED_DATA: Final = 1003
CLOSE_INVALID_PAYLOAD: Final = 1007
CLOSE_MESSAGE_TOO_BIG: Final = 1009
CLOSE_INTERNAL_ERROR: Final = 1011
CLOSE_PING_TIMEOUT: Final = 4000
CLOSE_TOKEN_EXPIRED: Final = 4001
CLOSE_SLOW_CONSUMER: Final = 4008

# The reason travels in a CLOSE frame: 125 bytes of payload less the 2-byte code.
MAX_REASON_BYTES: Final = 123


class Disconnect(NamedTuple):
    """Why the server ends a WebSocket session: the close code and its reason."""

    code: int
    reason: str

    @property
    def reason_bytes(self) -> bytes:
        """The reason as it fits in a CLOSE frame."""
        return self.reason.encode()[:MAX_REASON_BYTES]


GOING_AWAY: Final = Disconnect(CLOSE_GOING_AWAY, "server stopping; reconnect and resume")
PING_TIMEOUT: Final = Disconnect(CLOSE_PING_TIMEOUT, "no answer to ping")
TOKEN_EXPIRED: Final = Disconnect(CLOSE_TOKEN_EXPIRED, "token expired; reconnect with a new token")
SLOW_CONSUMER: Final = Disconnect(CLOSE_SLOW_CONSUMER, "slow consumer; reconnect and resume")
# A replay could not be finished (the store failed, or retention trimmed what was left).
REPLAY_FAILED: Final = Disconnect(
    CLOSE_INTERNAL_ERROR, "the replay could not be read; reconnect and resume"
)
# The peer's own CLOSE without a code is answered with 1000 (RFC 6455 section 7.1.5).
PEER_GONE: Final = Disconnect(CLOSE_NORMAL, "")


def protocol_error(reason: str) -> Disconnect:
    """1002: the peer broke RFC 6455."""
    return Disconnect(CLOSE_PROTOCOL_ERROR, reason)


def binary_message() -> Disconnect:
    """1003: binary messages carry no command."""
    return Disconnect(CLOSE_UNSUPPORTED_DATA, "binary messages are not accepted; send JSON text")


def invalid_utf8() -> Disconnect:
    """1007: a text message that is not UTF-8."""
    return Disconnect(CLOSE_INVALID_PAYLOAD, "text message is not valid UTF-8")


def message_too_big(size: int, limit: int) -> Disconnect:
    """1009: a message over ``ws.max_message_bytes``."""
    return Disconnect(
        CLOSE_MESSAGE_TOO_BIG, f"message of {size} bytes exceeds {limit} (ws.max_message_bytes)"
    )


def echo_close(code: int) -> Disconnect:
    """The answer to a peer's CLOSE: its own code back (RFC 6455 section 5.5.1)."""
    return Disconnect(code, "")


def valid_close_code(code: int) -> bool:
    """Whether a peer may send this close code (RFC 6455 section 7.4)."""
    if 1000 <= code <= 1003 or 1007 <= code <= 1014:
        return True
    return 3000 <= code <= 4999
