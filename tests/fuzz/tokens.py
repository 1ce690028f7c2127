"""Fuzz token verification: ``etherd.core.jws.parse`` and ``Authenticator.verify``.

The Authenticator is built as the server builds it (``Services``): from an ``[auth]``
section with an HS256 ``secret``, here with an ES256 public key as well, and a fixed clock.
The first input byte picks a mode for the rest:

0. the rest is a token (read as Latin-1, as a header value is, and as UTF-8 with lone
   surrogates, as a query parameter may be): ``jws.parse`` raises only ``JwsError``,
   ``verify`` only ``AuthError``;
1. the rest is a JSON header, signed with the secret over good claims;
2. the rest is a claims payload under an HS256 header, signed with the secret;
3. the rest says where and how to change one character of a good token, which must then
   not verify.

Modes 1 and 2 reach what a forged signature never does: the header and claim checks.
"""

from __future__ import annotations

import base64
import contextlib

import atheris

from tests.fuzz._run import main

with atheris.instrument_imports(include=["etherd"]):
    import msgspec

    from etherd.core import jws
    from etherd.core.auth import Authenticator, AuthError, Principal, Role
    from etherd.core.config import AuthConfig

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

NOW = 1_750_000_000.0
SECRET = b"fuzz-secret-that-is-long-enough-for-hs256"
_KEY = ec.generate_private_key(ec.SECP256R1())
_PEM = _KEY.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
)
AUTH = Authenticator(
    AuthConfig(secret=SECRET.decode(), public_keys=["es256.pem"], audience="etherd"),
    dev=False,
    key_files={"es256.pem": _PEM},
    now=lambda: NOW,
)
GOOD = AUTH.issue("user-1", Role.SERVICE, 3600, ["tasks/*", "activity/>"])
GOOD_CLAIMS = msgspec.json.encode(
    {"sub": "fuzz", "role": "user", "exp": int(NOW) + 60, "aud": "etherd"}
)
_B64 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def sign(header: bytes, payload: bytes) -> str:
    """A compact token of raw header and payload bytes, HS256-signed with ``SECRET``."""
    signing_input = f"{_b64(header)}.{_b64(payload)}"
    return f"{signing_input}.{_b64(jws.hs256(signing_input.encode('ascii'), SECRET))}"


def _verify(token: str) -> Principal | None:
    """``verify``, with ``AuthError`` (the documented refusal) turned into None."""
    try:
        principal = AUTH.verify(token)
    except AuthError as exc:
        assert exc.message and exc.code == "unauthorized"
        return None
    assert principal.sub
    return principal


def _mutate(data: bytes) -> None:
    if len(data) < 2:
        return
    position = int.from_bytes(data[:2], "big") % len(GOOD)
    choice = data[2] if len(data) > 2 else 0
    # Mostly another base64url character (the interesting case), sometimes any byte.
    char = chr(_B64[choice % 64]) if choice < 192 else chr(choice)
    token = GOOD[:position] + char + GOOD[position + 1 :]
    if token != GOOD:
        assert _verify(token) is None, f"a changed token verified: {token!r}"


def test_one_input(data: bytes) -> None:
    """Run one input in the mode its first byte picks."""
    if not data:
        return
    mode, rest = data[0] % 4, data[1:]
    if mode == 0:
        for token in (rest.decode("latin-1"), rest.decode("utf-8", "surrogateescape")):
            with contextlib.suppress(jws.JwsError):
                jws.parse(token)
            _verify(token)
    elif mode == 1:
        _verify(sign(rest, GOOD_CLAIMS))
    elif mode == 2:
        _verify(sign(b'{"alg":"HS256","typ":"JWT"}', rest))
    else:
        _mutate(rest)


assert _verify(GOOD) is not None, "the known-good token must verify"

if __name__ == "__main__":
    main(test_one_input)
