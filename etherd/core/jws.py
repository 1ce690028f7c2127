"""Compact JWS (RFC 7515) on the standard library: splitting a token, HS256.

Every etherd process verifies tokens, most of them HS256; a JWT library pulls in OpenSSL
bindings that cost each process about 16 MB of memory. So the compact form and HMAC-SHA256
live here, and the asymmetric algorithms (``core.pubkeys``, on ``cryptography``) are
imported only by a server configured with public or private keys.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from collections.abc import Callable
from typing import Any, Final, NamedTuple

import msgspec

__all__ = ["Compact", "JwsError", "encode", "hs256", "looks_like_a_key", "parse", "verify_hs256"]

_B64URL: Final = re.compile(r"[A-Za-z0-9_-]*")
_SSH_PREFIXES: Final = (b"ssh-", b"ecdsa-sha2-", b"sk-ssh-", b"sk-ecdsa-")


class JwsError(ValueError):
    """A token that is not a compact JWS; the message says what is wrong."""


class Compact(NamedTuple):
    """A token split into its parts, nothing verified yet."""

    header: dict[str, Any]
    payload: bytes
    # ``base64url(header) "." base64url(payload)``: what the signature covers.
    signing_input: bytes
    signature: bytes


def _b64decode(part: str, what: str) -> bytes:
    if not _B64URL.fullmatch(part) or len(part) % 4 == 1:
        raise JwsError(f"the {what} is not base64url")
    try:
        raw = base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
    except (binascii.Error, ValueError):
        raise JwsError(f"the {what} is not base64url") from None
    # The last character may carry bits the decoder drops: without this check several
    # spellings of one signature would all verify (RFC 4648 section 3.5).
    if _b64encode(raw) != part.encode("ascii"):
        raise JwsError(f"the {what} is not canonical base64url (stray bits at its end)")
    return raw


def _b64encode(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def parse(token: str) -> Compact:
    """Split ``header.payload.signature`` and decode the header.

    Raises:
        JwsError: not three base64url parts, a header that is not a JSON object, or a
            header with ``crit`` extensions (which etherd does not implement, so RFC 7515
            section 4.1.11 says to refuse).
    """
    parts = token.split(".")
    if len(parts) != 3:
        raise JwsError(f"{len(parts)} parts where a JWT has 3")
    head_b64, payload_b64, signature_b64 = parts
    try:
        header = msgspec.json.decode(_b64decode(head_b64, "header"))
    except (msgspec.DecodeError, UnicodeDecodeError):
        # msgspec reports a string that is not UTF-8 as UnicodeDecodeError, not DecodeError.
        raise JwsError("the header is not JSON") from None
    if not isinstance(header, dict):
        raise JwsError("the header is not a JSON object")
    if "crit" in header:
        raise JwsError("the header lists critical extensions (crit), which are not supported")
    return Compact(
        header,
        _b64decode(payload_b64, "payload"),
        f"{head_b64}.{payload_b64}".encode("ascii"),
        _b64decode(signature_b64, "signature"),
    )


def hs256(signing_input: bytes, key: bytes) -> bytes:
    """The HMAC-SHA256 signature of a signing input."""
    return hmac.new(key, signing_input, hashlib.sha256).digest()


def verify_hs256(token: Compact, key: bytes) -> bool:
    """Whether the token's signature is HMAC-SHA256 under ``key`` (constant time)."""
    return hmac.compare_digest(hs256(token.signing_input, key), token.signature)


def encode(alg: str, payload: bytes, sign: Callable[[bytes], bytes]) -> str:
    """A compact token of ``payload`` (JSON bytes); ``sign(signing_input) -> signature``."""
    header = _b64encode(msgspec.json.encode({"alg": alg, "typ": "JWT"}))
    signing_input = header + b"." + _b64encode(payload)
    return (signing_input + b"." + _b64encode(sign(signing_input))).decode("ascii")


def looks_like_a_key(secret: bytes) -> bool:
    """Whether an HMAC secret is really a PEM, SSH or JWK key.

    An HS256 secret that is the server's public key lets anyone who has that key sign
    tokens (the algorithm-confusion attack), so such a secret is refused at load time.
    """
    stripped = secret.strip()
    return (
        b"-----BEGIN " in secret
        or stripped.startswith(_SSH_PREFIXES)
        or stripped.startswith((b"{", b"["))
    )
