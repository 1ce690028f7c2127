"""CPU and memory readings from /proc, noise from other processes, pinning, calibration.

Every benchmark pins the server to one core and the load to another and reports both
sides' CPU, so a saturated load generator is visible. On a shared machine other people's
test runs disturb the numbers; ``wait_quiet`` waits them out and ``others_s`` says how much
they used during a window.
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, NamedTuple

CLK_TCK: Final = os.sysconf("SC_CLK_TCK")


def _stat_fields(text: str) -> list[str]:
    # The command name may hold spaces and parentheses: split after its last ")".
    return text[text.rindex(")") + 2 :].split()


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads), or NaN if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return math.nan
    fields = _stat_fields(text)
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_status_kb(pid: int, key: str) -> int:
    """A ``kB`` line of /proc/PID/status (``VmRSS``, ``VmHWM``), or -1."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return -1


class Proc(NamedTuple):
    """One process as seen in one scan of /proc."""

    name: str
    cpu_s: float
    # Start time in clock ticks since boot: a pid seen twice with the same start is the same
    # process (kernel workers change their command name with the work they do).
    start: int
    kernel: bool  # a kernel thread (ksoftirqd, kworker, ...): no user process's work


def all_procs() -> dict[int, Proc]:
    """Every process on the machine: pid -> name, CPU seconds, start time, kernel thread."""
    out: dict[int, Proc] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            text = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        fields = _stat_fields(text)
        name = text[text.index("(") + 1 : text.rindex(")")]
        if name.startswith("kworker/"):
            name = "kworker"
        kernel = fields[1] in ("0", "2") and entry.name != "1"  # ppid 2 is kthreadd
        cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK
        out[int(entry.name)] = Proc(name, cpu, int(fields[19]), kernel)
    return out


def used_s(before: dict[int, Proc], pid: int, now: Proc) -> float:
    """CPU seconds a process used since ``before`` (all of it if it started since)."""
    then = before.get(pid)
    return now.cpu_s - then.cpu_s if then is not None and then.start == now.start else now.cpu_s


def _others(
    after: dict[int, Proc], ours: Collection[int], skip: Collection[str], kernel: bool
) -> Iterable[tuple[int, Proc]]:
    for pid, proc in after.items():
        if pid in ours or proc.name in skip or (proc.kernel and not kernel):
            continue
        yield pid, proc


def others_s(
    before: dict[int, Proc],
    after: dict[int, Proc],
    ours: Collection[int],
    skip: Collection[str] = (),
    kernel: bool = True,
) -> float:
    """CPU seconds used between two ``all_procs`` scans by processes not in ``ours`` and
    not named in ``skip`` (kernel threads only with ``kernel``)."""
    return sum(used_s(before, pid, p) for pid, p in _others(after, ours, skip, kernel))


def busiest(
    before: dict[int, Proc],
    after: dict[int, Proc],
    ours: Collection[int],
    seconds: float,
    skip: Collection[str] = (),
    kernel: bool = True,
) -> dict[str, float]:
    """The four command names (not ours) that used the most CPU, in % of one core."""
    per: dict[str, float] = {}
    for pid, p in _others(after, ours, skip, kernel):
        per[p.name] = per.get(p.name, 0.0) + used_s(before, pid, p)
    top = sorted(per.items(), key=lambda item: -item[1])[:4]
    return {n: round(100 * c / seconds, 1) for n, c in top if 100 * c / seconds >= 0.5}


def named_cpu_s(procs: dict[int, Proc], name: str) -> float:
    """CPU seconds of every process called ``name`` (e.g. all of PostgreSQL's)."""
    return sum(p.cpu_s for p in procs.values() if p.name == name)


class CpuTimes(NamedTuple):
    """Seconds one CPU (or all of them) spent on processes, interrupts and steal."""

    task: float  # user + nice + system: comparable with the processes' own times
    irq: float  # irq + softirq: on loopback mostly TCP work charged to no process
    steal: float  # time the hypervisor gave to other guests


def cpu_times() -> dict[str, CpuTimes]:
    """The ``cpu`` (all) and ``cpuN`` lines of /proc/stat."""
    out: dict[str, CpuTimes] = {}
    with contextlib.suppress(OSError), open("/proc/stat") as f:
        for line in f:
            if not line.startswith("cpu"):
                break
            name, *values = line.split()
            v = [int(x) for x in values]
            steal = v[7] if len(v) > 7 else 0
            out[name] = CpuTimes(
                (v[0] + v[1] + v[2]) / CLK_TCK, (v[5] + v[6]) / CLK_TCK, steal / CLK_TCK
            )
    return out


def cpu_pct(
    before: dict[str, CpuTimes], after: dict[str, CpuTimes], seconds: float
) -> dict[str, dict[str, float]]:
    """Per core (``cpu0``, ...): task, irq, steal and idle as % of the window."""
    out: dict[str, dict[str, float]] = {}
    for name in sorted(after):
        if name == "cpu" or name not in before:
            continue
        d = [100 * (b - a) / seconds for a, b in zip(before[name], after[name], strict=True)]
        out[name] = {
            "task": round(d[0], 1),
            "irq": round(d[1], 1),
            "steal": round(d[2], 1),
            "idle": round(100 - sum(d), 1),
        }
    return out


@dataclass
class Quiet:
    """What other processes did just before a measured window."""

    others_pct: float  # % of one core, in the last one-second reading
    waited_s: float
    quiet: bool  # False: gave up waiting
    loadavg: str
    busiest: dict[str, float]

    def record(self) -> dict[str, object]:
        """The JSON form kept with each result."""
        return {
            "others_pct_of_a_core": self.others_pct,
            "quiet": self.quiet,
            "waited_s": self.waited_s,
            "loadavg": self.loadavg,
            "busiest_others": self.busiest,
        }


def wait_quiet(max_pct: float, timeout: float, ours: Collection[int], calm: int = 2) -> Quiet:
    """Wait until processes other than ``ours`` use under ``max_pct`` % of one core for
    ``calm`` one-second readings running (at most ``timeout`` s); report the last one."""
    started = time.monotonic()
    run = 0
    mine = set(ours)
    while True:
        p0, t0 = all_procs(), time.monotonic()
        time.sleep(1.0)
        p1, t1 = all_procs(), time.monotonic()
        pct = 100 * others_s(p0, p1, mine) / (t1 - t0)
        run = run + 1 if pct < max_pct else 0
        waited = time.monotonic() - started
        if run >= calm or waited > timeout:
            return Quiet(
                round(pct, 1),
                round(waited, 1),
                run >= calm,
                Path("/proc/loadavg").read_text().strip(),
                busiest(p0, p1, mine, t1 - t0),
            )


def calibrate(cpu: int) -> float:
    """Milliseconds a fixed pure-Python workload takes on core ``cpu`` (best of three).

    The cores of a shared VM do not run at one speed: the same code has taken 25 % more CPU
    per event from one run to the next with nothing else running in the guest. Figures
    per event (and throughput of a CPU-bound run) compare only at similar calibrations.
    """
    with contextlib.suppress(OSError, AttributeError):
        before = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {cpu})
        try:
            best = math.inf
            for _ in range(3):
                started = time.perf_counter()
                table: dict[int, int] = {}
                for i in range(200_000):
                    table[i & 1023] = i * 2 + len(str(i))
                best = min(best, time.perf_counter() - started)
        finally:
            os.sched_setaffinity(0, before)
        return round(best * 1000, 2)
    return math.nan


def parse_cpus(text: str | None) -> set[int]:
    """``"1"``, ``"0,2"`` or ``"2-5"`` to a CPU set (empty for ``""`` or None)."""
    cpus: set[int] = set()
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            a, b = part.split("-", 1)
            cpus.update(range(int(a), int(b) + 1))
        else:
            cpus.add(int(part))
    return cpus


def pin(cpus: Collection[int] | str | int | None) -> None:
    """Pin this process (and the children it starts later) to ``cpus``; no-op when empty."""
    if isinstance(cpus, int):
        cpus = {cpus}
    elif isinstance(cpus, str) or cpus is None:
        cpus = parse_cpus(cpus)
    if cpus:
        with contextlib.suppress(OSError, AttributeError):
            os.sched_setaffinity(0, set(cpus))


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (children, their children, ...), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = _stat_fields(Path(entry.path, "stat").read_text())
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def proc_name(pid: int) -> str:
    """A process's command name (``/proc/PID/comm``), or "" if it is gone."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def pin_tree(pid: int, cpus: Collection[int]) -> list[int]:
    """Pin a running process and everything below it to ``cpus`` (processes they start
    later inherit it); the pids pinned."""
    pinned = []
    for p in descendants(pid):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(p, set(cpus))
            pinned.append(p)
    return pinned


def raise_nofile() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (children inherit it); the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
