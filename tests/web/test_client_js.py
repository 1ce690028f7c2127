"""Runs the realtime client's Node tests (``tests/web/*.test.mjs``) as part of pytest.

Node's built-in runner (``node --test``) does the work; this fails when node is missing,
when any Node test fails, and when one was skipped or left as a todo.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def test_realtime_client_node_suite() -> None:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node not found: tests/web need Node.js 20 or later (apt-get install nodejs)")
    files = sorted(str(p) for p in HERE.glob("*.test.mjs"))
    assert files, f"no *.test.mjs files in {HERE}"
    run = subprocess.run(
        [node, "--test", "--test-reporter=tap", *files],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=HERE,
    )
    report = run.stdout + run.stderr
    counts = {k: int(v) for k, v in re.findall(r"^# (\w+) (\d+)$", run.stdout, re.MULTILINE)}
    assert run.returncode == 0, f"node --test failed:\n{report}"
    assert counts.get("pass", 0) > 0 and counts.get("fail") == 0, report
    assert counts.get("skipped") == 0 and counts.get("todo") == 0, report
    assert counts.get("cancelled") == 0, report
