"""Shared fixtures: a real etherd process on a free port, tokens, and raw-socket helpers."""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import tomli_w

SECRET = "etherd-test-secret-that-is-long-enough-for-hs256"


def _death_signal() -> None:
    """Pre-exec hook: the child gets SIGTERM when pytest dies, even by SIGKILL or a
    timeout, so an interrupted run leaves no server behind."""
    _PRCTL(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG


_PRCTL = ctypes.CDLL(None, use_errno=True).prctl
DIE_WITH_PYTEST = _death_signal


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_token(sub: str, role: str = "user", ttl: float = 3600, **claims: Any) -> str:
    """A HS256 token for the test secret."""
    payload: dict[str, Any] = {"sub": sub, "role": role, "exp": int(time.time() + ttl)}
    payload.update(claims)
    return jwt.encode(payload, SECRET, algorithm="HS256")


class Etherd:
    """``etherd serve`` in a subprocess, configured through a TOML file."""

    def __init__(
        self,
        workdir: Path,
        config: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.config_path = workdir / "etherd.toml"
        base: dict[str, Any] = {
            "server": {
                "host": "127.0.0.1",
                "port": self.port,
                "data_dir": str(workdir / "data"),
                "shutdown_grace_s": 5.0,
                "drain_window_s": 0.2,
            },
            "auth": {"secret": SECRET, "dev": True},
        }
        self.config = _deep_merge(base, config or {})
        self.config_path.write_bytes(tomli_w.dumps(self.config).encode())
        self.env = {**os.environ, **(env or {})}
        self.env.pop("ETHERD_CONFIG", None)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "etherd.log"

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/api/realtime"

    def start(self, timeout: float = 15.0) -> Etherd:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "etherd", "serve", "--config", str(self.config_path)],
                stdout=log,
                stderr=log,
                env=self.env,
                cwd=self.workdir,
                preexec_fn=DIE_WITH_PYTEST,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etherd exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(OSError):
                status, _ = self.request("GET", "/healthz")
                if status == 200:
                    return self
            time.sleep(0.05)
        raise RuntimeError(f"etherd did not start in {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        token: str | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 10.0,
    ) -> tuple[int, Any]:
        """One HTTP request; returns (status, decoded JSON or raw bytes)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            hdrs = dict(headers or {})
            data: bytes | None = None
            if body is not None:
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                hdrs.setdefault("Content-Type", "application/json")
            if token is not None:
                hdrs["Authorization"] = f"Bearer {token}"
            conn.request(method, path, body=data, headers=hdrs)
            resp = conn.getresponse()
            raw = resp.read()
            if resp.getheader("Content-Type", "").startswith("application/json") and raw:
                return resp.status, json.loads(raw)
            return resp.status, raw
        finally:
            conn.close()

    def publish(self, topic: str, event: str = "note", token: str = "test", **data: Any) -> Any:
        status, body = self.request(
            "POST", "/api/publish", {"topic": topic, "event": event, "data": data}, token=token
        )
        assert status == 200, body
        return body


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


@pytest.fixture(scope="module")
def etherd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Etherd]:
    """One etherd on SQLite shared by a test module."""
    server = Etherd(tmp_path_factory.mktemp("etherd")).start()
    yield server
    server.kill()


def raw_exchange(port: int, data: bytes, timeout: float = 5.0, read_all: bool = True) -> bytes:
    """Send raw bytes and read until the server closes (or the timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                if not read_all:
                    break
        except TimeoutError:
            pass
        return b"".join(chunks)
