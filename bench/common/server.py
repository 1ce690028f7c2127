"""The servers under test as child processes: etherd with a generated configuration, and
the uWebSockets.js peer (``bench/peers/uws/server.js``), each pinned with ``taskset``.

Both listen on 127.0.0.1 at a free port and are handed back once they answer HTTP. etherd
gets development auth (token ``test``), a temporary data directory and whatever settings
the benchmark passes; ``ETHERD_*`` variables of the caller's environment are dropped so the
generated file is the whole configuration.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from bench.common.cpu import raise_nofile

ROOT: Final = Path(__file__).resolve().parents[2]
UWS_DIR: Final = ROOT / "bench" / "peers" / "uws"
TOKEN: Final = "test"  # etherd's development token (loopback listener, auth.dev = true)
HOST: Final = "127.0.0.1"

TomlValue = str | int | float | bool


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def toml_value(value: TomlValue) -> str:
    """A TOML literal for a Python scalar."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def parse_setting(item: str) -> tuple[str, str, TomlValue]:
    """``section.key=value`` (a ``--set`` option) to its parts; numbers and booleans typed."""
    key, _, text = item.partition("=")
    section, _, name = key.partition(".")
    if not (section and name and text):
        raise SystemExit(f"--set wants section.key=value, got {item!r}")
    value: TomlValue = text
    if text in ("true", "false"):
        value = text == "true"
    elif re.fullmatch(r"-?[0-9]+", text):
        value = int(text)
    elif re.fullmatch(r"-?[0-9]+\.[0-9]+", text):
        value = float(text)
    return section, name, value


def toml(sections: Mapping[str, Mapping[str, TomlValue]]) -> str:
    """A TOML document of plain ``[section]`` tables."""
    lines: list[str] = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


@dataclass
class ServerProcess:
    """A server child process: where it listens and how to stop it."""

    kind: str  # "etherd" or "uws"
    proc: subprocess.Popen[bytes]
    port: int
    workdir: Path
    owns_workdir: bool
    host: str = HOST

    @property
    def pid(self) -> int:
        """The server's pid (``taskset`` execs it, so the pid is the server's own)."""
        return self.proc.pid

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def ws_url(self, token: str = TOKEN) -> str:
        """The realtime endpoint, with the token in the query (contract section 2)."""
        return f"ws://{self.host}:{self.port}/api/realtime?token={token}"

    def log_tail(self, chars: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return (self.workdir / "server.log").read_text(errors="replace")[-chars:]
        return ""

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``; removes a workdir it created."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


def _spawn(
    kind: str,
    command: list[str],
    port: int,
    cpu: str | int | None,
    workdir: Path | None,
    ready_path: str,
    timeout: float,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> ServerProcess:
    owns = workdir is None
    work = Path(tempfile.mkdtemp(prefix=f"bench-{kind}-")) if workdir is None else workdir
    if cpu is not None and cpu != "" and shutil.which("taskset"):
        command = ["taskset", "-c", str(cpu), *command]
    raise_nofile()  # inherited: thousands of connections need descriptors
    with (work / "server.log").open("ab") as log:
        proc = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=cwd or work,
            env=dict(env) if env is not None else None,
            start_new_session=True,  # a Ctrl-C reaches the benchmark, which stops the server
        )
    server = ServerProcess(kind, proc, port, work, owns)
    deadline = time.monotonic() + timeout
    url = f"{server.http_url}{ready_path}"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = server.log_tail()
            server.stop()
            raise RuntimeError(f"{kind} exited at start:\n{tail}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as r:
            if r.status == 200:
                return server
        time.sleep(0.05)
    tail = server.log_tail()
    server.stop()
    raise RuntimeError(f"{kind} did not answer {ready_path} in {timeout:g} s:\n{tail}")


def start_etherd(
    *,
    cpu: str | int | None = 0,
    store: str | None = None,
    settings: Mapping[str, Mapping[str, TomlValue]] | None = None,
    overrides: Sequence[str] = (),
    workdir: Path | None = None,
    launcher: Sequence[str] = ("-m", "etherd"),
    timeout: float = 60.0,
) -> ServerProcess:
    """Start ``etherd serve`` with a generated configuration; return once /readyz is 200.

    ``store`` is a store URL (default: SQLite in the data directory); ``settings`` are
    extra TOML sections and keys; ``overrides`` are ``section.key=value`` strings applied
    last. ``launcher`` replaces ``-m etherd`` (e.g. ``traced_server.py TRACE``).
    """
    port = free_port()
    work = Path(tempfile.mkdtemp(prefix="bench-etherd-")) if workdir is None else workdir
    sections: dict[str, dict[str, TomlValue]] = {
        "server": {"host": HOST, "port": port, "data_dir": str(work / "data")},
        "auth": {"dev": True},
        # Idle load connections wait through the quiet check, which may take minutes.
        "http": {"keepalive_timeout_s": 3600.0},
        "log": {"level": "warning"},
    }
    if store:
        sections["store"] = {"url": store}
    for section, values in (settings or {}).items():
        sections.setdefault(section, {}).update(values)
    for item in overrides:
        section, name, value = parse_setting(item)
        sections.setdefault(section, {})[name] = value
    config = work / "etherd.toml"
    config.write_text(toml(sections))
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETHERD_")}
    command = [sys.executable, *launcher, "serve", "--config", str(config)]
    server = _spawn("etherd", command, port, cpu, work, "/readyz", timeout, env, cwd=ROOT)
    server.owns_workdir = workdir is None
    return server


def start_uws(*, cpu: str | int | None = 0, timeout: float = 30.0) -> ServerProcess:
    """Start the uWebSockets.js peer (``make bench-peers`` installs it); /healthz is 200."""
    script = UWS_DIR / "server.js"
    if not (UWS_DIR / "node_modules" / "uwebsockets").is_dir():
        raise SystemExit("the uWS peer is not installed: run `make bench-peers`")
    node = shutil.which("node")
    if node is None:
        raise SystemExit("the uWS peer needs Node.js (node on PATH)")
    port = free_port()
    command = [node, str(script), "--host", HOST, "--port", str(port)]
    return _spawn("uws", command, port, cpu, None, "/healthz", timeout, cwd=UWS_DIR)
