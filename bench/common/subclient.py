"""The C subscriber load client (``bench/fanout/subclient.c``): build it, run it, talk to it.

One process holds thousands of WebSocket subscribers on one thread and times every text
frame, at a small fraction of the Python clients' CPU per frame, so the load side costs
as little as it can next to the server being measured. The driver talks to it over
stdin/stdout lines: ``ready OK FAILED`` once everyone is subscribed, then ``count``,
``reset``, ``report`` (one JSON object) and ``quit``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import IO, Any, Final

ROOT: Final = Path(__file__).resolve().parents[2]
SOURCE: Final = ROOT / "bench" / "fanout" / "subclient.c"
BINARY: Final = ROOT / "bench" / ".build" / "subclient"
CFLAGS: Final = ("-std=c11", "-O2", "-Wall", "-Wextra", "-Werror")


def build(force: bool = False) -> Path:
    """Compile the client when the binary is missing or older than its source (what
    ``make bench-client`` does); returns the binary's path."""
    if not force and BINARY.exists() and BINARY.stat().st_mtime >= SOURCE.stat().st_mtime:
        return BINARY
    cc = os.environ.get("CC") or shutil.which("gcc") or "cc"
    BINARY.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([cc, *CFLAGS, "-o", str(BINARY), str(SOURCE)], check=True)
    return BINARY


class SubClient:
    """A running ``subclient`` process (use it as a context manager)."""

    def __init__(
        self,
        ws_url: str,
        n: int,
        *,
        topics: int = 1,
        first: int = 0,
        prefix: str = "bench/",
        pattern: str | None = None,  # one topic or pattern for every subscriber
        concurrency: int = 200,
        connect_timeout: float = 30.0,
        subscribe: bool = True,
        cpus: str | None = None,
    ) -> None:
        command = [str(build()), "--url", ws_url, "-n", str(n), "--topics", str(topics)]
        command += ["--first", str(first)]
        command += ["--prefix", prefix, "--concurrency", str(concurrency)]
        command += ["--connect-timeout", str(connect_timeout)]
        if pattern:
            command += ["--pattern", pattern]
        if not subscribe:
            command.append("--no-subscribe")
        if cpus:
            command = ["taskset", "-c", cpus, *command]
        self.n = n
        self.proc = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )
        self.ok = 0
        self.failed = 0

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _io(self) -> tuple[IO[str], IO[str]]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        return self.proc.stdin, self.proc.stdout

    def _ask(self, command: str) -> str:
        stdin, stdout = self._io()
        stdin.write(command + "\n")
        stdin.flush()
        line = stdout.readline()
        if not line:
            raise RuntimeError(f"subclient exited (code {self.proc.poll()}) on {command!r}")
        return line

    def wait_ready(self, timeout: float) -> tuple[int, int]:
        """Block until every connection is subscribed or failed: ``(ok, failed)``."""
        _, stdout = self._io()
        started = time.monotonic()
        line = stdout.readline()  # the client itself times out stuck connections
        if not line.startswith("ready "):
            raise RuntimeError(f"subclient did not get ready: {line!r} (code {self.proc.poll()})")
        if time.monotonic() - started > timeout:
            raise RuntimeError("subclient took longer than the connect timeout")
        _, ok, failed = line.split()
        self.ok, self.failed = int(ok), int(failed)
        return self.ok, self.failed

    def count(self) -> int:
        """Text frames received since the last reset."""
        return int(self._ask("count").split()[1])

    def reset(self) -> None:
        """Clear frame, byte, latency and close counters (connections stay)."""
        stdin, _ = self._io()
        stdin.write("reset\n")
        stdin.flush()

    def report(self) -> dict[str, Any]:
        """The client's JSON report (``hist`` as a sparse ``{bucket: count}``)."""
        data: dict[str, Any] = json.loads(self._ask("report"))
        data["hist"] = {int(i): int(c) for i, c in data["hist"]}
        return data

    def close(self) -> None:
        """Ask the client to quit, then make sure it did."""
        if self.proc.poll() is None:
            try:
                stdin, _ = self._io()
                stdin.write("quit\n")
                stdin.flush()
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> SubClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def cpu_s(report: dict[str, Any]) -> float:
    """User + system CPU seconds of a report."""
    cpu: dict[str, float] = report["cpu_s"]
    return cpu["user"] + cpu["sys"]
