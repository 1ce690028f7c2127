"""Authentication (contract section 2) and topic authorisation (section 3)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import msgspec
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from etherd.core.auth import (
    DEV_SUBJECT,
    DEV_TOKEN,
    Authenticator,
    AuthError,
    Principal,
    Role,
    TaskFacts,
    check_harness_app,
    may_publish,
    may_subscribe,
    task_id_of,
)
from etherd.core.config import AuthConfig, ConfigError
from etherd.core.errors import Refusal
from etherd.core.topics import TopicError
from etherd.edge.http.response import STATUS
from etherd.edge.ops.keyfiles import read_key_files

NOW = 1_800_000_000.0  # 2027-01-15T08:00:00Z
SECRET = "unit-test-secret-0123456789abcdef0123456789"


def clock() -> float:
    return NOW


# --- keys ---------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyFiles:
    rsa_private: Path
    rsa_public: Path
    rsa_private_pem: bytes
    rsa_public_pem: bytes
    rsa_other_private_pem: bytes
    ec_private: Path
    ec_public: Path
    ec_private_pem: bytes
    rsa_cert: Path
    ec_p384_public: Path
    ed25519_public: Path
    rsa_1024_public: Path
    encrypted_private: Path
    garbage: Path


def _private_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _public_pem(key: Any) -> bytes:
    pem: bytes = key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> KeyFiles:
    d = tmp_path_factory.mktemp("keys")
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rsa_other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    p384 = ec.generate_private_key(ec.SECP384R1())
    ed = ed25519.Ed25519PrivateKey.generate()
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "etherd-test")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(rsa_key.public_key())
        .serial_number(1)
        .not_valid_before(datetime(2020, 1, 1, tzinfo=UTC))
        .not_valid_after(datetime(2040, 1, 1, tzinfo=UTC))
        .sign(rsa_key, hashes.SHA256())
    )

    def write(name: str, data: bytes) -> Path:
        path = d / name
        path.write_bytes(data)
        return path

    return KeyFiles(
        rsa_private=write("rsa.key", _private_pem(rsa_key)),
        rsa_public=write("rsa.pub", _public_pem(rsa_key.public_key())),
        rsa_private_pem=_private_pem(rsa_key),
        rsa_public_pem=_public_pem(rsa_key.public_key()),
        rsa_other_private_pem=_private_pem(rsa_other),
        ec_private=write("ec.key", _private_pem(ec_key)),
        ec_public=write("ec.pub", _public_pem(ec_key.public_key())),
        ec_private_pem=_private_pem(ec_key),
        rsa_cert=write("rsa.crt", cert.public_bytes(serialization.Encoding.PEM)),
        ec_p384_public=write("p384.pub", _public_pem(p384.public_key())),
        ed25519_public=write("ed.pub", _public_pem(ed.public_key())),
        rsa_1024_public=write("small.pub", _public_pem(small.public_key())),
        encrypted_private=write(
            "enc.key",
            ec_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"pw"),
            ),
        ),
        garbage=write("garbage.pem", b"this is not a key\n"),
    )


# --- helpers ------------------------------------------------------------------------


def auth(*, dev: bool = False, **kwargs: Any) -> Authenticator:
    config = AuthConfig(**kwargs)
    return Authenticator(config, dev=dev, key_files=read_key_files(config), now=clock)


def claims(**extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"sub": "u1", "exp": NOW + 600}
    base.update(extra)
    return {k: v for k, v in base.items() if v is not None}


def hs(payload: dict[str, Any], secret: str = SECRET) -> str:
    return jwt.encode(payload, secret, algorithm="HS256")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def raw_token(header: dict[str, Any], payload: object, key: bytes | None) -> str:
    """A JWT built by hand, HMAC-SHA256 signed with ``key`` (or unsigned)."""
    signing_input = _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(payload).encode())
    sig = b"" if key is None else hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + _b64(sig)


def refused(authenticator: Authenticator, token: str) -> str:
    with pytest.raises(AuthError) as info:
        authenticator.verify(token)
    assert info.value.code == "unauthorized"
    assert token not in info.value.message
    return info.value.message


# --- HS256 --------------------------------------------------------------------------


def test_hs256_valid_token() -> None:
    p = auth(secret=SECRET).verify(hs(claims(role="harness", topics=["tasks/>", "harness"])))
    assert p == Principal(
        sub="u1", role=Role.HARNESS, topics=("tasks/>", "harness"), exp=NOW + 600, dev=False
    )
    assert p.role is Role.HARNESS and not p.is_admin


def test_role_defaults_to_user_and_topics_to_none() -> None:
    p = auth(secret=SECRET).verify(hs(claims()))
    assert p.role is Role.USER
    assert p.topics is None


@pytest.mark.parametrize("role", list(Role))
def test_every_role_is_accepted(role: Role) -> None:
    assert auth(secret=SECRET).verify(hs(claims(role=role.value))).role is role


def test_expired_token() -> None:
    a = auth(secret=SECRET, leeway_s=30)
    message = refused(a, hs(claims(exp=NOW - 31)))
    expected = (datetime.fromtimestamp(NOW - 31, UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert message.startswith(f"token expired at {expected}")
    # inside the leeway it still passes
    assert a.verify(hs(claims(exp=NOW - 29))).exp == NOW - 29


def test_expiry_exactly_at_now_without_leeway_is_refused() -> None:
    assert "expired" in refused(auth(secret=SECRET, leeway_s=0), hs(claims(exp=NOW)))


def test_not_yet_valid_token() -> None:
    a = auth(secret=SECRET, leeway_s=30)
    message = refused(a, hs(claims(nbf=NOW + 120)))
    assert message.startswith("token is not valid before 2027-01-15T08:02:00Z")
    assert a.verify(hs(claims(nbf=NOW + 20))).sub == "u1"


def test_issued_in_the_future_is_refused() -> None:
    assert "issued in the future" in refused(auth(secret=SECRET), hs(claims(iat=NOW + 3600)))


@pytest.mark.parametrize("value", ["soon", True, [1]])
def test_time_claims_must_be_numbers(value: object) -> None:
    message = refused(auth(secret=SECRET), hs(claims(exp=value)))
    assert message.startswith("exp claim must be a number")


def test_wrong_secret() -> None:
    message = refused(auth(secret=SECRET), hs(claims(), secret="another-secret-" + "x" * 32))
    assert message == "signature does not verify against the configured auth.secret"


def test_tampered_payload() -> None:
    token = hs(claims())
    head, _, sig = token.split(".")
    forged = head + "." + _b64(json.dumps(claims(role="admin")).encode()) + "." + sig
    assert "signature does not verify" in refused(auth(secret=SECRET), forged)


def test_missing_exp_when_required() -> None:
    message = refused(auth(secret=SECRET), hs(claims(exp=None)))
    assert message == "token has no exp claim; this server requires tokens that expire"


def test_missing_exp_allowed_when_not_required() -> None:
    p = auth(secret=SECRET, require_exp=False).verify(hs(claims(exp=None)))
    assert p.exp is None


@pytest.mark.parametrize(
    ("sub", "expected"),
    [
        (None, "token has no sub claim"),
        ("", "sub claim must be a non-empty string"),
        (42, "sub claim must be a non-empty string"),
    ],
)
def test_sub_is_required(sub: object, expected: str) -> None:
    payload = claims()
    payload.pop("sub")
    if sub is not None:
        payload["sub"] = sub
    assert refused(auth(secret=SECRET), hs(payload)).startswith(expected)


def test_unknown_role() -> None:
    message = refused(auth(secret=SECRET), hs(claims(role="x")))
    assert message == "unknown role 'x'; expected one of user, harness, service, admin"


def test_role_must_be_a_string() -> None:
    assert refused(auth(secret=SECRET), hs(claims(role=["admin"]))).startswith(
        "role claim must be a string"
    )


@pytest.mark.parametrize(
    ("topics", "expected"),
    [
        ("tasks/>", "topics claim must be a list"),
        (["tasks/a", 3], "topics claim entry 1 must be a string"),
        (["tasks/a", "a/>/b"], "topics claim entry 1 'a/>/b' is not a valid topic pattern"),
        ([""], "topics claim entry 0 '' is not a valid topic pattern"),
        (["bad topic"], "topics claim entry 0 'bad topic' is not a valid topic pattern"),
    ],
)
def test_bad_topics_claim(topics: object, expected: str) -> None:
    assert refused(auth(secret=SECRET), hs(claims(topics=topics))).startswith(expected)


def test_empty_topics_claim_is_kept() -> None:
    assert auth(secret=SECRET).verify(hs(claims(topics=[]))).topics == ()


def test_issuer() -> None:
    a = auth(secret=SECRET, issuer="https://id.example")
    assert a.verify(hs(claims(iss="https://id.example"))).sub == "u1"
    assert refused(a, hs(claims())) == "token has no iss claim; expected 'https://id.example'"
    assert refused(a, hs(claims(iss="evil"))) == (
        "token issuer 'evil' is not accepted; expected 'https://id.example'"
    )


def test_audience() -> None:
    a = auth(secret=SECRET, audience="etherd")
    assert a.verify(hs(claims(aud="etherd"))).sub == "u1"
    assert a.verify(hs(claims(aud=["other", "etherd"]))).sub == "u1"
    assert refused(a, hs(claims())) == "token has no aud claim; expected 'etherd'"
    assert refused(a, hs(claims(aud="other"))) == (
        "token audience 'other' does not include 'etherd'"
    )
    assert refused(a, hs(claims(aud=7))) == "aud claim must be a string or a list of strings"


def test_audience_in_token_but_not_configured_is_refused() -> None:
    message = refused(auth(secret=SECRET), hs(claims(aud="someone-else")))
    assert "this server has no auth.audience" in message


# --- malformed tokens and algorithms -------------------------------------------------


@pytest.mark.parametrize("token", ["abc", "a.b.c", "a.b", "...", "eyJ.eyJ.x"])
def test_malformed_tokens(token: str) -> None:
    assert "malformed token" in refused(auth(secret=SECRET), token)


def test_payload_must_be_a_json_object() -> None:
    token = raw_token({"alg": "HS256", "typ": "JWT"}, ["sub", "u1"], SECRET.encode())
    assert refused(auth(secret=SECRET), token) == ("token payload is not a JSON object of claims")


def test_oversized_token() -> None:
    assert "at most" in refused(auth(secret=SECRET), "x" * 20_000)


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
def test_alg_none_is_refused(alg: str) -> None:
    token = raw_token({"alg": alg, "typ": "JWT"}, claims(role="admin"), None)
    message = refused(auth(secret=SECRET, dev=True), token)
    assert message == "unsigned tokens (alg 'none') are never accepted"


def test_pyjwt_none_token_is_refused() -> None:
    token = jwt.encode(claims(role="admin"), "", algorithm="none")
    assert "alg 'none'" in refused(auth(secret=SECRET), token)


def test_hs256_signed_with_public_key_pem_is_refused(keys: KeyFiles) -> None:
    """The classic algorithm confusion: HMAC keyed with the server's RSA public key."""
    token = raw_token({"alg": "HS256", "typ": "JWT"}, claims(role="admin"), keys.rsa_public_pem)
    only_keys = auth(public_keys=[str(keys.rsa_public)])
    assert refused(only_keys, token).startswith(
        "HS256 tokens are not accepted: this server has no auth.secret; this server accepts RS256"
    )
    both = auth(secret=SECRET, public_keys=[str(keys.rsa_public)])
    assert "signature does not verify" in refused(both, token)


def test_unsupported_algorithm() -> None:
    token = jwt.encode(claims(), SECRET + "-longer-for-hs512-" + "y" * 40, algorithm="HS512")
    message = refused(auth(secret=SECRET), token)
    assert message.startswith("unsupported token algorithm 'HS512'; expected one of")


def test_missing_alg_header() -> None:
    token = raw_token({"typ": "JWT"}, claims(), SECRET.encode())
    assert "unsupported token algorithm None" in refused(auth(secret=SECRET), token)


def test_no_keys_at_all_says_so() -> None:
    message = refused(auth(), hs(claims()))
    assert "no auth.secret or auth.public_keys are configured" in message


# --- RS256 / ES256 -------------------------------------------------------------------


def test_rs256_valid(keys: KeyFiles) -> None:
    token = jwt.encode(claims(role="service"), keys.rsa_private_pem, algorithm="RS256")
    p = auth(public_keys=[str(keys.rsa_public)]).verify(token)
    assert (p.sub, p.role) == ("u1", Role.SERVICE)


def test_es256_valid(keys: KeyFiles) -> None:
    token = jwt.encode(claims(role="admin"), keys.ec_private_pem, algorithm="ES256")
    p = auth(public_keys=[str(keys.rsa_public), str(keys.ec_public)]).verify(token)
    assert p.role is Role.ADMIN


def test_certificate_as_public_key(keys: KeyFiles) -> None:
    token = jwt.encode(claims(), keys.rsa_private_pem, algorithm="RS256")
    assert auth(public_keys=[str(keys.rsa_cert)]).verify(token).sub == "u1"


def test_each_configured_key_is_tried(keys: KeyFiles, tmp_path: Path) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    other_pub = tmp_path / "other.pub"
    other_pub.write_bytes(_public_pem(other.public_key()))
    a = auth(public_keys=[str(other_pub), str(keys.rsa_public)])
    token = jwt.encode(claims(), keys.rsa_private_pem, algorithm="RS256")
    assert a.verify(token).sub == "u1"


def test_rs256_wrong_key(keys: KeyFiles) -> None:
    token = jwt.encode(claims(), keys.rsa_other_private_pem, algorithm="RS256")
    message = refused(auth(public_keys=[str(keys.rsa_public)]), token)
    assert message == "signature does not verify against the configured RS256 public key"


def test_algorithm_is_bound_to_key_type(keys: KeyFiles) -> None:
    rs = jwt.encode(claims(), keys.rsa_private_pem, algorithm="RS256")
    message = refused(auth(public_keys=[str(keys.ec_public)]), rs)
    assert message.startswith("RS256 tokens are not accepted: no RS256 public key is configured")
    es = jwt.encode(claims(), keys.ec_private_pem, algorithm="ES256")
    assert "no ES256 public key" in refused(auth(public_keys=[str(keys.rsa_public)]), es)


def test_claims_checked_for_asymmetric_tokens(keys: KeyFiles) -> None:
    a = auth(public_keys=[str(keys.ec_public)])
    token = jwt.encode(claims(exp=NOW - 3600), keys.ec_private_pem, algorithm="ES256")
    assert refused(a, token).startswith("token expired at")


# --- configuration errors ------------------------------------------------------------


@pytest.mark.parametrize(
    ("attr", "expected"),
    [
        ("garbage", "is not a PEM public key or certificate"),
        ("rsa_private", "holds a private key; give the public key instead"),
        ("ed25519_public", "only RSA (RS256) and P-256 EC (ES256) keys are supported"),
        ("ec_p384_public", "ES256 needs P-256"),
        ("rsa_1024_public", "the RSA key is 1024 bits; RS256 needs at least 2048"),
    ],
)
def test_bad_public_key_files(keys: KeyFiles, attr: str, expected: str) -> None:
    path = str(getattr(keys, attr))
    with pytest.raises(ConfigError, match=r"^auth\.public_keys\[0\]") as info:
        auth(public_keys=[path])
    assert expected in str(info.value)


def test_unreadable_public_key_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(ConfigError, match="cannot read") as info:
        auth(public_keys=[str(missing)])
    assert str(missing) in str(info.value)


def test_bad_private_key_files(keys: KeyFiles) -> None:
    with pytest.raises(ConfigError, match="is encrypted"):
        auth(private_key=str(keys.encrypted_private))
    with pytest.raises(ConfigError, match="is not a PEM private key"):
        auth(private_key=str(keys.garbage))


def test_secret_that_is_a_pem_key(keys: KeyFiles) -> None:
    with pytest.raises(ConfigError, match=r"auth\.secret looks like a PEM"):
        auth(secret=keys.rsa_public_pem.decode())


def test_short_secret_is_refused_with_the_reason() -> None:
    with pytest.raises(ConfigError, match=r"auth\.secret is 5 bytes; HS256 needs at least 32"):
        auth(secret="short")
    exactly = "x" * 32
    a = auth(secret=exactly, require_exp=False)
    # pytest turns warnings into errors: PyJWT's per-token key length warning is off.
    assert a.verify(a.issue("u1", Role.USER, 60, None)).sub == "u1"
    assert a.notes == ()


# --- the development key ------------------------------------------------------------

DEV_KEY = b"d" * 64


def dev_auth(dev: bool, **kwargs: Any) -> Authenticator:
    config = AuthConfig(**kwargs)
    return Authenticator(config, dev=dev, dev_secret=DEV_KEY, now=clock)


@pytest.mark.parametrize("role", list(Role))
def test_the_development_key_signs_and_verifies_every_role(role: Role) -> None:
    a = dev_auth(True)
    token = a.issue("h1", role, 60, None)
    principal = a.verify(token)
    assert (principal.sub, principal.role) == ("h1", role)
    assert a.verify("test").role is Role.ADMIN  # the token ``test`` keeps working


def test_the_development_key_is_valid_only_in_development_mode() -> None:
    token = dev_auth(True).issue("h1", Role.HARNESS, 60, None)
    off = dev_auth(False)
    assert "no auth.secret" in refused(off, token)
    with pytest.raises(ConfigError, match="cannot sign tokens"):
        off.issue("h1", Role.HARNESS, 60, None)
    # With a configured secret as well, that secret signs and both verify.
    both = dev_auth(True, secret=SECRET)
    assert both.verify(token).sub == "h1"
    assert both.verify(hs(claims())).sub == "u1"
    assert dev_auth(True, secret=SECRET).issue("u", Role.USER, 60, None) == jwt.encode(
        {"sub": "u", "role": "user", "iat": int(NOW), "exp": int(NOW) + 60}, SECRET, "HS256"
    )
    assert "against the configured auth.secret or the development key" in refused(
        both, hs(claims(), secret="another-secret-" + "x" * 32)
    )
    # Once development mode goes off (a reload), its tokens stop verifying.
    both.reload(AuthConfig(secret=SECRET), dev=False, dev_secret=DEV_KEY)
    assert "against the configured auth.secret" in refused(both, token)


def test_a_short_development_key_is_refused() -> None:
    with pytest.raises(ConfigError, match="development key is 5 bytes"):
        Authenticator(AuthConfig(), dev=True, dev_secret=b"short")


# --- development mode ----------------------------------------------------------------


def test_dev_token_in_dev_mode() -> None:
    p = auth(dev=True).verify(DEV_TOKEN)
    assert p == Principal(sub=DEV_SUBJECT, role=Role.ADMIN, dev=True)
    assert p.is_admin and p.exp is None and p.topics is None


def test_dev_token_refused_when_dev_mode_off() -> None:
    with pytest.raises(AuthError, match="development mode is off"):
        auth(secret=SECRET).verify("test")


def test_dev_mode_still_verifies_real_tokens() -> None:
    a = auth(secret=SECRET, dev=True)
    assert a.dev
    assert a.verify(hs(claims())).sub == "u1"
    assert a.bearer("Bearer test").dev


# --- bearer --------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "BeArEr"])
def test_bearer_scheme_is_case_insensitive(scheme: str) -> None:
    token = hs(claims())
    assert auth(secret=SECRET).bearer(f"{scheme} {token}").sub == "u1"
    assert auth(secret=SECRET).bearer(f"  {scheme}   {token}  ").sub == "u1"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, "missing Authorization header; expected 'Bearer <token>'"),
        ("", "missing Authorization header; expected 'Bearer <token>'"),
        ("   ", "missing Authorization header; expected 'Bearer <token>'"),
        ("Bearer", "Authorization header has no token after 'Bearer'"),
        ("Bearer   ", "Authorization header has no token after 'Bearer'"),
        ("Basic dXNlcjpwdw==", "Authorization header does not use the Bearer scheme"),
        ("Bearer a b", "Authorization header has text after the token"),
    ],
)
def test_bearer_malformed(value: str | None, expected: str) -> None:
    with pytest.raises(AuthError) as info:
        auth(secret=SECRET).bearer(value)
    assert info.value.message.startswith(expected)


def test_bearer_without_scheme_does_not_echo_the_token() -> None:
    token = hs(claims())
    with pytest.raises(AuthError) as info:
        auth(secret=SECRET).bearer(token)
    assert token not in info.value.message
    assert "Bearer scheme" in info.value.message


# --- issue ---------------------------------------------------------------------------


def test_issue_round_trip_hs256() -> None:
    a = auth(secret=SECRET, issuer="etherd-test", audience="hub")
    token = a.issue("alice", Role.HARNESS, 3600, ["tasks/>", "harness"])
    assert jwt.get_unverified_header(token)["alg"] == "HS256"
    p = a.verify(token)
    assert p == Principal(
        sub="alice", role=Role.HARNESS, topics=("tasks/>", "harness"), exp=NOW + 3600
    )


@pytest.mark.parametrize(
    ("private", "public", "alg"), [("rsa", "rsa", "RS256"), ("ec", "ec", "ES256")]
)
def test_issue_round_trip_private_key(keys: KeyFiles, private: str, public: str, alg: str) -> None:
    signer = auth(private_key=str(getattr(keys, f"{private}_private")))
    token = signer.issue("bob", Role.SERVICE, 60, None)
    assert jwt.get_unverified_header(token)["alg"] == alg
    verifier = auth(public_keys=[str(getattr(keys, f"{public}_public"))])
    p = verifier.verify(token)
    assert (p.sub, p.role, p.topics, p.exp) == ("bob", Role.SERVICE, None, NOW + 60)
    # Another JWT implementation accepts what etherd signs.
    public_pem = getattr(keys, f"{public}_public").read_bytes()
    claims_seen = jwt.decode(
        token, public_pem, algorithms=[alg], options={"verify_exp": False, "verify_iat": False}
    )
    assert claims_seen["sub"] == "bob"


def test_issue_round_trip_hs256_with_another_implementation() -> None:
    token = auth(secret=SECRET).issue("carol", Role.USER, 60, None)
    seen = jwt.decode(
        token, SECRET, algorithms=["HS256"], options={"verify_exp": False, "verify_iat": False}
    )
    assert seen["sub"] == "carol"


def test_a_server_without_key_files_does_not_load_cryptography() -> None:
    # cryptography costs every process about 16 MB; HS256 is verified without it.
    code = (
        "import sys; from etherd.core.auth import Authenticator; "
        "from etherd.core.config import AuthConfig; "
        f"a = Authenticator(AuthConfig(secret={SECRET!r}), dev=False); "
        "a.verify(a.issue('u', 'user', 60, None)); "
        "print(any(m.split('.')[0] in ('cryptography', 'jwt') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_issue_prefers_the_secret(keys: KeyFiles) -> None:
    a = auth(secret=SECRET, private_key=str(keys.ec_private))
    assert jwt.get_unverified_header(a.issue("u", Role.USER, 60, None))["alg"] == "HS256"


def test_issue_needs_a_key() -> None:
    with pytest.raises(ConfigError, match=r"set auth\.secret"):
        auth().issue("u", Role.USER, 60, None)


def test_issue_without_ttl() -> None:
    with pytest.raises(ValueError, match="require_exp"):
        auth(secret=SECRET).issue("u", Role.USER, None, None)
    a = auth(secret=SECRET, require_exp=False)
    token = a.issue("u", Role.USER, None, None)
    assert "exp" not in jwt.decode(token, options={"verify_signature": False})
    assert a.verify(token).exp is None


def test_issue_rejects_bad_input() -> None:
    a = auth(secret=SECRET)
    with pytest.raises(TopicError):
        a.issue("u", Role.USER, 60, ["a/>/b"])
    with pytest.raises(ValueError, match="positive"):
        a.issue("u", Role.USER, 0, None)
    with pytest.raises(ValueError, match="sub"):
        a.issue("", Role.USER, 60, None)


def test_issued_token_expires() -> None:
    issued = auth(secret=SECRET).issue("u", Role.USER, 60, None)
    later = Authenticator(AuthConfig(secret=SECRET, leeway_s=0), dev=False, now=lambda: NOW + 61)
    assert refused(later, issued).startswith("token expired at")


# --- reload --------------------------------------------------------------------------


def test_reload_swaps_keys(keys: KeyFiles) -> None:
    a = auth(secret=SECRET)
    old = hs(claims())
    new_secret = "rotated-secret-" + "z" * 40
    a.reload(AuthConfig(secret=new_secret), dev=True)
    assert a.dev
    assert "signature does not verify" in refused(a, old)
    assert a.verify(hs(claims(), secret=new_secret)).sub == "u1"
    with pytest.raises(ConfigError):
        garbage = AuthConfig(public_keys=[str(keys.garbage)])
        a.reload(garbage, dev=False, key_files=read_key_files(garbage))
    # a failed reload keeps what was there
    assert a.verify(hs(claims(), secret=new_secret)).sub == "u1"
    assert a.dev


# --- verified-token cache -------------------------------------------------------------


class Clock:
    """A clock the test moves."""

    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def counted(a: Authenticator, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every signature check ``a`` makes (the cryptography a cache hit skips)."""
    checked: list[str] = []
    real = a._verify_signature

    def spy(keys: Any, token: str) -> dict[str, Any]:
        checked.append(token)
        return real(keys, token)

    monkeypatch.setattr(a, "_verify_signature", spy)
    return checked


def test_a_cached_token_returns_the_same_principal(monkeypatch: pytest.MonkeyPatch) -> None:
    a = auth(secret=SECRET)
    checked = counted(a, monkeypatch)
    token = hs(claims(role="harness", topics=["harness"]))
    first = a.verify(token)
    assert a.verify(token) is first
    assert a.bearer(f"Bearer {token}") is first
    assert checked == [token]
    # A different token is verified on its own.
    other = hs(claims(sub="u2"))
    assert a.verify(other).sub == "u2"
    assert checked == [token, other]


def test_a_cached_token_is_refused_once_expired(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    a = Authenticator(AuthConfig(secret=SECRET, leeway_s=0), dev=False, now=clock)
    checked = counted(a, monkeypatch)
    token = hs(claims(exp=NOW + 60))
    assert a.verify(token).sub == "u1"
    clock.now = NOW + 59.9
    assert a.verify(token).sub == "u1"
    assert len(checked) == 1
    clock.now = NOW + 60
    assert refused(a, token).startswith("token expired at")
    clock.now = NOW + 3600
    assert refused(a, token).startswith("token expired at")


def test_a_cached_token_is_rechecked_from_exp_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside the leeway past exp the token is still accepted, but only by a full check."""
    clock = Clock()
    a = Authenticator(AuthConfig(secret=SECRET, leeway_s=30), dev=False, now=clock)
    checked = counted(a, monkeypatch)
    token = hs(claims(exp=NOW + 60))
    a.verify(token)
    clock.now = NOW + 70
    assert a.verify(token).sub == "u1"
    assert a.verify(token).sub == "u1"
    assert len(checked) == 3
    clock.now = NOW + 90
    assert refused(a, token).startswith("token expired at")


@pytest.mark.parametrize("claim", ["nbf", "iat"])
def test_a_token_not_yet_valid_is_not_cached(claim: str, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    a = Authenticator(AuthConfig(secret=SECRET, leeway_s=30), dev=False, now=clock)
    checked = counted(a, monkeypatch)
    token = hs(claims(**{claim: NOW + 20}))
    # Accepted thanks to the leeway, so checked again every time.
    assert a.verify(token).sub == "u1"
    assert a.verify(token).sub == "u1"
    assert len(checked) == 2
    # Once valid, it is remembered.
    clock.now = NOW + 20
    a.verify(token)
    a.verify(token)
    assert len(checked) == 3


def test_a_refused_token_is_not_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    a = auth(secret=SECRET, leeway_s=0)
    checked = counted(a, monkeypatch)
    token = hs(claims(exp=NOW))
    refused(a, token)
    refused(a, token)
    assert checked == [token, token]


def test_reload_clears_the_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    a = auth(secret=SECRET)
    old = hs(claims())
    assert a.verify(old).sub == "u1"
    a.reload(AuthConfig(secret="rotated-secret-" + "z" * 40), dev=False)
    assert "signature does not verify" in refused(a, old)
    # The same keys again still means a fresh check: nothing survives a reload.
    a.reload(AuthConfig(secret=SECRET), dev=False)
    checked = counted(a, monkeypatch)
    assert a.verify(old).sub == "u1"
    assert checked == [old]


def test_the_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("etherd.core.auth.TOKEN_CACHE_SIZE", 2)
    a = auth(secret=SECRET)
    checked = counted(a, monkeypatch)
    one, two, three = (hs(claims(sub=sub)) for sub in ("u1", "u2", "u3"))
    a.verify(one)
    a.verify(two)
    a.verify(one)  # now the most recently used
    a.verify(three)  # evicts two
    assert checked == [one, two, three]
    a.verify(one)
    a.verify(three)
    assert checked == [one, two, three]
    a.verify(two)
    assert checked == [one, two, three, two]


def test_the_dev_token_is_not_cached() -> None:
    a = auth(dev=True, secret=SECRET)
    assert a.verify(DEV_TOKEN).dev
    a.reload(AuthConfig(secret=SECRET), dev=False)
    with pytest.raises(AuthError, match="development mode is off"):
        a.verify(DEV_TOKEN)


# --- harness app gate ----------------------------------------------------------------


def test_harness_app_gate() -> None:
    check_harness_app("my-app", [])
    check_harness_app("my-app", ["other", "my-app"])
    for missing in (None, "", "  "):
        with pytest.raises(Refusal) as info:
            check_harness_app(missing, ["my-app"])
        assert (info.value.code, STATUS[info.value.code]) == ("bad_request", 400)
        assert info.value.message == (
            "missing X-Ether-Harness-App header; harness routes need your app id"
        )
    with pytest.raises(Refusal) as info:
        check_harness_app("x", ["my-app"])
    assert (info.value.code, STATUS[info.value.code]) == ("forbidden", 403)
    assert info.value.message == "harness app 'x' is not allowed on this server"


# --- topic authorisation -------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        ("tasks/abc", "abc"),
        ("tasks/task_1.x:y-z", "task_1.x:y-z"),
        ("tasks", None),
        ("tasks/", None),
        ("tasks/a/b", None),
        ("tasks/*", None),
        ("tasks/>", None),
        ("activity/abc", None),
        ("xtasks/abc", None),
    ],
)
def test_task_id_of(topic: str, expected: str | None) -> None:
    assert task_id_of(topic) == expected


USER = Principal(sub="alice", role=Role.USER)
HARNESS = Principal(sub="runner-1", role=Role.HARNESS)
SERVICE = Principal(sub="backend", role=Role.SERVICE)
ADMIN = Principal(sub="root", role=Role.ADMIN)
DEV = Principal(sub=DEV_SUBJECT, role=Role.ADMIN, dev=True)
OWNED = TaskFacts(owner="alice")
OWNED_HELD = TaskFacts(owner="alice", holder="runner-1")
OTHERS = TaskFacts(owner="bob", holder="runner-2")


def narrowed(p: Principal, *topics: str) -> Principal:
    return msgspec.structs.replace(p, topics=topics)


SUBSCRIBE_CASES: list[tuple[str, Principal, str, TaskFacts | None, bool]] = [
    # user
    ("user own task", USER, "tasks/t1", OWNED, True),
    ("user own held task", USER, "tasks/t1", OWNED_HELD, True),
    ("user other's task", USER, "tasks/t2", OTHERS, False),
    ("user unknown task", USER, "tasks/t3", None, False),
    ("user own activity", USER, "activity/alice", None, True),
    ("user other's activity", USER, "activity/bob", None, False),
    ("user harness topic", USER, "harness", None, False),
    ("user other topic", USER, "news/today", None, False),
    ("user pattern", USER, "tasks/*", None, False),
    ("user activity pattern", USER, "activity/>", None, False),
    # harness
    ("harness ready topic", HARNESS, "harness", None, True),
    ("harness held task", HARNESS, "tasks/t1", OWNED_HELD, True),
    ("harness unheld task", HARNESS, "tasks/t1", OWNED, False),
    ("harness task held by another", HARNESS, "tasks/t2", OTHERS, False),
    ("harness unknown task", HARNESS, "tasks/t3", None, False),
    ("harness activity", HARNESS, "activity/runner-1", None, False),
    ("harness pattern", HARNESS, "tasks/>", None, False),
    # service
    ("service any task", SERVICE, "tasks/t2", OTHERS, True),
    ("service unknown task", SERVICE, "tasks/t3", None, True),
    ("service activity", SERVICE, "activity/bob", None, True),
    ("service custom topic", SERVICE, "news/today", None, True),
    ("service pattern", SERVICE, "news/*", None, False),
    # admin
    ("admin task", ADMIN, "tasks/t2", OTHERS, True),
    ("admin pattern", ADMIN, ">", None, True),
    ("admin star pattern", ADMIN, "tasks/*", None, True),
    ("dev admin pattern", DEV, "activity/>", None, True),
    # topics claim narrows every role ...
    ("claim narrows admin", narrowed(ADMIN, "tasks/>"), "activity/bob", None, False),
    ("claim allows admin", narrowed(ADMIN, "tasks/>"), "tasks/t2", OTHERS, True),
    ("claim narrows admin pattern", narrowed(ADMIN, "tasks/>"), ">", None, False),
    ("claim narrows service", narrowed(SERVICE, "news/*"), "tasks/t1", None, False),
    ("claim allows service", narrowed(SERVICE, "news/*"), "news/today", None, True),
    ("claim narrows user", narrowed(USER, "tasks/t1"), "activity/alice", None, False),
    ("claim allows user", narrowed(USER, "tasks/t1"), "tasks/t1", OWNED, True),
    ("empty claim", narrowed(ADMIN), "tasks/t1", OWNED, False),
    # ... but does not widen concrete topics beyond the role
    ("claim does not widen user", narrowed(USER, "tasks/>"), "tasks/t2", OTHERS, False),
    ("claim does not widen harness", narrowed(HARNESS, ">"), "news/today", None, False),
    # patterns need admin or a covering claim
    ("claim covers user pattern", narrowed(USER, "activity/>"), "activity/*", None, True),
    ("claim equals pattern", narrowed(SERVICE, "news/*"), "news/*", None, True),
    ("claim narrower than pattern", narrowed(SERVICE, "news/*"), "news/>", None, False),
    ("claim does not cover pattern", narrowed(USER, "tasks/t1"), "tasks/*", None, False),
    ("harness pattern via claim", narrowed(HARNESS, "tasks/>"), "tasks/>", None, True),
]


@pytest.mark.parametrize(
    ("p", "topic", "task", "allowed"),
    [case[1:] for case in SUBSCRIBE_CASES],
    ids=[case[0] for case in SUBSCRIBE_CASES],
)
def test_may_subscribe(p: Principal, topic: str, task: TaskFacts | None, allowed: bool) -> None:
    refusal = may_subscribe(p, topic, task)
    if allowed:
        assert refusal is None
    else:
        assert isinstance(refusal, str) and refusal


def test_subscribe_refusals_are_explained() -> None:
    assert may_subscribe(USER, "tasks/t2", OTHERS) == may_subscribe(USER, "tasks/t2", None)
    message = may_subscribe(USER, "activity/bob", None)
    assert message is not None and "activity/alice" in message
    message = may_subscribe(USER, "tasks/*", None)
    assert message is not None and "pattern" in message
    message = may_subscribe(narrowed(ADMIN, "tasks/>"), "activity/bob", None)
    assert message is not None and "topics claim" in message and "tasks/>" in message


PUBLISH_CASES: list[tuple[str, Principal, str, bool]] = [
    ("user", USER, "tasks/t1", False),
    ("harness", HARNESS, "harness", False),
    ("service", SERVICE, "news/today", True),
    ("service task", SERVICE, "tasks/t1", True),
    ("admin", ADMIN, "activity/bob", True),
    ("dev", DEV, "anything/at/all", True),
    ("service claim allows", narrowed(SERVICE, "news/>"), "news/a/b", True),
    ("service claim narrows", narrowed(SERVICE, "news/>"), "tasks/t1", False),
    ("admin claim narrows", narrowed(ADMIN, "tasks/*"), "harness", False),
    ("user claim does not widen", narrowed(USER, ">"), "tasks/t1", False),
    ("pattern", ADMIN, "tasks/*", False),
]


@pytest.mark.parametrize(
    ("p", "topic", "allowed"),
    [case[1:] for case in PUBLISH_CASES],
    ids=[case[0] for case in PUBLISH_CASES],
)
def test_may_publish(p: Principal, topic: str, allowed: bool) -> None:
    refusal = may_publish(p, topic)
    if allowed:
        assert refusal is None
    else:
        assert isinstance(refusal, str) and refusal


def test_principal_is_frozen_and_hashable() -> None:
    with pytest.raises(AttributeError):
        USER.sub = "mallory"  # type: ignore[misc]
    assert {USER, narrowed(USER, "a")} == {
        Principal(sub="alice", role=Role.USER),
        narrowed(USER, "a"),
    }
    assert SERVICE.may_act_for_anyone and ADMIN.may_act_for_anyone
    assert not USER.may_act_for_anyone and not HARNESS.may_act_for_anyone


def test_never_echoes_the_token_over_many_failures(keys: KeyFiles) -> None:
    a = auth(secret=SECRET, issuer="i", audience="a")
    soon = timedelta(hours=1).total_seconds()
    for payload in (
        claims(),
        claims(iss="i"),
        claims(iss="i", aud="b"),
        claims(iss="i", aud="a", exp=NOW - soon),
        claims(iss="i", aud="a", role="root"),
    ):
        refused(a, hs(payload))
