"""py-spy on the server: start a recording, and summarise a ``--format raw`` profile."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path


def start_py_spy(
    pid: int,
    output: Path | str,
    *,
    rate: int = 200,
    fmt: str = "raw",
    native: bool = False,
    duration: float | None = None,
    binary: str | None = None,
) -> subprocess.Popen[bytes]:
    """``py-spy record`` of ``pid`` into ``output``, for ``duration`` s or until SIGINT.

    Without ``native`` it samples without pausing the server (``--nonblocking``); with it,
    C frames (uvloop, asyncpg, msgspec) are shown too, at the cost of pausing per sample,
    so figures of such a run are not results.
    """
    command = [binary or shutil.which("py-spy") or "py-spy", "record", "--pid", str(pid)]
    command += ["--rate", str(rate), "--format", fmt, "--output", str(output)]
    if duration is not None:
        command += ["--duration", str(max(1, round(duration)))]
    command += ["--native"] if native else ["--nonblocking"]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def summarize_profile(path: Path, top: int = 30) -> str:
    """Top functions by own and by total samples from a ``py-spy --format raw`` file."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if f]
        if not frames:
            continue
        samples += count
        own[short_frame(frames[-1])] += count
        for name in {short_frame(f) for f in frames}:
            total[name] += count
    if not samples:
        return "py-spy: no samples"
    lines = [f"py-spy: {samples} samples", "", "own time:"]
    lines += [f"  {100 * c / samples:5.1f}%  {name}" for name, c in own.most_common(top)]
    lines += ["", "total time (function and what it calls):"]
    lines += [f"  {100 * c / samples:5.1f}%  {name}" for name, c in total.most_common(top)]
    return "\n".join(lines)


def short_frame(frame: str) -> str:
    """``func (path/to/file.py:12)`` -> ``func (file.py)``: lines merged per function."""
    m = re.match(r"^(.*) \((.*?):\d+\)$", frame)
    if not m:
        return frame
    return f"{m.group(1)} ({m.group(2).rsplit('/', 1)[-1]})"
