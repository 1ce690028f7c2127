"""A few seconds of each fuzz target, over its seed corpus, as part of the test suite.

Each target runs in its own process, as ``make fuzz`` runs it: libFuzzer owns the process
and reports a crash by exiting non-zero. What it learns goes to a temporary directory, so
the committed seeds stay as they are. ``make fuzz`` runs the same targets for longer.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CORPUS = Path(__file__).resolve().parent / "corpus"
TARGETS = ("http_request", "ws_commands", "topics", "tokens")
# Seconds of fuzzing per target: the four stay well under half a minute together.
SECONDS = 4


@pytest.mark.parametrize("target", TARGETS)
def test_target_survives_a_short_run(target: str, tmp_path: Path) -> None:
    """The target runs its seeds and a few seconds of mutations without a crash."""
    seeds = CORPUS / target
    assert len(list(seeds.iterdir())) >= 5, f"the seed corpus of {target} is missing"
    learned = tmp_path / "corpus"
    learned.mkdir()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            f"tests.fuzz.{target}",
            f"-max_total_time={SECONDS}",
            f"-artifact_prefix={tmp_path}/",
            "-print_final_stats=1",
            str(learned),
            str(seeds),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    tail = proc.stderr[-4000:]
    assert proc.returncode == 0, f"{target} crashed:\n{tail}"
    executed = re.search(r"stat::number_of_executed_units:\s*(\d+)", proc.stderr)
    assert executed is not None and int(executed.group(1)) > 0, tail
