"""Micro-benchmarks for ``etherd.core.auth.Authenticator``: JWT verification, cached and not.

Every HTTP request and every WebSocket upgrade verifies a token. The authenticator keeps
the tokens it verified (``TOKEN_CACHE_SIZE``), so a client that sends the same token again
pays a dictionary lookup instead of the signature check. "nocache" measures a token seen
for the first time: the cache is emptied before every round (``reload``, untimed), so the
round pays the header parse, the signature check, the claim checks and the cache insert.

    python -m pytest bench/micro --benchmark-only -q -p no:cacheprovider
"""

from __future__ import annotations

from dataclasses import dataclass

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pytest_benchmark.fixture import BenchmarkFixture

from etherd.core.auth import DEV_TOKEN, Authenticator, Role
from etherd.core.config import AuthConfig

NOW = 1_800_000_000.0
SECRET = "bench-secret-0123456789abcdef0123456789abcdef"
CLAIMS = {"sub": "alice", "role": "user", "iat": int(NOW) - 10, "exp": int(NOW) + 3600}
# A round without the cache costs tens of microseconds; this many keep the run short.
NOCACHE_ROUNDS = 2_000


@dataclass(frozen=True)
class Setup:
    config: AuthConfig
    tokens: dict[str, str]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    d = tmp_path_factory.mktemp("bench-keys")
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    public = []
    for name, key in (("rsa.pub", rsa_key), ("ec.pub", ec_key)):
        path = d / name
        path.write_bytes(
            key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        public.append(str(path))
    tokens = {
        "HS256": jwt.encode(CLAIMS, SECRET, algorithm="HS256"),
        "RS256": jwt.encode(CLAIMS, rsa_key, algorithm="RS256"),
        "ES256": jwt.encode(CLAIMS, ec_key, algorithm="ES256"),
    }
    return Setup(AuthConfig(secret=SECRET, public_keys=public), tokens)


def authenticator(config: AuthConfig) -> Authenticator:
    return Authenticator(config, dev=False, now=lambda: NOW)


ALGS = pytest.mark.parametrize("alg", ["HS256", "RS256", "ES256"])


@ALGS
def test_verify_cached(benchmark: BenchmarkFixture, setup: Setup, alg: str) -> None:
    """The same token again: answered from the verified-token cache."""
    auth = authenticator(setup.config)
    token = setup.tokens[alg]
    auth.verify(token)
    principal = benchmark(auth.verify, token)
    assert principal.sub == "alice" and principal.role is Role.USER


@ALGS
def test_verify_nocache(benchmark: BenchmarkFixture, setup: Setup, alg: str) -> None:
    """A token not seen before: the full check (the cache is emptied, untimed, each round)."""
    auth = authenticator(setup.config)
    token = setup.tokens[alg]

    def forget() -> None:
        auth.reload(setup.config, dev=False)

    principal = benchmark.pedantic(  # type: ignore[no-untyped-call]
        auth.verify, args=(token,), setup=forget, rounds=NOCACHE_ROUNDS, warmup_rounds=20
    )
    assert principal.sub == "alice"


def test_bearer_cached(benchmark: BenchmarkFixture, setup: Setup) -> None:
    """An ``Authorization: Bearer`` header value, token cached: what most HTTP calls pay."""
    auth = authenticator(setup.config)
    header = "Bearer " + setup.tokens["HS256"]
    auth.bearer(header)
    assert benchmark(auth.bearer, header).sub == "alice"


def test_verify_dev_token(benchmark: BenchmarkFixture) -> None:
    """Development mode's ``test`` token (never cached; no cryptography)."""
    auth = Authenticator(AuthConfig(), dev=True, now=lambda: NOW)
    assert benchmark(auth.verify, DEV_TOKEN).dev
