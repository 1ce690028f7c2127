"""``etherd serve --workers N``: worker processes on one port behind a supervisor, sharing
one PostgreSQL log over a nats-server the supervisor starts itself."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomli_w

from tests.cluster.conftest import Subscriber, publish, wait_for
from tests.conftest import DIE_WITH_PYTEST, Etherd


def uid() -> str:
    return uuid.uuid4().hex[:8]


class Supervised(Etherd):
    """``etherd serve --workers N`` in a subprocess."""

    def __init__(self, workdir: Path, store: str, workers: int) -> None:
        super().__init__(workdir, {"store": {"url": store}, "log": {"level": "info"}})
        self.workers = workers

    def start(self, timeout: float = 20.0) -> Supervised:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "etherd",
                    "serve",
                    "--config",
                    str(self.config_path),
                    "--workers",
                    str(self.workers),
                ],
                stdout=log,
                stderr=log,
                env=self.env,
                cwd=self.workdir,
                preexec_fn=DIE_WITH_PYTEST,
            )
        wait_for(
            lambda: self.log().count("every worker is ready") >= 1,
            "every worker to be ready",
            timeout,
        )
        return self

    def nodes(self, connections: int) -> set[str]:
        """The workers that answered ``connections`` fresh connections."""
        seen: set[str] = set()
        for _ in range(connections):
            status, body = self.request("GET", "/readyz")
            if status == 200:
                seen.add(body["cluster"]["node"])
        return seen


@pytest.fixture
def three_workers(tmp_path: Path, pg_url: str) -> Iterator[Supervised]:
    server = Supervised(tmp_path, pg_url, 3).start()
    try:
        yield server
    finally:
        server.stop()


def test_workers_share_the_port_and_every_subscriber_gets_every_event(
    three_workers: Supervised,
) -> None:
    server = three_workers
    nodes = server.nodes(40)
    assert len(nodes) >= 2, nodes  # the kernel spread the connections
    topic = f"workers/all-{uid()}"
    subs = [Subscriber(server, topic) for _ in range(9)]
    try:
        for n in range(1, 21):
            publish(server, topic, n)
        for sub in subs:
            sub.wait_for(20)
            assert sub.offsets == list(range(1, 21))
    finally:
        for sub in subs:
            sub.close()


def test_a_killed_worker_is_restarted(three_workers: Supervised) -> None:
    server = three_workers
    wait_for(lambda: len(server.nodes(30)) == 3, "connections on all three workers")
    victim = sorted(server.nodes(30))[0]
    pid = int(victim.rsplit("-", 1)[1])
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: "was killed by SIGKILL" in server.log(), "the supervisor to notice")
    assert "restarting" in server.log()
    wait_for(
        lambda: len(server.nodes(30) - {victim}) == 3,
        "a new worker in the dead one's place",
        20,
    )
    # SIGTERM drains every worker and the supervisor exits 0.
    assert server.stop() == 0
    assert "stopped" in server.log()


def test_sighup_reloads_every_worker(three_workers: Supervised) -> None:
    server = three_workers
    server.signal(signal.SIGHUP)
    wait_for(lambda: server.log().count("reload:") >= 3, "three workers to reload")


def test_a_worker_whose_loop_stops_is_killed_and_replaced(tmp_path: Path, pg_url: str) -> None:
    server = Supervised(tmp_path, pg_url, 2)
    # Not tighter: at 1 s a healthy worker was once killed just after start on a 2-core
    # machine (two pings late); what this test needs is a loop that stopped.
    server.config["server"]["worker_watchdog_s"] = 2.0
    server.config_path.write_bytes(tomli_w.dumps(server.config).encode())
    server.start()
    try:
        wait_for(lambda: len(server.nodes(30)) == 2, "connections on both workers")
        victim = sorted(server.nodes(30))[0]
        pid = int(victim.rsplit("-", 1)[1])
        os.kill(pid, signal.SIGSTOP)  # its loop no longer turns; the port still accepts
        wait_for(lambda: "has not pinged its watchdog" in server.log(), "the watchdog", 10)
        wait_for(
            lambda: len(server.nodes(30) - {victim}) == 2, "a new worker in the stuck one's place"
        )
        assert "Traceback" not in server.log()
    finally:
        server.stop()


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(child) for child in text.split()]


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


def test_a_killed_supervisor_takes_its_workers_and_nats_server_with_it(
    tmp_path: Path, pg_url: str
) -> None:
    server = Supervised(tmp_path, pg_url, 2).start()
    try:
        assert server.proc is not None
        children = _children(server.proc.pid)
        assert len(children) == 3  # two workers and the local nats-server
        server.proc.kill()
        server.proc.wait()
        wait_for(lambda: all(_gone(pid) for pid in children), "every child to exit", 20)
    finally:
        server.kill()
        for pid in _children_left(tmp_path):
            os.kill(pid, signal.SIGKILL)


def _children_left(workdir: Path) -> list[int]:
    """Processes still running with this test's configuration (none, when it passes)."""
    left = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if str(workdir).encode() in cmdline and not _gone(int(entry.name)):
                left.append(int(entry.name))
    return left


def test_workers_that_keep_crashing_stop_the_supervisor(tmp_path: Path) -> None:
    # Every worker fails at start: nothing answers on the store's port.
    server = Supervised(tmp_path, "postgresql://postgres@127.0.0.1:1/nope", 2)
    with server.log_path.open("ab") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "etherd",
                "serve",
                "--config",
                str(server.config_path),
                "--workers",
                "2",
            ],
            stdout=log,
            stderr=log,
            env=server.env,
            cwd=tmp_path,
        )
    try:
        assert proc.wait(40) == 1  # the workers' own status
    finally:
        if proc.poll() is None:
            proc.kill()
    text = server.log()
    assert "cannot open the event log" in text
    assert "stopping every worker" in text
    assert "Traceback" not in text


def test_sqlite_with_workers_is_refused(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "etherd", "serve", "--workers", "2", "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if not k.startswith("ETHERD_")},
    )
    assert proc.returncode == 2
    assert "PostgreSQL" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
