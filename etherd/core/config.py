"""Typed configuration: defaults, then a TOML file, then ``ETHERD_*`` variables, then flags.

Every limit etherd enforces is a field here with its default; ``conf/etherd.toml`` documents
each one with its unit, and a test keeps the two in step. Unknown keys are errors that name
the key, in the file and in the environment alike. Pure: ``build`` takes the parsed file and
the environment as values; ``edge.ops.configfile.load`` reads them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import msgspec

__all__ = [
    "AuthConfig",
    "ClusterConfig",
    "Config",
    "ConfigError",
    "HttpConfig",
    "LogConfig",
    "MetricsConfig",
    "RealtimeConfig",
    "RetentionRule",
    "ServerConfig",
    "StoreConfig",
    "TasksConfig",
    "WsConfig",
    "build",
    "check_listener",
]

Pos = Annotated[int, msgspec.Meta(ge=1)]
NonNeg = Annotated[int, msgspec.Meta(ge=0)]
PosFloat = Annotated[float, msgspec.Meta(gt=0)]
NonNegFloat = Annotated[float, msgspec.Meta(ge=0)]


class ConfigError(Exception):
    """The configuration cannot be used; the message names the key and the reason."""


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class ServerConfig(_Section):
    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 8080
    # Base for the absolute callback URLs in execution bundles; empty means http://host:port.
    public_url: str = ""
    data_dir: str = "data"
    # How long a stop waits for in-flight requests before closing what is left.
    shutdown_grace_s: PosFloat = 10.0
    # WebSocket clients are closed in batches spread over this window on a graceful stop.
    drain_window_s: NonNegFloat = 1.0
    # On a graceful stop, /readyz answers 503 this long before the listener closes, so load
    # balancers that poll it stop sending new connections first.
    shutdown_delay_s: NonNegFloat = 0.0
    max_connections: Pos = 50_000
    # Worker processes serving the one port (``--workers``); more than 1 needs PostgreSQL
    # and a bus (a local nats-server is started when cluster.nats_url is empty).
    workers: Pos = 1
    # Connections the kernel queues for accept() (listen(2) backlog).
    listen_backlog: Pos = 4096
    # WebSocket sessions are closed in this many batches over drain_window_s.
    drain_batches: Pos = 20
    # With --workers: a worker whose event loop has not pinged the supervisor for this many
    # seconds is killed and restarted (it pings every half of it); 0: not watched.
    worker_watchdog_s: NonNegFloat = 10.0


class HttpConfig(_Section):
    max_header_bytes: Pos = 16 * 1024
    max_headers: Pos = 100
    max_body_bytes: Pos = 1024 * 1024
    # A request must arrive whole within this time, or the connection gets 408 and closes.
    request_timeout_s: PosFloat = 30.0
    keepalive_timeout_s: PosFloat = 75.0
    # A new connection that sends no byte of a request within this time is closed.
    first_byte_timeout_s: PosFloat = 10.0
    # Plain HTTP connections (not yet upgraded or streaming) across the server; past it an
    # idle keep-alive one is closed to make room, or the new one gets 503.
    max_connections: Pos = 10_000
    # Bytes of one chunk's size line with its extensions (400 and close past it).
    max_chunk_extension_bytes: Pos = 4096
    # Requests received on one connection but not yet answered; past it reading pauses.
    max_pipelined: Pos = 256
    # Requests being handled across the whole server; past it new requests get 503.
    max_inflight: Pos = 10_000
    # Bytes one connection may hold: requests read and not yet answered (past it reading
    # pauses) or, for SSE streams, unsent bytes (past it the stream is dropped as a slow
    # consumer).
    max_pending_bytes: Pos = 4 * 1024 * 1024
    # Browser origins (``scheme://host[:port]``) allowed to call the HTTP API and SSE from
    # another origin (CORS); "*" allows any. Empty: no CORS headers at all.
    cors_origins: list[str] = msgspec.field(default_factory=list)
    # Unsent bytes in a connection's transport above which asyncio calls pause_writing.
    write_high_water_bytes: Pos = 256 * 1024
    # Characters of an Idempotency-Key header.
    max_idempotency_key_chars: Pos = 255


class WsConfig(_Section):
    # Largest message a client may send (after reassembling fragments); larger closes 1009.
    max_message_bytes: Pos = 64 * 1024
    max_topics_per_connection: Pos = 1_000
    # Wildcard subscriptions are costlier to match; each connection may hold this many.
    max_patterns_per_connection: Pos = 16
    # Commands waiting behind a subscribe that is still reading the store.
    max_queued_commands: Pos = 64
    # Publishes one connection may have waiting for their commit (refused past it).
    max_inflight_publishes: Pos = 1_024
    # Unsent bytes per connection; past it the connection is closed with 4008.
    max_pending_bytes: Pos = 8 * 1024 * 1024
    max_connections_per_subject: Pos = 10_000
    # A connection that sent nothing for this long is pinged; one that then stays silent
    # for ping_timeout_s more is closed with 4000 (ping timeout).
    ping_interval_s: PosFloat = 20.0
    ping_timeout_s: PosFloat = 20.0
    # Subscribers written to per loop iteration; a larger fan-out yields to other work.
    fanout_slice: Pos = 2_000
    # The fan-out writes to a subscriber's socket itself (in C) while its transport holds
    # nothing unsent; false sends every frame through the transport (the same bytes, in
    # the same order, at about half a microsecond more per subscriber per write).
    direct_write: bool = True
    # Seconds a session the server closed may take to flush before its socket is cut.
    close_grace_s: PosFloat = 2.0
    # Path of an echo endpoint for the Autobahn conformance suite; empty (off) in production.
    echo_path: str = ""


class AuthConfig(_Section):
    # HS256 shared secret. Empty means no HS256 tokens.
    secret: str = ""
    # PEM files with RS256 or ES256 public keys.
    public_keys: list[str] = msgspec.field(default_factory=list)
    # PEM file with a private key, used only by `etherd token` when no secret is set.
    private_key: str = ""
    # None: on only when no secret or key is configured and the listener is on loopback.
    dev: bool | None = None
    require_exp: bool = True
    issuer: str = ""
    audience: str = ""
    leeway_s: NonNegFloat = 30.0
    # Allowed X-Ether-Harness-App values; empty allows any non-empty value.
    harness_apps: list[str] = msgspec.field(default_factory=list)


class RetentionRule(_Section):
    prefix: str
    max_age_s: NonNegFloat = 0.0
    max_count: NonNeg = 0


class StoreConfig(_Section):
    # sqlite:///path/to/file.db or postgresql://user@host:port/db; empty: SQLite in data_dir.
    url: str = ""
    migrate_on_start: bool = True
    batch_max_rows: Pos = 5_000
    # A batch is committed once it is this old even if it is not full (0 = as soon as the
    # writer is free, which is what group commit wants).
    batch_max_delay_ms: NonNegFloat = 0.0
    # Appends waiting for a commit; past it publishes fail fast with 503.
    queue_max_rows: Pos = 200_000
    pool_size: Pos = 4
    connect_timeout_s: PosFloat = 5.0
    retry_max_delay_s: PosFloat = 5.0
    retention: list[RetentionRule] = msgspec.field(default_factory=list)
    retention_interval_s: PosFloat = 60.0


class RealtimeConfig(_Section):
    prefer_websocket: bool = True
    # A resume that would replay more than this answers recovered: false instead.
    replay_max_events: Pos = 10_000
    sse_heartbeat_s: PosFloat = 15.0
    max_publish_batch: Pos = 10_000
    # A replay is read from the store and written in pieces of about this many bytes, each
    # once the client has taken the one before (a piece holds at least one event).
    replay_page_bytes: Pos = 256 * 1024
    # Replay bytes read and not yet taken by their clients, across the server; a resume
    # that finds it spent is refused (code "overloaded") and may be retried.
    max_replay_bytes: Pos = 64 * 1024 * 1024


class TasksConfig(_Section):
    lease_s: PosFloat = 60.0
    sweep_interval_s: PosFloat = 1.0
    max_prompt_bytes: Pos = 64 * 1024
    max_user_message_bytes: Pos = 8 * 1024
    # Expired leases handled per sweep.
    sweep_batch: Pos = 500
    # Largest page of GET /api/activity and GET /api/harness/tasks/claimable.
    max_page_size: Pos = 200
    # Largest page of GET /api/tasks/{id}/timeline.
    max_timeline_page: Pos = 1_000
    # Events of a task topic one timeline request reads at most, looking for entries.
    timeline_scan_events: Pos = 10_000
    # Task rows each process remembers to skip a read before a change.
    cache_size: Pos = 10_000


class ClusterConfig(_Section):
    # NATS servers, comma-separated ("nats://10.0.0.5:4222,nats://10.0.0.6:4222"). Empty: no
    # bus, unless server.workers > 1 (then a local nats-server is started).
    nats_url: str = ""
    # This node's name among the nodes; empty: host name and process id.
    node_id: str = ""
    # First token(s) of every subject etherd uses, so several clusters can share one NATS.
    subject_prefix: str = "etherd"
    # How long an event may wait for the offsets before it before they are read from the log.
    gap_wait_ms: NonNegFloat = 50.0
    # Events one topic may hold waiting for a gap; past it the gap is read at once.
    max_held_events: Pos = 10_000
    # Seconds after a node starts following a topic when it checks the log once for events
    # the bus did not bring (interest takes a moment to reach every server of a NATS cluster).
    follow_audit_s: NonNegFloat = 1.0
    # Seconds between checks of every followed topic's head in the log; an event the bus
    # never brought (its node died between commit and publish) is read after two checks.
    # 0: no checks (such an event then arrives with the topic's next one).
    tail_check_s: NonNegFloat = 5.0
    # Seconds between node heartbeats on the bus (peers and presence use them).
    heartbeat_s: PosFloat = 1.0
    # How long a presence query waits for the other nodes' counts.
    presence_timeout_ms: PosFloat = 250.0
    # Seconds between tries to take over the cluster-wide duties (lease sweep, retention).
    leader_retry_s: PosFloat = 1.0
    # While the bus is down: seconds between reads of the log for events of other nodes.
    degraded_poll_s: PosFloat = 2.0
    # Seconds to wait for a NATS server when connecting, and between reconnection tries.
    connect_timeout_s: PosFloat = 2.0
    reconnect_wait_s: PosFloat = 0.5
    # Bytes of events buffered for the bus while it reconnects (then they are dropped: the
    # other nodes read them from the log once the bus is back).
    max_pending_bytes: Pos = 8 * 1024 * 1024


class LogConfig(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"
    access_log: bool = False


class MetricsConfig(_Section):
    # When true, /metrics needs an admin token.
    require_admin: bool = True
    # Seconds between counts of tasks by status (the etherd_tasks gauge).
    task_count_interval_s: PosFloat = 5.0


class Config(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    http: HttpConfig = msgspec.field(default_factory=HttpConfig)
    ws: WsConfig = msgspec.field(default_factory=WsConfig)
    auth: AuthConfig = msgspec.field(default_factory=AuthConfig)
    store: StoreConfig = msgspec.field(default_factory=StoreConfig)
    realtime: RealtimeConfig = msgspec.field(default_factory=RealtimeConfig)
    tasks: TasksConfig = msgspec.field(default_factory=TasksConfig)
    cluster: ClusterConfig = msgspec.field(default_factory=ClusterConfig)
    log: LogConfig = msgspec.field(default_factory=LogConfig)
    metrics: MetricsConfig = msgspec.field(default_factory=MetricsConfig)

    @property
    def store_url(self) -> str:
        """The store URL, defaulting to an SQLite file inside the data directory."""
        if self.store.url:
            return self.store.url
        data_dir = self.server.data_dir
        if data_dir and not data_dir.endswith("/"):
            data_dir += "/"
        return "sqlite:///" + data_dir + "etherd.db"

    @property
    def public_url(self) -> str:
        """Base URL for absolute links handed to harnesses, without a trailing slash."""
        if self.server.public_url:
            return self.server.public_url.rstrip("/")
        host = self.server.host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.server.port}"

    @property
    def nats_servers(self) -> list[str]:
        """The NATS servers of ``cluster.nats_url``."""
        return [u.strip() for u in self.cluster.nats_url.split(",") if u.strip()]

    @property
    def clustered(self) -> bool:
        """Whether this node shares fan-out with others over a bus."""
        return bool(self.nats_servers) or self.server.workers > 1

    @property
    def dev_auth(self) -> bool:
        """Whether the development token ``test`` is accepted (contract section 2)."""
        if self.auth.dev is not None:
            return self.auth.dev
        return not (self.auth.secret or self.auth.public_keys) and is_loopback(self.server.host)


LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})


def is_loopback(host: str) -> bool:
    """True for addresses that only this machine can reach."""
    return host in LOOPBACK_HOSTS or host.startswith("127.")


_SUBJECT_PREFIX = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")

# A serialized origin as browsers send it in the Origin header.
_ORIGIN = re.compile(r"[a-z][a-z0-9+.\-]*://([a-z0-9.\-]+|\[[0-9a-f:.]+\])(:[0-9]{1,5})?")

ENV_PREFIX = "ETHERD_"
# Variables with this prefix that are not configuration keys.
ENV_NOT_KEYS = frozenset({"ETHERD_CONFIG", "ETHERD_SUPERVISED", "ETHERD_INHERITED_FD"})


def build(
    raw: Mapping[str, Any],
    *,
    env: Mapping[str, str],
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Config:
    """The effective configuration from a parsed file, the environment and flag values.

    Args:
        raw: the TOML file's tables (``{}`` without a file).
        env: the environment to read ``ETHERD_<SECTION>_<KEY>`` from.
        overrides: values from command-line flags, as ``{section: {key: value}}``; a value
            of None means "flag not given".

    Raises:
        ConfigError: an unknown key, a bad value, or a rule that spans keys is broken.
    """
    data: dict[str, Any] = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    _apply_env(data, env)
    for section, values in (overrides or {}).items():
        for key, value in values.items():
            if value is not None:
                data.setdefault(section, {})[key] = value
    try:
        config = msgspec.convert(data, Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid configuration: {exc}") from None
    _check(config)
    return config


def _apply_env(raw: dict[str, Any], env: Mapping[str, str]) -> None:
    sections = {
        name: field.type for name, field in ((f.name, f) for f in msgspec.structs.fields(Config))
    }
    for name, text in env.items():
        if not name.startswith(ENV_PREFIX) or name in ENV_NOT_KEYS:
            continue
        rest = name[len(ENV_PREFIX) :].lower()
        section, _, key = rest.partition("_")
        section_type = sections.get(section)
        if section_type is None:
            raise ConfigError(f"unknown configuration variable {name}: no section {section!r}")
        fields = {f.name: f.type for f in msgspec.structs.fields(section_type)}
        if key not in fields:
            raise ConfigError(
                f"unknown configuration variable {name}: section [{section}] has no key {key!r}"
            )
        raw.setdefault(section, {})[key] = _env_value(name, text, fields[key])


def _env_value(name: str, text: str, typ: Any) -> Any:
    """Turn one environment string into the value the field's type expects."""
    origin = getattr(typ, "__origin__", None)
    if origin is list:
        if text.lstrip().startswith("["):
            try:
                return msgspec.json.decode(text)
            except msgspec.DecodeError as exc:
                raise ConfigError(f"{name} is not a JSON list: {exc}") from None
        return [part.strip() for part in text.split(",") if part.strip()]
    if typ == (bool | None) or typ is bool:
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        if typ is not bool and lowered in ("", "auto"):
            return None
        raise ConfigError(f"{name} must be true or false, got {text!r}")
    try:
        return msgspec.convert(text, typ, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{name}={text!r}: {exc}") from None


# Shorter HS256 secrets are refused: they can be brute-forced from one token.
MIN_SECRET_BYTES = 32


def short_secret(size: int) -> str:
    """Why an HS256 secret of ``size`` bytes is refused, and what to do instead."""
    return (
        f"auth.secret is {size} bytes; HS256 needs at least {MIN_SECRET_BYTES} random "
        f"bytes (e.g. `openssl rand -hex 32`)"
    )


def check_listener(config: Config, host: str) -> None:
    """Refuse to listen on ``host`` beyond loopback with development auth or with no keys.

    Raises:
        ConfigError: one line saying what to configure.
    """
    if is_loopback(host):
        return
    if config.auth.dev:
        raise ConfigError(
            f"auth.dev = true needs a loopback listener, but etherd would listen on {host!r}; "
            f"development tokens must never be reachable from the network"
        )
    if not (config.auth.secret or config.auth.public_keys):
        raise ConfigError(
            f"etherd would listen on {host!r} with no way to verify tokens: set auth.secret "
            f"(e.g. ETHERD_AUTH_SECRET=$(openssl rand -hex 32)) or auth.public_keys, or listen "
            f"on 127.0.0.1 for development mode"
        )


def _check(config: Config) -> None:
    """Rules that span several keys."""
    check_listener(config, config.server.host)
    size = len(config.auth.secret.encode())
    if 0 < size < MIN_SECRET_BYTES:
        raise ConfigError(short_secret(size))
    if config.ws.ping_timeout_s > config.ws.ping_interval_s * 10:
        raise ConfigError("ws.ping_timeout_s must be at most ten times ws.ping_interval_s")
    for origin in config.http.cors_origins:
        if origin != "*" and not _ORIGIN.fullmatch(origin):
            raise ConfigError(
                f"http.cors_origins: {origin!r} is not an origin; write scheme://host[:port] "
                f'in lower case with no path or trailing slash (e.g. "http://localhost:3000"), '
                f'or "*" for any origin'
            )
    url = config.store_url
    if not (url.startswith("sqlite:///") or url.startswith(("postgresql://", "postgres://"))):
        raise ConfigError(f"store.url must start with sqlite:/// or postgresql://, got {url!r}")
    if config.clustered and url.startswith("sqlite:///"):
        why = (
            f"server.workers = {config.server.workers}"
            if config.server.workers > 1
            else "cluster.nats_url is set"
        )
        raise ConfigError(
            f"{why}, but the store is SQLite, which one process owns: several workers or "
            f'nodes need one PostgreSQL log (set store.url = "postgresql://...", or --store)'
        )
    if not _SUBJECT_PREFIX.fullmatch(config.cluster.subject_prefix):
        raise ConfigError(
            f"cluster.subject_prefix {config.cluster.subject_prefix!r} must be NATS tokens of "
            f'[A-Za-z0-9_-] separated by dots, e.g. "etherd" or "prod.etherd"'
        )
    for server in config.nats_servers:
        if not server.startswith(("nats://", "tls://")):
            raise ConfigError(
                f"cluster.nats_url: {server!r} must start with nats:// or tls:// "
                f"(e.g. nats://127.0.0.1:4222)"
            )


def masked(config: Config) -> dict[str, Any]:
    """The configuration as plain data with secrets replaced, for printing."""
    data: dict[str, Any] = msgspec.to_builtins(config)
    if data["auth"]["secret"]:
        data["auth"]["secret"] = "********"
    url = data["store"]["url"]
    if "@" in url and ":" in url.split("@", 1)[0].split("//", 1)[-1]:
        scheme, rest = url.split("//", 1)
        creds, host = rest.split("@", 1)
        data["store"]["url"] = f"{scheme}//{creds.split(':', 1)[0]}:********@{host}"
    return data
