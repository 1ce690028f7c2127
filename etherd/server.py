"""Composition root: build the app, listen on one port, keep sessions alive, stop cleanly.

Stop order on SIGTERM or SIGINT: readiness turns false, the listener closes, idle HTTP
connections and SSE streams end, WebSocket sessions are closed with 1001 in batches spread
over ``server.drain_window_s``, in-flight requests get up to ``server.shutdown_grace_s`` to
finish, the batcher commits what it holds, the store closes, and the process exits 0. A
second signal exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable

from etherd.api import install
from etherd.app import App
from etherd.config import Config
from etherd.errors import CLOSE_GOING_AWAY, CLOSE_PING_TIMEOUT, CLOSE_TOKEN_EXPIRED
from etherd.http import HttpConnection

__all__ = ["Server", "run"]

log = logging.getLogger("etherd")


class Server:
    """One etherd process: the app plus its listener, sweeps and stop sequence."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.app: App | None = None
        self._server: asyncio.Server | None = None
        self._stop = asyncio.Event()
        self._signals = 0
        self._tasks: list[asyncio.Task[None]] = []
        self.port = config.server.port

    async def start(self, sock: socket.socket | None = None) -> None:
        """Open the store and start listening."""
        app = App(self.config)
        self.app = app
        install(app)
        await app.start()
        loop = asyncio.get_running_loop()
        cfg = self.config.server
        if sock is not None:
            self._server = await loop.create_server(
                lambda: HttpConnection(app), sock=sock, backlog=4096
            )
        else:
            self._server = await loop.create_server(
                lambda: HttpConnection(app), cfg.host, cfg.port, backlog=4096, reuse_address=True
            )
        bound = self._server.sockets[0].getsockname()
        self.port = int(bound[1])
        self._tasks.append(loop.create_task(self._sweep()))
        self._tasks.append(loop.create_task(self._sse_heartbeats()))
        if self.config.store.retention:
            self._tasks.append(loop.create_task(self._retention()))

    def install_signals(self) -> None:
        """SIGTERM and SIGINT stop gracefully; a second one exits at once."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: int) -> None:
        self._signals += 1
        if self._signals > 1:
            log.warning("second %s: exiting now", signal.Signals(sig).name)
            os._exit(1)
        log.info("%s: stopping gracefully", signal.Signals(sig).name)
        self.request_stop()

    def request_stop(self) -> None:
        """Begin the graceful stop."""
        self._stop.set()

    async def wait(self) -> None:
        """Serve until a stop is requested, then stop."""
        await self._stop.wait()
        await self.stop()

    async def stop(self) -> None:
        """The graceful stop sequence (see the module docstring)."""
        app = self.app
        assert app is not None and self._server is not None
        cfg = self.config.server
        app.draining = True
        self._server.close()
        for conn in list(app.http_connections):
            conn.close_if_idle()
        sessions = list(app.sessions)
        if sessions:
            batches = max(1, min(len(sessions), 20))
            size = -(-len(sessions) // batches)
            pause = cfg.drain_window_s / batches
            for i in range(0, len(sessions), size):
                for session in sessions[i : i + size]:
                    session.close(CLOSE_GOING_AWAY, "server stopping; reconnect and resume")
                if pause and i + size < len(sessions):
                    await asyncio.sleep(pause)
        deadline = time.monotonic() + cfg.shutdown_grace_s
        while time.monotonic() < deadline:
            busy = [c for c in app.http_connections if c.busy]
            if not busy:
                break
            await asyncio.sleep(0.02)
        for conn in list(app.http_connections):
            conn.close_if_idle()
        for task in self._tasks:
            task.cancel()
        await app.close()
        await self._server.wait_closed() if not app.http_connections else None
        log.info("stopped")

    async def _sweep(self) -> None:
        """Ping silent sessions, drop ones that stay silent, close expired tokens."""
        app = self.app
        assert app is not None
        cfg = self.config.ws
        interval = min(cfg.ping_interval_s, cfg.ping_timeout_s)
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            wall = time.time()
            for session in list(app.sessions):
                exp = session.principal.exp
                if exp is not None and wall >= exp:
                    session.close(CLOSE_TOKEN_EXPIRED, "token expired; reconnect with a new token")
                elif session.ping_sent_at is not None:
                    if now - session.ping_sent_at >= cfg.ping_timeout_s:
                        session.close(CLOSE_PING_TIMEOUT, "no answer to ping")
                elif not session.seen and session.transport is not None:
                    session.ping_sent_at = now
                    session.transport.send_ping()
                session.seen = False

    async def _sse_heartbeats(self) -> None:
        """Comment lines on idle SSE streams keep proxies from timing them out."""
        app = self.app
        assert app is not None
        chunk = b"%x\r\n: heartbeat\n\n\r\n" % len(b": heartbeat\n\n")
        while True:
            await asyncio.sleep(self.config.realtime.sse_heartbeat_s)
            for conn in list(app.sse_streams):
                app.hub.queue(conn, chunk)

    async def _retention(self) -> None:
        """Trim the log per the retention rules, in small batches, forever."""
        app = self.app
        assert app is not None
        cfg = self.config.store
        while True:
            await asyncio.sleep(cfg.retention_interval_s)
            try:
                deleted = await app.store.enforce_retention(cfg.retention, int(time.time() * 1000))
            except Exception as exc:
                log.warning("retention sweep failed: %s", exc)
                continue
            if deleted:
                log.info("retention removed %d events", deleted)


def banner(config: Config, port: int, dev: bool, store_url: str) -> str:
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
            f"  subscribe:  .venv/bin/etherd tail --url ws://{shown}:{port}/api/realtime "
            "tasks/task_abc",
            f"  publish:    curl -s -H 'Authorization: Bearer test' -H 'Content-Type: "
            f'application/json\' -d \'{{"topic":"tasks/task_abc","event":"hello",'
            f'"data":{{"text":"hi"}}}}\' http://{shown}:{port}/api/publish',
        ]
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
) -> int:
    """Run etherd until stopped; returns the exit code."""
    server = Server(config)
    try:
        await server.start(sock)
    except OSError as exc:
        log.error("cannot listen on %s:%s: %s", config.server.host, config.server.port, exc)
        return 1
    server.install_signals()
    assert server.app is not None
    for note in server.app.auth.notes:
        log.warning("%s", note)
    print(
        banner(config, server.port, config.dev_auth, config.store_url), file=sys.stderr, flush=True
    )
    if on_ready is not None:
        on_ready(server)
    await server.wait()
    return 0


def run(config: Config, sock: socket.socket | None = None) -> int:
    """Run etherd on uvloop (the process entry point for ``etherd serve``)."""
    import uvloop

    return uvloop.run(serve(config, sock=sock))
