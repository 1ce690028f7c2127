"""Composition root: build every service and edge, listen on one port, stop cleanly.

``Services`` is the one place that constructs collaborators and wires them: the shared
state, the authenticator, the hub and its broker, the store with its group commit, the
services over them (event log, realtime, tasks, keepalive, retention), the metrics and the
route table. ``Server`` owns the listener, the background jobs, signals, reloads and the
stop sequence.

Stop order on SIGTERM or SIGINT: readiness turns false (``/readyz`` answers 503 and systemd
hears ``STOPPING=1``), after ``server.shutdown_delay_s`` the listener closes, idle HTTP
connections and SSE streams end, WebSocket sessions are closed with 1001 in batches spread
over ``server.drain_window_s``, in-flight requests get up to ``server.shutdown_grace_s`` to
finish, the batcher commits what it holds, the store closes, and the process exits 0. A
second signal exits at once (status 1).

SIGHUP reloads the configuration from the same file, environment and flags: auth keys, the
log level and format, and every limit read at use time take effect without dropping a
connection; keys that need a new listener or store (``RESTART_ONLY``) keep their running
values and a warning names them. What changed is logged (secrets masked). A configuration
that does not load is logged and ignored: etherd keeps running as it was.

Under systemd (``etherd.systemd``) etherd reports ``READY=1`` once it listens, pings the
watchdog from the event loop, and serves on an inherited socket when socket-activated.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import Any, Final

import msgspec

from etherd.core.auth import Authenticator, Role
from etherd.core.config import Config, ConfigError, check_listener, masked
from etherd.core.errors import GOING_AWAY
from etherd.core.hub import Hub, SendAll, send_direct
from etherd.edge.api.common import Dispatcher, Handler, Route
from etherd.edge.api.harness import HarnessRoutes
from etherd.edge.api.openapi import OpenApiRoutes
from etherd.edge.api.ops import OpsRoutes
from etherd.edge.api.publish import PublishRoutes
from etherd.edge.api.realtime import RealtimeRoutes
from etherd.edge.api.tasks import TaskRoutes
from etherd.edge.api.web import WebRoutes
from etherd.edge.http.protocol import HttpConnection
from etherd.edge.http.router import LabelledRouter
from etherd.edge.ops.devkey import dev_key
from etherd.edge.ops.keyfiles import read_key_files
from etherd.edge.ops.logs import setup_logging
from etherd.edge.ops.metrics import Metrics
from etherd.edge.ops.systemd import Notifier, listen_fds, watchdog_interval
from etherd.services.broker import Broker, LocalBroker
from etherd.services.cluster import ClusterBroker
from etherd.services.eventlog import EventLog
from etherd.services.keepalive import Keepalive
from etherd.services.leadership import Leadership
from etherd.services.publisher import Publisher
from etherd.services.realtime import Realtime
from etherd.services.retention import Retention
from etherd.services.state import ServerState
from etherd.services.stats import RateSampler, RuntimeStats
from etherd.services.taskservice import TaskService
from etherd.store import Batcher, StoreUnavailable
from etherd.store.factory import open_store
from etherd.supervisor import INHERITED_FD_ENV, SUPERVISED_ENV

__all__ = ["RESTART_ONLY", "Server", "adopt_socket", "config_changes", "run", "serve"]

log = logging.getLogger("etherd")

# Keys a reload cannot apply: they are used once, to open the listener or the store.
RESTART_ONLY: Final = frozenset(
    {
        "server.host",
        "server.port",
        "server.data_dir",
        "server.listen_backlog",
        "store.url",
        "store.migrate_on_start",
        "store.pool_size",
        "store.connect_timeout_s",
        "tasks.cache_size",
        "ws.echo_path",
        "ws.fanout_slice",
        "ws.direct_write",
    }
)


def fanout_loop(config: Config) -> SendAll:
    """The fan-out's per-subscriber loop: the C one (``etherd.edge.ws._directwrite``) unless
    ``ws.direct_write`` is off or the package was installed without a C compiler."""
    if not config.ws.direct_write:
        return send_direct
    try:
        # Built by pip at install; optional there, so a machine without gcc still runs.
        from etherd.edge.ws._directwrite import send_all
    except ImportError:
        log.warning(
            "ws.direct_write: the C write loop is not built (no C compiler at install); "
            "using the Python loop"
        )
        return send_direct
    return send_all


class Services:
    """Everything one etherd process runs, built and wired in one place."""

    def __init__(self, config: Config, loop: asyncio.AbstractEventLoop) -> None:
        node = config.cluster.node_id or f"{socket.gethostname()}-{os.getpid()}"
        self.state = state = ServerState(config, node_id=node)
        self.auth = Authenticator(
            config.auth,
            dev=config.dev_auth,
            key_files=read_key_files(config.auth),
            dev_secret=_dev_secret(config),
        )
        self.hub = hub = Hub(
            loop.call_soon,
            config.ws.fanout_slice,
            fanout_loop(config),
        )

        self.store = open_store(config)
        self.batcher = Batcher(
            self.store,
            max_rows=config.store.batch_max_rows,
            max_delay_ms=config.store.batch_max_delay_ms,
            queue_max_rows=config.store.queue_max_rows,
            retry_max_delay_s=config.store.retry_max_delay_s,
        )
        self.eventlog = eventlog = EventLog(self.store, self.batcher)
        self.cluster: ClusterBroker | None = None
        self.broker: Broker
        if config.clustered:
            self.broker = self.cluster = ClusterBroker(hub, eventlog, state)
        else:
            self.broker = LocalBroker(hub, eventlog, state.node_id)
        self.leadership = Leadership(self.store, state)
        self.batcher.on_committed = self.broker.committed
        self.publisher = Publisher(eventlog, self.broker)
        self.realtime = realtime = Realtime(
            hub, eventlog, self.broker, self.publisher, self.auth, state
        )
        self.tasks = TaskService(eventlog, state)
        self.keepalive = Keepalive(state)
        self.retention = Retention(eventlog, state)
        self.router: LabelledRouter[Handler] = LabelledRouter()
        self.stats = stats = RuntimeStats(
            state, hub, eventlog, self.tasks, self.broker, self.leadership
        )
        self.rates = RateSampler.of(stats)
        self.metrics = Metrics(stats, self.router.template, lambda: state.config.log)
        self.batcher.on_commit = self.metrics.on_commit
        realtime_routes = RealtimeRoutes(self.auth, realtime)
        # Every route, in order, for the OpenAPI document (which describes itself too).
        self.routes: list[Route] = []
        for routes in (
            WebRoutes(self.auth),
            OpsRoutes(self.auth, eventlog, self.metrics, stats, self.rates, state),
            realtime_routes,
            PublishRoutes(self.auth, self.publisher, state),
            TaskRoutes(self.auth, self.tasks, eventlog, realtime_routes, state),
            HarnessRoutes(self.auth, self.tasks, state),
            OpenApiRoutes(lambda: self.routes),
        ):
            for route in routes.routes():
                self.router.add(route.method, route.template, route.handler, streams=route.streams)
                self.routes.append(route)
        self.dispatch = Dispatcher(self.router, self.state.connections.limit_hits)
        self._loop = loop

    def leading(self) -> bool:
        """Whether this node runs the cluster-wide duties (always, without a cluster)."""
        return self.leadership.leading

    def connection(self) -> HttpConnection:
        """A protocol for one accepted TCP connection."""
        return HttpConnection(
            self.state,
            self.dispatch,
            self.router.methods,
            self.router.streams,
            self.metrics.response,
            self._loop,
            self.hub.flush_soon,
        )

    def apply(self, new: Config) -> None:
        """Apply a reloaded configuration (keys first: an unreadable key file refuses it)."""
        self.auth.reload(
            new.auth,
            dev=new.dev_auth,
            key_files=read_key_files(new.auth),
            dev_secret=_dev_secret(new),
        )
        batcher = self.batcher
        batcher.max_rows = new.store.batch_max_rows
        batcher.max_delay_s = new.store.batch_max_delay_ms / 1000
        batcher.queue_max_rows = new.store.queue_max_rows
        batcher.retry_max_delay_s = new.store.retry_max_delay_s
        self.state.config = new


def _dev_secret(config: Config) -> bytes | None:
    """The data directory's development key while development mode is on."""
    return dev_key(config.server.data_dir) if config.dev_auth else None


class Server:
    """One etherd process: its services plus the listener, sweeps, signals and stop sequence."""

    def __init__(
        self,
        config: Config,
        *,
        reload: Callable[[], Config] | None = None,
        notifier: Notifier | None = None,
        loaded: Config | None = None,
    ) -> None:
        """
        Args:
            config: the running configuration.
            reload: loads the configuration again (on SIGHUP); None disables reloads.
            notifier: where readiness goes (systemd); default from ``$NOTIFY_SOCKET``.
            loaded: the configuration as loaded, when ``config`` was adjusted after loading
                (an inherited socket replaces host and port); reloads compare against it.
        """
        self.config = config
        self.services: Services | None = None
        self._server: asyncio.Server | None = None
        self._stop = asyncio.Event()
        self._signals = 0
        self._tasks: list[asyncio.Task[None]] = []
        # Tasks that run until the very end of a stop (watchdog, loop lag).
        self._background: list[asyncio.Task[None]] = []
        self._reload = reload
        self._loaded = loaded if loaded is not None else config
        self.notifier = notifier if notifier is not None else Notifier()
        self.port = config.server.port
        self.stopping = False

    async def start(self, sock: socket.socket | None = None, reuse_port: bool = False) -> None:
        """Open the store and start listening (on ``sock`` when given).

        ``reuse_port``: bind with ``SO_REUSEPORT``, beside the other workers of a supervisor.
        """
        loop = asyncio.get_running_loop()
        services = Services(self.config, loop)
        self.services = services
        await services.eventlog.open()
        await services.broker.start()
        cfg = self.config.server
        if sock is not None:
            self._server = await loop.create_server(
                services.connection, sock=sock, backlog=cfg.listen_backlog
            )
        else:
            self._server = await loop.create_server(
                services.connection,
                cfg.host,
                cfg.port,
                backlog=cfg.listen_backlog,
                reuse_address=True,
                reuse_port=reuse_port or None,
            )
        bound = self._server.sockets[0].getsockname()
        self.port = int(bound[1])
        # Everything built so far lives as long as the process: keep it out of the cyclic
        # collector's full passes, which otherwise rescan it while connections pour in.
        gc.freeze()
        leads = services.leading
        for job in (
            services.keepalive.run_sessions(),
            services.keepalive.run_streams(),
            services.leadership.run_forever(),
            services.retention.run_forever(leads),
            services.tasks.sweep_forever(leads),
            services.tasks.count_forever(),
            services.rates.run_forever(),
        ):
            self._tasks.append(loop.create_task(job))
        self._background.append(loop.create_task(services.metrics.measure_loop_lag()))

    def ready(self) -> None:
        """Tell the service manager etherd serves, and start the watchdog pings."""
        host = self.config.server.host
        shown = f"[{host}]" if ":" in host else host
        self.notifier.ready(f"listening on {shown}:{self.port}")
        interval = watchdog_interval()
        if interval is not None:
            loop = asyncio.get_running_loop()
            self._background.append(loop.create_task(self._watchdog(interval)))

    def install_signals(self) -> None:
        """SIGTERM and SIGINT stop gracefully (a second one exits at once); SIGHUP reloads."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self._on_hangup)

    def _on_signal(self, sig: int) -> None:
        self._signals += 1
        if self._signals > 1:
            log.warning("second %s: exiting now", signal.Signals(sig).name)
            os._exit(1)
        log.info("%s: stopping gracefully", signal.Signals(sig).name)
        self.request_stop()

    def _on_hangup(self) -> None:
        if self.stopping:
            log.info("SIGHUP while stopping: ignored")
            return
        self.reload()

    def request_stop(self) -> None:
        """Begin the graceful stop."""
        self._stop.set()

    async def wait(self) -> None:
        """Serve until a stop is requested, then stop."""
        await self._stop.wait()
        await self.stop()

    async def stop(self) -> None:
        """The graceful stop sequence (see the module docstring)."""
        services = self.services
        assert services is not None and self._server is not None
        state = services.state
        connections = state.connections
        cfg = self.config.server
        self.stopping = True
        state.draining = True
        sessions = len(connections.sessions)
        budget = cfg.shutdown_delay_s + cfg.drain_window_s + cfg.shutdown_grace_s + 5.0
        self.notifier.stopping(f"draining {sessions} WebSocket sessions", extend_s=budget)
        log.info(
            "draining: readiness is off; %d WebSocket sessions, %d HTTP connections",
            sessions,
            len(connections.http),
        )
        if cfg.shutdown_delay_s:
            await asyncio.sleep(cfg.shutdown_delay_s)
        self._server.close()
        for stream in list(connections.streams):
            stream.end()
        for conn in list(connections.http):
            conn.close_if_idle()
        sessions_left = list(connections.sessions)
        if sessions_left:
            batches = max(1, min(len(sessions_left), cfg.drain_batches))
            size = -(-len(sessions_left) // batches)
            pause = cfg.drain_window_s / batches
            for i in range(0, len(sessions_left), size):
                for session in sessions_left[i : i + size]:
                    session.close(GOING_AWAY)
                if pause and i + size < len(sessions_left):
                    await asyncio.sleep(pause)
        deadline = time.monotonic() + cfg.shutdown_grace_s
        while time.monotonic() < deadline:
            if not any(c.busy for c in connections.http):
                break
            await asyncio.sleep(0.02)
        for conn in list(connections.http):
            conn.close_if_idle()
        unfinished = sum(1 for c in connections.http if c.busy)
        if unfinished:
            log.warning(
                "%d HTTP requests still running after %g s (server.shutdown_grace_s); closing them",
                unfinished,
                cfg.shutdown_grace_s,
            )
        for task in self._tasks:
            task.cancel()
        await services.eventlog.close()
        # After the last commits went out: the bus carries them to the other nodes.
        await services.broker.stop()
        await services.leadership.resign()
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._background, return_exceptions=True)
        self.notifier.close()
        log.info("stopped")

    # -- reload ----------------------------------------------------------------------------

    def reload(self) -> bool:
        """Load the configuration again and apply what can change while running.

        Returns True when a new configuration was applied; on any error the running one
        stays in force and the error is logged.
        """
        if self._reload is None:
            log.warning("SIGHUP: this server has no configuration source to reload from")
            return False
        self.notifier.reloading()
        try:
            loaded = self._reload()
            self._apply(loaded)
        except ConfigError as exc:
            log.error("reload refused, keeping the running configuration: %s", exc)
            return False
        except Exception:
            log.exception("reload failed, keeping the running configuration")
            return False
        finally:
            self.notifier.ready(f"listening on port {self.port}")
        return True

    def _apply(self, loaded: Config) -> None:
        services = self.services
        assert services is not None
        running = self.config
        ignored = [c for c in config_changes(self._loaded, loaded) if c[0] in RESTART_ONLY]
        data = msgspec.to_builtins(loaded)
        current = msgspec.to_builtins(running)
        for key in RESTART_ONLY:
            section, name = key.split(".")
            data[section][name] = current[section][name]
        try:
            new = msgspec.convert(data, Config)
        except msgspec.ValidationError as exc:  # pragma: no cover - same values as before
            raise ConfigError(f"invalid configuration: {exc}") from None
        services.apply(new)
        changes = config_changes(running, new)
        if new.log != running.log:
            setup_logging(new.log)
        self.config = new
        self._loaded = loaded
        for key, old, value in ignored:
            log.warning(
                "reload: %s changed (%s -> %s) but needs a restart; keeping %s",
                key,
                old,
                value,
                old,
                extra={"key": key},
            )
        if changes:
            log.info(
                "reload: applied %s",
                ", ".join(
                    f"{key} {old} -> {value}" if old != value else f"{key} changed (masked)"
                    for key, old, value in changes
                ),
                extra={"changed": [key for key, _, _ in changes]},
            )
        else:
            log.info("reload: no configuration changes; auth keys re-read")
        log.debug("reload complete")

    # -- background tasks ------------------------------------------------------------------

    async def _watchdog(self, interval: float) -> None:
        """Ping systemd's watchdog from the loop: a stuck loop stops the pings."""
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)


def config_changes(old: Config, new: Config) -> list[tuple[str, str, str]]:
    """``(section.key, old, new)`` for every key that differs, values shown masked."""
    raw_old, raw_new = _flat(msgspec.to_builtins(old)), _flat(msgspec.to_builtins(new))
    shown_old, shown_new = _flat(masked(old)), _flat(masked(new))
    return [
        (key, _show(shown_old.get(key)), _show(shown_new[key]))
        for key in sorted(raw_new)
        if raw_old.get(key) != raw_new[key]
    ]


def _flat(data: dict[str, Any]) -> dict[str, Any]:
    return {
        f"{section}.{key}": value
        for section, values in data.items()
        for key, value in values.items()
    }


def _show(value: Any) -> str:
    return msgspec.json.encode(value).decode()


def adopt_socket(config: Config, sock: socket.socket) -> Config:
    """The configuration for serving on an inherited socket: its address, not the file's.

    Raises:
        ConfigError: the socket is not a TCP socket, or development auth is forced on
            (``auth.dev = true``) while the socket is reachable from the network.
    """
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
        raise ConfigError(
            f"the inherited socket (LISTEN_FDS) is {sock.family.name}/{sock.type.name}; "
            f"etherd serves on a TCP socket (ListenStream=ADDRESS:PORT in etherd.socket)"
        )
    host, port = sock.getsockname()[:2]
    adopted = msgspec.structs.replace(
        config, server=msgspec.structs.replace(config.server, host=host, port=port)
    )
    check_listener(adopted, host)
    return adopted


# Who the tokens the development banner prints name, by role, and how long they last.
DEV_TOKEN_SUBJECTS: Final = {Role.USER: "alice", Role.HARNESS: "harness-1", Role.SERVICE: "backend"}
DEV_TOKEN_TTL_S: Final = 24 * 3600.0


def dev_tokens(auth: Authenticator) -> dict[Role, str]:
    """Ready-to-use tokens for the banner, one per role, signed with the development key."""
    return {
        role: auth.issue(sub, role, DEV_TOKEN_TTL_S, None)
        for role, sub in DEV_TOKEN_SUBJECTS.items()
    }


def banner(
    config: Config, port: int, dev: bool, store_url: str, tokens: dict[Role, str] | None = None
) -> str:
    """What ``etherd serve`` prints at start: where it listens and how to try it."""
    host = config.server.host
    shown = f"[{host}]" if ":" in host else host
    lines = [
        f"etherd listening on http://{shown}:{port} (store: {_shown_url(store_url)})",
    ]
    if dev:
        lines += [
            "WARNING: development auth is ON: the token 'test' is accepted as an admin.",
            "         Configure auth.secret or auth.public_keys before exposing etherd.",
            "",
            "Try it:",
            f"  subscribe:  .venv/bin/etherd tail --url http://{shown}:{port} tasks/task_abc",
            f"  publish:    curl -s -H 'Authorization: Bearer test' -H 'Content-Type: "
            f'application/json\' -d \'{{"topic":"tasks/task_abc","event":"hello",'
            f'"data":{{"text":"hi"}}}}\' http://{shown}:{port}/api/publish',
            f"  a harness:  .venv/bin/etherd demo-harness --url http://{shown}:{port}",
            f"  a task:     .venv/bin/etherd tasks create --url http://{shown}:{port} "
            "'Fix the checkout bug'",
        ]
        if tokens:
            lines += ["", "Development tokens (valid for 24 h, only while development mode is on):"]
            lines += [
                f"  {role.value:<8} ({DEV_TOKEN_SUBJECTS[role]}): {token}"
                for role, token in tokens.items()
            ]
            lines.append("More with: etherd token --sub NAME --role user|harness|service|admin")
    else:
        lines.append("Get a token with: etherd token --sub USER --role user")
    return "\n".join(lines)


def _shown_url(url: str) -> str:
    if "@" in url:
        scheme, rest = url.split("//", 1)
        return f"{scheme}//***@{rest.split('@', 1)[1]}"
    return url


async def serve(
    config: Config,
    *,
    sock: socket.socket | None = None,
    on_ready: Callable[[Server], None] | None = None,
    reload: Callable[[], Config] | None = None,
) -> int:
    """Run etherd until stopped; returns the exit code.

    Without ``sock``, a socket passed by systemd socket activation (``LISTEN_FDS``) is
    used when there is one; otherwise etherd binds ``server.host:server.port``.
    """
    loaded = config
    # A worker of ``serve --workers``: beside its siblings on the port, or on the socket
    # the supervisor inherited from systemd.
    worker = bool(os.environ.get(SUPERVISED_ENV))
    inherited_fd = os.environ.pop(INHERITED_FD_ENV, "")
    if sock is None and inherited_fd.isdigit():
        sock = socket.socket(fileno=int(inherited_fd))
    if sock is None:
        try:
            inherited = listen_fds()
        except ValueError as exc:
            log.error("cannot use the inherited sockets: %s", exc)
            return 2
        if len(inherited) > 1:
            log.error(
                "systemd passed %d sockets (LISTEN_FDS); etherd serves on exactly one port",
                len(inherited),
            )
            return 2
        sock = inherited[0] if inherited else None
    if sock is not None:
        try:
            config = adopt_socket(config, sock)
        except ConfigError as exc:
            log.error("%s", exc)
            return 2
    server = Server(config, reload=reload, loaded=loaded)
    try:
        await server.start(sock, reuse_port=worker and sock is None)
    except StoreUnavailable as exc:
        log.error("cannot open the event log: %s", exc)
        return 1
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    except OSError as exc:
        log.error("cannot listen on %s:%s: %s", config.server.host, config.server.port, exc)
        return 1
    server.install_signals()
    assert server.services is not None
    for note in server.services.auth.notes:
        log.warning("%s", note)
    tokens = dev_tokens(server.services.auth) if config.dev_auth else None
    text = banner(config, server.port, config.dev_auth, config.store_url, tokens)
    if config.log.format == "json":
        # One JSON object per line on stderr: the banner goes through the log as well.
        first = text.split("\n", 1)[0]
        log.info(
            "%s",
            first,
            extra={"host": config.server.host, "port": server.port, "inherited": sock is not None},
        )
        if config.dev_auth:
            log.warning("development auth is ON: the token 'test' is accepted as an admin")
    else:
        print(text, file=sys.stderr, flush=True)
    server.ready()
    if on_ready is not None:
        on_ready(server)
    await server.wait()
    return 0


def run(
    config: Config,
    sock: socket.socket | None = None,
    reload: Callable[[], Config] | None = None,
) -> int:
    """Run etherd on uvloop (the process entry point for ``etherd serve``).

    ``reload`` loads the configuration again from the same sources, for SIGHUP.
    """
    import uvloop

    return uvloop.run(serve(config, sock=sock, reload=reload))
