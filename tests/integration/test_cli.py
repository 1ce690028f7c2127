"""The command line against real servers: every client command works, and every mistake a
person can make (wrong URL, refused token, unknown task, bad JSON, a refused topic) gets one
line on stderr and its documented exit code, never a traceback. ``etherd demo-harness`` is
driven through a whole task, question and answer included.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from tests.conftest import Etherd, free_port, make_token

ALICE = make_token("alice")
SERVICE = make_token("svc", role="service")
EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_AUTH = 0, 1, 2, 3, 4


def etherd(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("ETHERD_")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "etherd", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=full_env,
    )


def one_line_error(result: subprocess.CompletedProcess[str], code: int, *parts: str) -> str:
    """Assert a failure: the exit code, exactly one stderr line, no traceback."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for part in parts:
        assert part in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Etherd]:
    srv = Etherd(tmp_path_factory.mktemp("cli"), {"log": {"level": "warning"}}).start()
    try:
        yield srv
    finally:
        srv.kill()


def url(server: Etherd) -> str:
    return f"--url={server.base}"


def nowhere() -> str:
    return f"--url=http://127.0.0.1:{free_port()}"


# -- development mode ------------------------------------------------------------------------


def dev_server(workdir: Path) -> Etherd:
    """An etherd in automatic development mode: no secret, no keys, loopback."""
    srv = Etherd(workdir)
    srv.config["auth"] = {}
    srv.config_path.write_bytes(tomli_w.dumps(srv.config).encode())
    return srv


def test_development_mode_gives_tokens_for_every_role(tmp_path: Path) -> None:
    srv = dev_server(tmp_path).start()
    try:
        data_dir = srv.config["server"]["data_dir"]
        key = Path(data_dir) / "dev-hs256.key"
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        # The banner prints ready-to-use tokens and keeps saying development mode is on.
        deadline = time.monotonic() + 10
        while "service " not in srv.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        log = srv.log()
        assert "development auth is ON" in log
        banner = {
            line.split()[0]: line.split()[-1]
            for line in log.splitlines()
            if line.startswith(("  user ", "  harness ", "  service "))
        }
        assert set(banner) == {"user", "harness", "service"}
        harness_headers = {"X-Ether-Harness-App": "cli"}
        status, _ = srv.request(
            "GET", "/api/harness/tasks/claimable", token=banner["harness"], headers=harness_headers
        )
        assert status == 200
        status, _ = srv.request("GET", "/api/activity", token=banner["user"])
        assert status == 200
        assert srv.publish("t/dev", token=banner["service"])["published"][0]["offset"] == 1
        assert srv.publish("t/dev")["published"][0]["offset"] == 2  # `test` keeps working
        # `etherd token` with no configuration at all signs with the same key, any role.
        for role in ("user", "harness", "service", "admin"):
            made = etherd(
                "token", "--sub", "h1", "--role", role, "--data-dir", data_dir, cwd=tmp_path
            )
            assert made.returncode == 0, made.stderr
            status, _ = srv.request("GET", "/healthz")
            token = made.stdout.strip()
            status, body = srv.request("GET", "/api/activity", token=token)
            assert status == (403 if role == "harness" else 200), body
    finally:
        srv.kill()
    # With a secret configured, development mode is off and its key no longer verifies.
    (tmp_path / "keyed").mkdir()
    keyed = Etherd(tmp_path / "keyed", {"auth": {"dev": False}})
    keyed.config["server"]["data_dir"] = data_dir
    keyed.config_path.write_bytes(tomli_w.dumps(keyed.config).encode())
    keyed.start()
    try:
        status, body = keyed.request("GET", "/api/activity", token=banner["user"])
        assert status == 401, body
    finally:
        keyed.kill()


def test_serve_refuses_a_network_listener_without_keys_and_short_secrets(tmp_path: Path) -> None:
    refused = etherd("serve", "--host", "0.0.0.0", "--port", str(free_port()), cwd=tmp_path)
    one_line_error(refused, EXIT_USAGE, "'0.0.0.0'", "auth.secret", "auth.public_keys")
    short = etherd(
        "serve", "--port", str(free_port()), cwd=tmp_path, env={"ETHERD_AUTH_SECRET": "hunter2"}
    )
    one_line_error(short, EXIT_USAGE, "auth.secret is 7 bytes", "at least 32")


def test_token_errors(tmp_path: Path) -> None:
    one_line_error(
        etherd("token", "--sub", "u", "--role", "king", cwd=tmp_path), EXIT_USAGE, "unknown role"
    )
    keyless = tmp_path / "off.toml"
    keyless.write_text("[auth]\ndev = false\n")
    one_line_error(
        etherd("token", "--sub", "u", "--config", str(keyless), cwd=tmp_path),
        EXIT_USAGE,
        "cannot sign tokens",
    )


# -- publish and tail ------------------------------------------------------------------------


def test_publish(server: Etherd) -> None:
    done = etherd("publish", "t/cli", "note", "--data", '{"text": "hi"}', url(server))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"topic": "t/cli", "event": "note", "offset": 1}
    ws = etherd("publish", "t/cli", "note", "--websocket", url(server))
    assert json.loads(ws.stdout)["offset"] == 2
    transient = etherd("publish", "t/cli", "blip", "--transient", url(server))
    assert json.loads(transient.stdout) == {"topic": "t/cli", "event": "blip"}
    one_line_error(
        etherd("publish", "t/cli", "x", "--data", "{oops", url(server)),
        EXIT_USAGE,
        "--data is not valid JSON",
    )
    one_line_error(
        etherd("publish", "t/cli", "x", "--data", "[1]", url(server)), EXIT_USAGE, "JSON object"
    )
    one_line_error(
        etherd("publish", "t/cli", "x", "--token", ALICE, url(server)), EXIT_AUTH, "forbidden"
    )
    one_line_error(
        etherd("publish", "t/cli", "x", "--token", "nope", url(server)), EXIT_AUTH, "unauthorized"
    )
    one_line_error(
        etherd("publish", "tasks/../x", "x", url(server)), EXIT_REFUSED, "unprocessable", "'..'"
    )
    one_line_error(etherd("publish", "t/cli", "x", nowhere()), EXIT_UNREACHABLE, "cannot reach")


def test_tail(server: Etherd, tmp_path: Path) -> None:
    for i in range(3):
        server.publish("t/tail", "tick", i=i)
    done = etherd("tail", "t/tail", "--since", "0", "--count", "3", url(server))
    assert done.returncode == 0, done.stderr
    got = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(e["offset"], e["i"]) for e in got] == [(1, 0), (2, 1), (3, 2)]
    human = etherd(
        "tail", "t/tail", "--since", "2", "--count", "1", "--format", "human", url(server)
    )
    assert human.stdout.split()[1:3] == ["t/tail#3", "tick"]
    # --config: where the server listens comes from its configuration file.
    by_config = etherd(
        "tail",
        "t/tail",
        "--since",
        "2",
        "--count",
        "1",
        "--config",
        str(server.config_path),
        cwd=tmp_path,
    )
    assert json.loads(by_config.stdout)["offset"] == 3, by_config.stderr
    one_line_error(
        etherd("tail", "activity/bob", "--token", ALICE, url(server)),
        EXIT_AUTH,
        "subscription refused",
        "activity/bob",
    )
    one_line_error(
        etherd("tail", "t/tail", "--token", "nope", url(server)), EXIT_AUTH, "unauthorized"
    )
    one_line_error(etherd("tail", "t/tail", nowhere()), EXIT_UNREACHABLE, "cannot reach")
    one_line_error(
        etherd("tail", "t/tail", "--config", str(tmp_path / "missing.toml")),
        EXIT_USAGE,
        "cannot read configuration file",
    )


# -- tasks -----------------------------------------------------------------------------------


def run_json(*args: str) -> Any:
    done = etherd(*args)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_tasks(server: Etherd) -> None:
    alice = ("--token", ALICE, url(server))
    created = run_json(
        "tasks", "create", "Fix the checkout bug", "--scope", '{"repo": "o/r"}', "--json", *alice
    )
    tid = created["task_id"]
    assert created["status"] == "queued" and created["scope"] == {"repo": "o/r"}
    listed = etherd("tasks", "list", *alice)
    assert f"{tid}  queued" in listed.stdout
    shown = etherd("tasks", "show", tid, *alice)
    assert shown.stdout.startswith(f"{tid}  queued  Fix the checkout bug")
    assert run_json("tasks", "show", tid, "--json", *alice)["task_id"] == tid
    one_line_error(
        etherd("tasks", "answer", tid, "yes", *alice), EXIT_REFUSED, "invalid_transition"
    )
    cancelled = etherd("tasks", "cancel", tid, *alice)
    assert cancelled.stdout.strip() == f"{tid}  cancelled"
    one_line_error(etherd("tasks", "show", "task_nope", *alice), EXIT_REFUSED, "not_found")
    one_line_error(etherd("tasks", "cancel", "task_nope", *alice), EXIT_REFUSED, "not_found")
    one_line_error(
        etherd("tasks", "create", "x", "--scope", "{", *alice),
        EXIT_USAGE,
        "--scope is not valid JSON",
    )
    one_line_error(
        etherd("tasks", "list", "--token", "nope", url(server)), EXIT_AUTH, "unauthorized"
    )
    one_line_error(etherd("tasks", "list", nowhere()), EXIT_UNREACHABLE, "cannot reach")


# -- demo-harness ----------------------------------------------------------------------------


def test_demo_harness_runs_a_task_end_to_end(server: Etherd) -> None:
    demo = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "etherd",
            "demo-harness",
            url(server),
            "--ask",
            "always",
            "--step-delay",
            "0",
            "--poll",
            "0.1",
            "--max-tasks",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        alice = ("--token", ALICE, url(server))
        tid = run_json(
            "tasks",
            "create",
            "Fix the login page",
            "--scope",
            '{"repo": "org/web"}',
            "--json",
            *alice,
        )["task_id"]
        deadline = time.monotonic() + 20
        while True:
            task = run_json("tasks", "show", tid, "--json", *alice)
            if task["status"] == "interrupted" or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert task["status"] == "interrupted", task
        assert task["options"] == ["All tests", "Only the affected tests"]
        answered = etherd("tasks", "answer", tid, "All tests", "--option", "All tests", *alice)
        assert answered.returncode == 0, answered.stderr
        out, err = demo.communicate(timeout=20)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.communicate()
    assert demo.returncode == 0, err
    assert "Traceback" not in err
    final = run_json("tasks", "show", tid, "--json", *alice)
    assert final["status"] == "completed"
    hero = next(b for b in final["delivery"]["blocks"] if b["type"] == "hero")
    assert hero["kind"] == "pull_request" and hero["branch"] == f"etherd-demo/{tid}"
    assert hero["url"] == f"https://github.com/org/web/pull/{hero['number']}"
    narrated = [line.split("] ", 1)[1] for line in out.splitlines() if line.startswith(f"[{tid}]")]
    assert narrated[0].startswith("Claimed (run ")
    assert "Reading org/web…" in narrated and "Running all tests… passed." in narrated
    assert narrated[-1].startswith(f"Delivered: {hero['url']}")
    # The steps reached the task's topic: the timeline has them, in order.
    status, timeline = server.request("GET", f"/api/tasks/{tid}/timeline", token=ALICE)
    assert status == 200
    steps = [e["summary"] for e in timeline["entries"] if e["kind"] == "step"]
    assert steps[:3] == [
        "Reading org/web…",
        "Found the code this task is about.",
        "Planning the change…",
    ]


def test_demo_harness_errors(server: Etherd) -> None:
    one_line_error(etherd("demo-harness", nowhere()), EXIT_UNREACHABLE, "cannot reach")
    one_line_error(
        etherd("demo-harness", "--token", "nope", url(server)), EXIT_AUTH, "unauthorized"
    )
