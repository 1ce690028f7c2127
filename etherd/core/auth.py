"""Who is calling, and what they may do: JWT verification and topic authorisation.

Contract sections 2 and 3. This module is pure: key files are read by the caller
(``edge.ops.keyfiles``) and handed in as bytes, and so is the development key
(``edge.ops.devkey``), an HS256 secret of the data directory that signs tokens of any
role while development mode is on. The HTTP and WebSocket layers call
:meth:`Authenticator.bearer` or :meth:`Authenticator.verify` to get a :class:`Principal`,
then :func:`may_subscribe`, :func:`may_publish` and :func:`check_harness_app` to decide,
per topic or per route.

Algorithms are bound to keys, never taken from the token alone (RFC 8725 section 2.1):
an ``HS256`` token is checked only against ``auth.secret``, an ``RS256`` token only
against the RSA public keys and an ``ES256`` token only against the P-256 public keys.
``none`` and every other algorithm are refused.
"""

from __future__ import annotations

import enum
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

import msgspec

from etherd.core import jws
from etherd.core.config import MIN_SECRET_BYTES, AuthConfig, ConfigError, short_secret
from etherd.core.errors import Refusal
from etherd.core.topics import TopicError, covers, is_pattern, matches, validate_pattern

if TYPE_CHECKING:
    from etherd.core.pubkeys import PrivateKey, PublicKey

__all__ = [
    "DEV_SUBJECT",
    "DEV_TOKEN",
    "AuthError",
    "Authenticator",
    "Principal",
    "Role",
    "TaskFacts",
    "check_harness_app",
    "may_publish",
    "may_subscribe",
    "task_id_of",
]

DEV_TOKEN: Final = "test"
DEV_SUBJECT: Final = "dev"

# Larger tokens are refused before any parsing or cryptography.
MAX_TOKEN_BYTES: Final = 16 * 1024
# Verified tokens remembered (see Authenticator.verify); the least recently used goes first.
TOKEN_CACHE_SIZE: Final = 10_000

HS256: Final = "HS256"
RS256: Final = "RS256"
ES256: Final = "ES256"
_ALGORITHMS: Final = (HS256, RS256, ES256)
_BEARER_HINT: Final = "expected 'Bearer <token>'"


class Role(enum.StrEnum):
    """What a token's holder is; see contract section 2."""

    USER = "user"
    HARNESS = "harness"
    SERVICE = "service"
    ADMIN = "admin"


_ROLE_NAMES: Final = ", ".join(r.value for r in Role)


class Principal(msgspec.Struct, frozen=True, gc=False):
    """The verified caller.

    ``topics`` is None when the token has no ``topics`` claim; a tuple (possibly empty)
    narrows what the caller may subscribe and publish to. ``exp`` is the token's expiry
    in unix seconds, used to close WebSocket connections when the token runs out.
    """

    sub: str
    role: Role
    topics: tuple[str, ...] | None = None
    exp: float | None = None
    dev: bool = False

    @property
    def is_admin(self) -> bool:
        """Whether the role is ``admin``."""
        return self.role is Role.ADMIN

    @property
    def may_act_for_anyone(self) -> bool:
        """Whether the caller may create tasks for any owner (``service`` or ``admin``)."""
        return self.role is Role.SERVICE or self.role is Role.ADMIN


class AuthError(Exception):
    """A token or header that does not authenticate; answered with 401.

    The message says what was wrong and never contains the token.
    """

    def __init__(self, message: str, code: str = "unauthorized") -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class TaskFacts(msgspec.Struct, frozen=True):
    """What authorisation needs to know about one task.

    ``holder`` is the ``sub`` of the harness principal holding the current lease.
    """

    owner: str
    holder: str | None = None


class _Keys:
    """Everything loaded from one AuthConfig; replaced as a whole on reload."""

    __slots__ = (
        "config",
        "dev",
        "dev_secret",
        "notes",
        "private",
        "private_alg",
        "public",
        "secret",
        "verified",
    )

    def __init__(
        self,
        config: AuthConfig,
        dev: bool,
        files: Mapping[str, bytes],
        dev_secret: bytes | None,
    ) -> None:
        self.config = config
        self.dev = dev
        if dev_secret is not None and len(dev_secret) < MIN_SECRET_BYTES:
            raise ConfigError(
                f"the development key is {len(dev_secret)} bytes; it must be at least "
                f"{MIN_SECRET_BYTES} (delete the file and etherd makes a new one)"
            )
        # Valid only while development mode is on.
        self.dev_secret = dev_secret if dev else None
        # Tokens these keys verified -> their principal (see Authenticator.verify). It lives
        # and dies with the keys, so a reload starts from an empty cache, and a verification
        # still running on the old keys can only fill the old cache.
        self.verified: OrderedDict[str, Principal] = OrderedDict()
        notes: list[str] = []
        self.secret: bytes | None = None
        if config.secret:
            secret = config.secret.encode()
            if jws.looks_like_a_key(secret):
                raise ConfigError(
                    "auth.secret looks like a PEM, DER or SSH key; it must be a random "
                    "string for HS256 (put public keys in auth.public_keys instead)"
                ) from None
            if len(secret) < MIN_SECRET_BYTES:
                raise ConfigError(short_secret(len(secret)))
            self.secret = secret
        self.public: dict[str, list[PublicKey]] = {RS256: [], ES256: []}
        self.private: PrivateKey | None = None
        self.private_alg: str | None = None
        if config.public_keys or config.private_key:
            # cryptography is loaded only by a server that has such keys.
            from etherd.core import pubkeys

            for index, name in enumerate(config.public_keys):
                key = pubkeys.load_public_key(name, f"auth.public_keys[{index}]", files)
                where = f"auth.public_keys[{index}] ({name})"
                self.public[pubkeys.algorithm_of(key, where)].append(key)
            if config.private_key:
                self.private = pubkeys.load_private_key(config.private_key, files)
                self.private_alg = pubkeys.algorithm_of(
                    self.private, f"auth.private_key ({config.private_key})"
                )
        self.notes = tuple(notes)


def _utc(ts: float) -> str:
    try:
        return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return f"{ts:g} (unix seconds)"


def _show(value: object, limit: int = 80) -> str:
    """A claim or header value for a message, shortened."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _number(payload: dict[str, Any], claim: str) -> float | None:
    value = payload.get(claim)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise AuthError(
            f"{claim} claim must be a number of unix seconds, got {type(value).__name__}"
        )
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise AuthError(f"{claim} claim is out of range")
    return number


class Authenticator:
    """Verifies bearer tokens against the configured secret and public keys.

    Thread-compatible: :meth:`reload` swaps all keys at once, so a verification running
    concurrently sees either the old or the new set, never a mix.
    """

    def __init__(
        self,
        config: AuthConfig,
        *,
        dev: bool,
        key_files: Mapping[str, bytes] | None = None,
        dev_secret: bytes | None = None,
        now: Callable[[], float] = time.time,
    ) -> None:
        """Load the keys named in ``config``.

        Args:
            config: the ``[auth]`` section.
            dev: whether development mode is on (``Config.dev_auth``): the token ``test``
                and tokens signed with ``dev_secret`` are accepted.
            key_files: the contents of every file ``config`` names (``public_keys``,
                ``private_key``), by name; ``edge.ops.keyfiles.read_key_files`` reads them.
            dev_secret: the development key (``edge.ops.devkey.dev_key``); ignored while
                ``dev`` is off.
            now: the clock, in unix seconds (tests pass a fixed one).

        Raises:
            ConfigError: a key file that was not given or is not a usable key, or an
                HS256 secret shorter than ``MIN_SECRET_BYTES``.
        """
        self._now = now
        self._keys = _Keys(config, dev, key_files or {}, dev_secret)

    def reload(
        self,
        config: AuthConfig,
        *,
        dev: bool,
        key_files: Mapping[str, bytes] | None = None,
        dev_secret: bytes | None = None,
    ) -> None:
        """Swap in new keys (on SIGHUP). On ConfigError the old keys stay in use."""
        self._keys = _Keys(config, dev, key_files or {}, dev_secret)

    @property
    def dev(self) -> bool:
        """Whether development mode (token ``test``) is on."""
        return self._keys.dev

    @property
    def notes(self) -> tuple[str, ...]:
        """Warnings about the configuration worth printing at start-up (e.g. weak secret)."""
        return self._keys.notes

    def bearer(self, header_value: str | None) -> Principal:
        """Verify an ``Authorization`` header value of the form ``Bearer <token>``.

        The scheme is case-insensitive. Raises AuthError when the header is missing or
        malformed, or the token does not verify.
        """
        if header_value is None or not header_value.strip():
            raise AuthError(f"missing Authorization header; {_BEARER_HINT}")
        parts = header_value.split()
        if parts[0].lower() != "bearer":
            # The first word is not echoed: a bare token would be it.
            raise AuthError(f"Authorization header does not use the Bearer scheme; {_BEARER_HINT}")
        if len(parts) == 1:
            raise AuthError(f"Authorization header has no token after 'Bearer'; {_BEARER_HINT}")
        if len(parts) > 2:
            raise AuthError(
                f"Authorization header has text after the token; {_BEARER_HINT} with no spaces "
                f"in the token"
            )
        return self.verify(parts[1])

    def verify(self, token: str) -> Principal:
        """Verify a token and return who it names.

        Accepts the development token ``test`` in development mode, HS256 tokens signed
        with ``auth.secret``, and RS256/ES256 tokens signed by the private half of one of
        ``auth.public_keys``. Checks ``exp`` (required unless ``auth.require_exp`` is
        false), ``nbf`` and ``iat`` with ``auth.leeway_s``, ``iss`` and ``aud`` when
        configured, and the ``sub``, ``role`` and ``topics`` claims.

        A verified token is remembered (up to ``TOKEN_CACHE_SIZE`` tokens, least recently
        used dropped first), so a client that sends the same token on every request pays for
        the signature once. A remembered token is answered from memory only while the clock
        is before its ``exp`` (one without ``exp``, accepted when ``auth.require_exp`` is
        off, until the next reload); from ``exp`` on it is verified again like a new one,
        and refused once ``exp`` is more than ``auth.leeway_s`` past. Tokens accepted only
        thanks to the leeway (``exp`` already passed, ``nbf`` or ``iat`` still ahead) are
        not remembered. :meth:`reload` forgets everything.

        Raises:
            AuthError: the message says what is wrong, without the token.
        """
        keys = self._keys
        token = token.strip()
        if not token:
            raise AuthError(f"empty token; {_BEARER_HINT}")
        if token == DEV_TOKEN:
            if keys.dev:
                return Principal(sub=DEV_SUBJECT, role=Role.ADMIN, dev=True)
            raise AuthError(
                "development mode is off on this server, so the development token is not "
                "accepted; use a signed JWT (`etherd token --sub U --role R`)"
            )
        verified = keys.verified
        principal = verified.get(token)
        if principal is not None:
            if principal.exp is None or self._now() < principal.exp:
                verified.move_to_end(token)
                return principal
            verified.pop(token, None)
        if len(token) > MAX_TOKEN_BYTES:
            raise AuthError(f"token is {len(token)} bytes; at most {MAX_TOKEN_BYTES} accepted")
        payload = self._verify_signature(keys, token)
        now = self._now()
        principal = self._principal(keys.config, payload, now)
        if _valid_without_leeway(payload, principal, now):
            verified[token] = principal
            if len(verified) > TOKEN_CACHE_SIZE:
                verified.popitem(last=False)
        return principal

    def _verify_signature(self, keys: _Keys, token: str) -> dict[str, Any]:
        try:
            compact = jws.parse(token)
        except jws.JwsError as exc:
            raise AuthError(
                f"malformed token ({exc}); expected a JWT: three base64url parts separated by dots"
            ) from None
        alg = compact.header.get("alg")
        if alg == HS256:
            secrets = [s for s in (keys.secret, keys.dev_secret) if s is not None]
            if not secrets:
                raise AuthError(
                    "HS256 tokens are not accepted: this server has no auth.secret"
                    + self._accepted_hint(keys)
                )
            if keys.secret is None:
                against = "the development key"
            elif keys.dev_secret is None:
                against = "the configured auth.secret"
            else:
                against = "the configured auth.secret or the development key"
            good = any(jws.verify_hs256(compact, secret) for secret in secrets)
        elif alg in (RS256, ES256):
            public = keys.public[alg]
            if not public:
                raise AuthError(
                    f"{alg} tokens are not accepted: no {alg} public key is configured"
                    + self._accepted_hint(keys)
                )
            against = (
                f"the configured {alg} public key"
                if len(public) == 1
                else f"any of the {len(public)} configured {alg} public keys"
            )
            from etherd.core import pubkeys  # loaded already: the keys came from it

            good = any(
                pubkeys.verify(key, compact.signing_input, compact.signature) for key in public
            )
        elif isinstance(alg, str) and alg.lower() == "none":
            raise AuthError("unsigned tokens (alg 'none') are never accepted")
        else:
            raise AuthError(
                f"unsupported token algorithm {_show(alg)}; expected one of "
                f"{', '.join(_ALGORITHMS)}" + self._accepted_hint(keys)
            )
        if not good:
            raise AuthError(f"signature does not verify against {against}")
        try:
            payload = msgspec.json.decode(compact.payload)
        except (msgspec.DecodeError, UnicodeDecodeError):
            raise AuthError("token payload is not valid JSON") from None
        if not isinstance(payload, dict):
            raise AuthError("token payload is not a JSON object of claims")
        return payload

    @staticmethod
    def _accepted_hint(keys: _Keys) -> str:
        accepted = [HS256] if keys.secret is not None or keys.dev_secret is not None else []
        accepted += [alg for alg in (RS256, ES256) if keys.public[alg]]
        if not accepted:
            return "; no auth.secret or auth.public_keys are configured, so no JWT verifies"
        return f"; this server accepts {', '.join(accepted)}"

    def _principal(self, config: AuthConfig, payload: dict[str, Any], now: float) -> Principal:
        leeway = config.leeway_s
        exp = _number(payload, "exp")
        if exp is None:
            if config.require_exp:
                raise AuthError("token has no exp claim; this server requires tokens that expire")
        elif exp <= now - leeway:
            raise AuthError(f"token expired at {_utc(exp)} (server time {_utc(now)})")
        nbf = _number(payload, "nbf")
        if nbf is not None and nbf > now + leeway:
            raise AuthError(f"token is not valid before {_utc(nbf)} (server time {_utc(now)})")
        iat = _number(payload, "iat")
        if iat is not None and iat > now + leeway:
            raise AuthError(
                f"token was issued in the future, at {_utc(iat)} (server time {_utc(now)}); "
                f"check the issuer's clock"
            )
        if config.issuer:
            iss = payload.get("iss")
            if iss is None:
                raise AuthError(f"token has no iss claim; expected {config.issuer!r}")
            if iss != config.issuer:
                raise AuthError(
                    f"token issuer {_show(iss)} is not accepted; expected {config.issuer!r}"
                )
        _check_audience(payload.get("aud"), config.audience)
        sub = payload.get("sub")
        if sub is None:
            raise AuthError("token has no sub claim; expected the caller's user id")
        if not isinstance(sub, str) or not sub:
            raise AuthError(f"sub claim must be a non-empty string, got {_show(sub)}")
        role_value = payload.get("role", Role.USER.value)
        if not isinstance(role_value, str):
            raise AuthError(
                f"role claim must be a string, one of {_ROLE_NAMES}; got {_show(role_value)}"
            )
        try:
            role = Role(role_value)
        except ValueError:
            raise AuthError(
                f"unknown role {_show(role_value)}; expected one of {_ROLE_NAMES}"
            ) from None
        return Principal(sub=sub, role=role, topics=_topics_claim(payload.get("topics")), exp=exp)

    def issue(self, sub: str, role: Role, ttl_s: float | None, topics: Sequence[str] | None) -> str:
        """Sign a token this server accepts (``etherd token``).

        Signs HS256 with ``auth.secret``, or else with ``auth.private_key`` (RS256 or
        ES256 by key type), or else, in development mode, with the development key. Adds
        ``iss``/``aud`` when configured. ``ttl_s`` None means no ``exp`` claim.

        Raises:
            ConfigError: no secret, no private key and no development key.
            ValueError: empty ``sub``, a ``ttl_s`` that is not positive, no ``ttl_s``
                while ``auth.require_exp`` is on, or an invalid topic pattern
                (TopicError).
        """
        keys = self._keys
        config = keys.config
        if not sub:
            raise ValueError("sub must be a non-empty user id")
        role = Role(role)
        if ttl_s is None and config.require_exp:
            raise ValueError(
                "a token without expiry would be refused: auth.require_exp is on; give a ttl"
            )
        if ttl_s is not None and not (ttl_s > 0 and math.isfinite(ttl_s)):
            raise ValueError(f"ttl must be a positive number of seconds, got {ttl_s}")
        now = self._now()
        claims: dict[str, Any] = {"sub": sub, "role": role.value, "iat": int(now)}
        if ttl_s is not None:
            claims["exp"] = math.ceil(now + ttl_s)
        if topics is not None:
            for pattern in topics:
                validate_pattern(pattern)
            claims["topics"] = list(topics)
        if config.issuer:
            claims["iss"] = config.issuer
        if config.audience:
            claims["aud"] = config.audience
        payload = msgspec.json.encode(claims)
        # auth.secret first, then auth.private_key, then the development key.
        secret = keys.secret
        if secret is None and keys.private is None:
            secret = keys.dev_secret
        if secret is not None:
            hmac_key = secret
            return jws.encode(HS256, payload, lambda signing: jws.hs256(signing, hmac_key))
        if keys.private is not None and keys.private_alg is not None:
            from etherd.core import pubkeys

            private = keys.private
            return jws.encode(
                keys.private_alg, payload, lambda signing: pubkeys.sign(private, signing)
            )
        raise ConfigError(
            "cannot sign tokens: set auth.secret (HS256) or auth.private_key (a PEM RSA or "
            "P-256 EC private key), or use development mode (no keys, loopback listener)"
        )


def _valid_without_leeway(payload: dict[str, Any], principal: Principal, now: float) -> bool:
    """Whether a verified token's time claims hold at ``now`` without the leeway."""
    if principal.exp is not None and not now < principal.exp:
        return False
    # Both were checked by _number in _principal, so they are finite numbers or None.
    for claim in ("nbf", "iat"):
        value = payload.get(claim)
        if value is not None and value > now:
            return False
    return True


def _check_audience(aud: object, expected: str) -> None:
    if not expected:
        if aud is not None:
            raise AuthError(
                f"token is meant for audience {_show(aud)}, but this server has no "
                f"auth.audience; configure auth.audience or mint the token without aud"
            )
        return
    if aud is None:
        raise AuthError(f"token has no aud claim; expected {expected!r}")
    if isinstance(aud, str):
        ok = aud == expected
    elif isinstance(aud, list) and all(isinstance(a, str) for a in aud):
        ok = expected in aud
    else:
        raise AuthError("aud claim must be a string or a list of strings")
    if not ok:
        raise AuthError(f"token audience {_show(aud)} does not include {expected!r}")


def _topics_claim(value: object) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise AuthError(
            f"topics claim must be a list of topic patterns, got {type(value).__name__}"
        )
    out: list[str] = []
    for index, pattern in enumerate(value):
        if not isinstance(pattern, str):
            raise AuthError(
                f"topics claim entry {index} must be a string, got {type(pattern).__name__}"
            )
        try:
            validate_pattern(pattern)
        except TopicError as exc:
            raise AuthError(
                f"topics claim entry {index} {_show(pattern)} is not a valid topic pattern: {exc}"
            ) from None
        out.append(pattern)
    return tuple(out)


def check_harness_app(value: str | None, allowed: Sequence[str]) -> None:
    """Enforce the ``X-Ether-Harness-App`` header on harness routes.

    Raises:
        Refusal: ``bad_request`` when the header is missing or empty; ``forbidden``
            when ``allowed`` is non-empty and does not list the value.
    """
    app = (value or "").strip()
    if not app:
        raise Refusal(
            "bad_request", "missing X-Ether-Harness-App header; harness routes need your app id"
        )
    if allowed and app not in allowed:
        raise Refusal("forbidden", f"harness app {_show(app)} is not allowed on this server")


def task_id_of(topic: str) -> str | None:
    """The task id of a ``tasks/{id}`` topic (exactly two segments), else None."""
    prefix, sep, rest = topic.partition("/")
    if prefix != "tasks" or not sep or not rest or "/" in rest or rest in ("*", ">"):
        return None
    return rest


def _outside_claim(p: Principal, topic: str) -> str | None:
    claim = p.topics
    if claim is None:
        return None
    if is_pattern(topic):
        ok = any(covers(c, topic) for c in claim)
    else:
        ok = any(matches(c, topic) for c in claim)
    if ok:
        return None
    if not claim:
        return "this token's topics claim is empty, so it allows no topic"
    shown = ", ".join(claim[:5]) + (", ..." if len(claim) > 5 else "")
    return f"topic {topic!r} is outside this token's topics claim ({shown})"


def may_subscribe(p: Principal, topic: str, task: TaskFacts | None) -> str | None:
    """None if ``p`` may subscribe to ``topic`` (or pattern), else why not.

    ``topic`` must already be a valid topic or pattern. ``task`` is what the caller
    resolved for a ``tasks/{id}`` topic: None when the topic is not a task topic or the
    task is unknown (the refusal is then the same as for someone else's task, so it does
    not reveal whether the task exists). Rules are contract section 3: a ``topics``
    claim narrows every role and is also what lets a non-admin subscribe to a pattern;
    ``admin`` may subscribe to anything, ``service`` to any concrete topic, ``user`` to
    ``tasks/{id}`` it owns and ``activity/{sub}``, ``harness`` to ``harness`` and to
    ``tasks/{id}`` whose lease it holds.
    """
    refused = _outside_claim(p, topic)
    if refused is not None:
        return refused
    if is_pattern(topic):
        if p.role is Role.ADMIN or p.topics is not None:
            return None
        return (
            f"subscribing to the pattern {topic!r} needs an admin token or a topics claim "
            f"that covers it; subscribe to concrete topics instead"
        )
    if p.role is Role.ADMIN or p.role is Role.SERVICE:
        return None
    task_id = task_id_of(topic)
    if p.role is Role.USER:
        if task_id is not None:
            if task is not None and task.owner == p.sub:
                return None
            return f"task {task_id!r} is not one of your tasks; users may follow only their own"
        if topic == f"activity/{p.sub}":
            return None
        if topic.startswith("activity/"):
            return f"users may follow only their own activity topic, 'activity/{p.sub}'"
        return (
            f"users may subscribe to tasks/{{id}} of their own tasks and 'activity/{p.sub}'; "
            f"{topic!r} is neither"
        )
    # harness
    if topic == "harness":
        return None
    if task_id is not None:
        if task is not None and task.holder is not None and task.holder == p.sub:
            return None
        return f"task {task_id!r} is not leased to this harness; claim it first"
    return (
        f"harness tokens may subscribe to 'harness' and to tasks/{{id}} of tasks they hold; "
        f"{topic!r} is neither"
    )


def may_publish(p: Principal, topic: str) -> str | None:
    """None if ``p`` may publish on the concrete ``topic``, else why not.

    Only ``service`` and ``admin`` tokens publish; a ``topics`` claim narrows them.
    """
    if p.role is not Role.SERVICE and p.role is not Role.ADMIN:
        return f"only service and admin tokens may publish; this token's role is {p.role.value!r}"
    if is_pattern(topic):
        return f"events are published to a concrete topic, not to the pattern {topic!r}"
    return _outside_claim(p, topic)
