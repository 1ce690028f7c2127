"""A well-behaved client that keeps measuring how fast it is served while others attack."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from tests.conftest import Etherd
from tests.stress.rawws import RawWs


@dataclass
class Probe:
    """Publishes over HTTP and waits for each event on its own WebSocket, in a loop on a
    thread; every round trip's seconds, and every failure."""

    server: Etherd
    topic: str = "probe/t"
    round_trips: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._ws = RawWs(self.server.port)
        self._ws.subscribe([self.topic])
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Probe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        self._ws.close()

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            started = time.monotonic()
            try:
                status, body = self.server.request(
                    "POST",
                    "/api/publish",
                    {"topic": self.topic, "event": "probe", "data": {"n": n}},
                    token="test",
                    timeout=10,
                )
                if status != 200:
                    self.failures.append(f"publish {status}: {body!r:.100}")
                    continue
                event = self._ws.recv_json(timeout=10)
                if event.get("n") != n:
                    self.failures.append(f"expected event {n}, got {event!r:.100}")
                    return
                health, _ = self.server.request("GET", "/healthz", timeout=10)
                if health != 200:
                    self.failures.append(f"healthz {health}")
            except (OSError, TimeoutError, ConnectionError) as exc:
                self.failures.append(f"{type(exc).__name__}: {exc}")
                return
            self.round_trips.append(time.monotonic() - started)
            time.sleep(0.02)

    def summary(self) -> str:
        """``N round trips, max X ms`` (or what failed)."""
        if not self.round_trips:
            return f"0 round trips, failures {self.failures[:2]}"
        worst = 1000 * max(self.round_trips)
        return f"{len(self.round_trips)} round trips, max {worst:.0f} ms"
