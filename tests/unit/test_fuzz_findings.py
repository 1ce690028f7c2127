"""Inputs the fuzz targets of tests/fuzz found mishandled, each kept as a regression test.

Bad input must get its documented error (``JwsError``/``AuthError`` for tokens, a JSON
refusal with a proper status line for HTTP), never another exception or a 500.
"""

from __future__ import annotations

import base64

import pytest

from etherd.core import jws
from etherd.core.auth import Authenticator, AuthError, Role
from etherd.core.config import AuthConfig
from etherd.core.errors import Refusal
from etherd.edge.http.response import STATUS, error_response, render

SECRET = b"fuzz-finding-secret-long-enough-for-hs256"
NOW = 1_750_000_000.0
_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def _auth() -> Authenticator:
    return Authenticator(AuthConfig(secret=SECRET.decode()), dev=False, now=lambda: NOW)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _signed(header: bytes, payload: bytes) -> str:
    signing_input = f"{_b64(header)}.{_b64(payload)}"
    return f"{signing_input}.{_b64(jws.hs256(signing_input.encode('ascii'), SECRET))}"


# The fuzzer's input: a header whose bytes are not UTF-8 (0xb8 inside a JSON string).
NOT_UTF8_HEADER = b'{"alg\xb8:"HS256","crit":["exp"]}'
CLAIMS = b'{"sub":"u","exp":1750003600}'


def test_a_header_that_is_not_utf8_is_a_jws_error() -> None:
    # msgspec raised UnicodeDecodeError, which nothing caught: a 500 instead of a 401.
    with pytest.raises(jws.JwsError, match="the header is not JSON"):
        jws.parse(_signed(NOT_UTF8_HEADER, CLAIMS))


def test_a_header_that_is_not_utf8_is_refused_with_401() -> None:
    with pytest.raises(AuthError, match="malformed token") as caught:
        _auth().verify(_signed(NOT_UTF8_HEADER, CLAIMS))
    assert caught.value.code == "unauthorized"


def test_signed_claims_that_are_not_utf8_are_refused_with_401() -> None:
    token = _signed(b'{"alg":"HS256"}', b'{"sub":"\xff","exp":1750003600}')
    with pytest.raises(AuthError, match="payload is not valid JSON"):
        _auth().verify(token)


def _respelled(token: str) -> str:
    """The token with the last signature character's stray (unused) low bit flipped."""
    last = token[-1]
    return token[:-1] + _ALPHABET[_ALPHABET.index(last) ^ 1]


def test_a_signature_spelled_another_way_does_not_verify() -> None:
    # 32 signature bytes take 43 base64url characters, whose last two bits carry nothing:
    # the decoder dropped them, so four spellings of each token all verified.
    auth = _auth()
    good = auth.issue("user-1", Role.SERVICE, 3600, ["tasks/*"])
    assert auth.verify(good).sub == "user-1"
    other = _respelled(good)
    assert other != good
    assert base64.urlsafe_b64decode(other.rsplit(".", 1)[1] + "=") == base64.urlsafe_b64decode(
        good.rsplit(".", 1)[1] + "="
    )
    with pytest.raises(jws.JwsError, match="not canonical base64url"):
        jws.parse(other)
    with pytest.raises(AuthError, match="malformed token"):
        auth.verify(other)


def test_canonical_parts_still_parse() -> None:
    # Every length of part: 0, 2 and 3 characters past a multiple of 4.
    for size in range(8):
        data = bytes(range(size))
        assert jws._b64decode(_b64(data), "payload") == data


def test_every_refusal_status_has_its_reason_phrase() -> None:
    # A request line naming HTTP/2.0 was answered "HTTP/1.1 505 Unknown".
    head = render(error_response(Refusal("http_version_not_supported", "no")), keep_alive=False)
    assert head.startswith(b"HTTP/1.1 505 HTTP Version Not Supported\r\n")
    for code, status in STATUS.items():
        line = render(error_response(Refusal(code, "x")), False).split(b"\r\n", 1)[0]
        assert not line.endswith(b" Unknown"), (code, status, line)
