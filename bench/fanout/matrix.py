"""Fan-out matrix: the driver over a grid of subscriber counts and publish rates, with plots.

Run from the repository root in the virtualenv::

    python -m bench.fanout.matrix                 # the full matrix, about 10 minutes
    python -m bench.fanout.matrix --quick         # what `make bench` runs: a few cells, ~1.5 min
    python -m bench.fanout.matrix --plot-only bench/results/fanout-matrix-2026-11-29.jsonl
    python -m bench.fanout.matrix --side-by-side --rounds 3   # etherd vs uWS, sidebyside.py

For every cell (N subscribers, R msg/s) it runs ``python -m bench.fanout.driver`` as its
own process (a fresh server each time, server pinned to ``--server-cpu``, subscribers and
the open-loop publisher pinned to ``--client-cpus``, the C client ``subclient.c`` so every
frame is timed at the least client cost). Cells whose load N x R exceeds ``--max-fps`` frames/s are
skipped. It then measures ``--idle`` idle connections for the memory target.

Output, in ``--out-dir`` (default ``bench/results``; ``bench/results/quick`` with
``--quick``, so a quick run never replaces the committed plots):

- ``fanout-matrix[-quick]-<date>.jsonl``: the driver's JSON line of each run, appended, with
  a ``matrix`` field naming the cell;
- ``fanout-matrix[-quick]-<date>.md``: a header naming the machine (CPU, cores, RAM),
  kernel, Python and library versions and the etherd commit, then one table row per cell;
- ``fanout-latency.png``: latency p50 and p99 against delivered frames/s, one line per N,
  with the benchmark issue's p99 targets marked;
- ``fanout-cpu.png``: server CPU per delivered frame (µs), and server CPU as % of its one
  core, against delivered frames/s, one line per N.

The table is printed on stdout as well. A quick run also compares each cell with the
previous quick run in the same directory (its commit is shown), so a change that made
etherd slower shows up in ``make bench``.

Every run waits for a quiet machine first (``--wait-quiet``) and is rerun when other
processes used more than ``--max-noise`` % of a core during it (``--retry-noisy``; the
full matrix retries 3 times, the quick one not at all). The ``noise %`` column says how much
others used in the kept run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common.machine import cpu_detail, header_lines, machine_info
from bench.fanout import sidebyside

ROOT = Path(__file__).resolve().parents[2]
FULL_NS = (100, 1000, 10000)
# 3,000 msg/s is left out: at N=100 the open-loop publisher alone then needs about 70 % of
# the load core (one HTTP request per event), and the subscribers starve behind it.
FULL_RATES = (10, 30, 100, 300, 1000)
QUICK_NS = (100, 1000, 10000)
QUICK_RATES = (100, 1000)
# The benchmark issue's fan-out targets: (N, msg/s, p99 limit in ms).
TARGETS = (("a", 1000, 100, 10.0), ("b", 1000, 1000, 25.0), ("c", 10000, 100, 250.0))
IDLE_TARGET_MB = 100
# A client process at or above this share of its core may be what limits a run.
SATURATED_PCT = 90.0


def _ints(text: str) -> list[int]:
    return [int(x.replace("_", "")) for x in text.split(",") if x.strip()]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.fanout.matrix",
        description="Sweep the fan-out driver over N and rate; tables and plots (see docstring)",
    )
    p.add_argument("--quick", action="store_true", help="a few short cells (make bench)")
    p.add_argument("--ns", type=_ints, help="subscriber counts, e.g. 100,1000,10000")
    p.add_argument("--rates", type=_ints, help="publish rates in msg/s, e.g. 10,100,1000")
    p.add_argument("--duration", type=float, help="publish seconds per cell (10; quick 3)")
    p.add_argument("--repeat", type=int, default=1, help="runs per cell")
    p.add_argument(
        "--max-fps", type=float, default=1.5e6, help="skip cells with N x rate above this"
    )
    p.add_argument("--idle", type=int, default=10000, help="idle connections to measure (0: no)")
    p.add_argument("--client", choices=("c", "raw", "picows"), default="c")
    p.add_argument(
        "--side-by-side",
        action="store_true",
        help="the standard cells against etherd and the uWS peer (see sidebyside.py)",
    )
    p.add_argument("--peers", default="etherd,uws", help="with --side-by-side: the servers")
    p.add_argument("--rounds", type=int, default=3, help="with --side-by-side: rounds per cell")
    p.add_argument("--name", help="with --side-by-side: file names say sidebyside-NAME")
    p.add_argument("--server-cpu", default="0")
    p.add_argument("--client-cpus", default="1")
    p.add_argument("--wait-quiet", type=float, default=15.0, help="driver --wait-quiet PCT")
    p.add_argument("--wait-quiet-max", type=float, help="seconds (600; quick 30)")
    p.add_argument("--max-noise", type=float, default=5.0, help="driver --max-noise PCT")
    p.add_argument("--retry-noisy", type=int, help="reruns of a noisy run (3; quick 0)")
    p.add_argument("--out-dir", type=Path, help="where results go (see docstring)")
    p.add_argument("--date", default=time.strftime("%Y-%m-%d"), help="date in file names")
    p.add_argument(
        "--plot-only",
        nargs="+",
        type=Path,
        metavar="JSONL",
        help="no runs: redraw the table and plots from these files into --out-dir",
    )
    p.add_argument(
        "--driver-arg",
        action="append",
        default=[],
        help="extra driver argument, repeatable, e.g. --driver-arg=--payload=512",
    )
    args = p.parse_args(argv)
    args.ns = args.ns or list(QUICK_NS if args.quick else FULL_NS)
    args.rates = args.rates or list(QUICK_RATES if args.quick else FULL_RATES)
    if args.duration is None:
        args.duration = 3.0 if args.quick else 10.0
    if args.wait_quiet_max is None:
        args.wait_quiet_max = 30.0 if args.quick else 600.0
    if args.retry_noisy is None:
        args.retry_noisy = 0 if args.quick else 3
    if args.out_dir is None:
        args.out_dir = ROOT / "bench" / "results" / ("quick" if args.quick else "")
    if args.side_by_side and args.quick:
        p.error("--side-by-side runs the standard cells; leave out --quick")
    return args


# -- running -------------------------------------------------------------------------------


def cells(ns: Sequence[int], rates: Sequence[int], max_fps: float) -> list[tuple[int, int]]:
    return [(n, r) for n in ns for r in rates if n * r <= max_fps]


def run_driver(args: argparse.Namespace, extra: list[str], label: str) -> list[dict[str, Any]]:
    """One driver process; returns the JSON records it wrote (empty if it failed)."""
    with tempfile.TemporaryDirectory(prefix="etherd-matrix-") as tmp:
        out = Path(tmp) / "runs.jsonl"
        cmd = [
            sys.executable,
            "-m",
            "bench.fanout.driver",
            "--server-cpu",
            args.server_cpu,
            "--client-cpus",
            args.client_cpus,
            "--wait-quiet",
            str(args.wait_quiet),
            "--wait-quiet-max",
            str(args.wait_quiet_max),
            "--max-noise",
            str(args.max_noise),
            "--retry-noisy",
            str(args.retry_noisy),
            "--label",
            label,
            "--out",
            str(out),
            *extra,
            *args.driver_arg,
        ]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            print(f"  driver failed ({proc.returncode}): " + " | ".join(tail), file=sys.stderr)
            return []
        for line in proc.stderr.splitlines():
            if line.startswith(("noisy run", "warning")):
                print("  " + line, file=sys.stderr)
        return [json.loads(line) for line in out.read_text().splitlines() if line.strip()]


def cell_args(n: int, rate: int, args: argparse.Namespace) -> list[str]:
    """The driver's arguments for one grid cell."""
    return [
        "-n",
        str(n),
        "--rate",
        str(rate),
        "--duration",
        str(args.duration),
        "--client",
        args.client,
    ]


def run_matrix(args: argparse.Namespace, jsonl: Path) -> list[dict[str, Any]]:
    if args.side_by_side:
        todo: list[tuple[int, int]] = []
        print(
            f"{len(sidebyside.STANDARD)} standard cells x {args.rounds} rounds x "
            f"{args.peers}, {args.duration:g} s each",
            flush=True,
        )
    else:
        todo = cells(args.ns, args.rates, args.max_fps)
        skipped = [(n, r) for n in args.ns for r in args.rates if (n, r) not in todo]
        print(
            f"{len(todo)} cells x {args.repeat}, {args.duration:g} s each"
            + (f"; skipped above {args.max_fps:,.0f} frames/s: {skipped}" if skipped else ""),
            flush=True,
        )
    records: list[dict[str, Any]] = []
    started = time.monotonic()
    plan: list[tuple[str, list[str], dict[str, Any]]] = [
        (
            f"matrix-n{n}-r{r}",
            cell_args(n, r, args),
            {"n": n, "rate": r},
        )
        for n, r in todo
    ]
    if args.side_by_side:
        # One driver per cell: it alternates the servers run by run over the rounds.
        peers = ["--peers", args.peers, "--rounds", str(args.rounds)]
        plan = [
            (
                f"sidebyside-n{n}-" + (f"r{r}" if r else "idle"),
                sidebyside.driver_args((n, r), args.duration) + peers,
                {"n": n, "rate": r} if r else {"idle": n},
            )
            for n, r in sidebyside.STANDARD
            if r or args.idle
        ]
    elif args.idle:
        plan.append((f"matrix-idle{args.idle}", ["--idle", str(args.idle)], {"idle": args.idle}))
    for i, (label, extra, cell) in enumerate(plan, 1):
        for rep in range(args.repeat if "n" in cell and not args.side_by_side else 1):
            print(f"[{i}/{len(plan)}] {label} run {rep + 1}", flush=True)
            for record in run_driver(args, extra, label):
                record["matrix"] = {
                    **cell,
                    "quick": args.quick,
                    "repeat": rep + 1,
                    "server_cpu": args.server_cpu,
                }
                with jsonl.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(record, separators=(",", ":")) + "\n")
                records.append(record)
                print("  " + one_line(record), flush=True)
    print(f"matrix took {time.monotonic() - started:.0f} s", flush=True)
    return records


def one_line(r: dict[str, Any]) -> str:
    if r.get("mode") == "idle":
        return (
            f"{r['connected']} idle connections: RSS {r['server_rss_after_mb']} MB "
            f"({r['kb_per_connection']} KB each)"
        )
    lat = r["latency_ms"]
    return (
        f"{r['delivered_fps']:,} frames/s, {100 * (r['delivered_fraction'] or 0):.2f} % delivered, "
        f"p50 {lat['p50']} / p99 {lat['p99']} ms, server {r['server_cpu_pct']} %, "
        f"client {'/'.join(str(c) for c in r['client_cpu_pct'])} %, noise {r['noise_pct']} %"
    )


# -- tables --------------------------------------------------------------------------------


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _row(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(_fmt(c) for c in cells) + " |"


def client_busy(r: dict[str, Any]) -> tuple[float, float]:
    """The busiest client process (% of a core) and the busiest non-server CPU (%)."""
    client = max(r.get("client_cpu_pct") or [math.nan])
    server_cpus = set(str(r.get("matrix", {}).get("server_cpu", "0")).split(","))
    busy = [v for c, v in (r.get("cpu_busy_pct") or {}).items() if c not in server_cpus]
    return client, max(busy, default=math.nan)


def saturated(r: dict[str, Any]) -> bool:
    client, core = client_busy(r)
    return client >= SATURATED_PCT or core >= 97.0


def fanout_rows(records: Sequence[dict[str, Any]]) -> list[str]:
    head = [
        "N",
        "msg/s",
        "frames/s offered",
        "frames/s delivered",
        "delivered",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "p99.9 ms",
        "max ms",
        "publisher lag p99 ms",
        "server CPU %",
        "server µs/frame",
        "server peak RSS MB",
        "client CPU %",
        "load core busy %",
        "client saturated",
        "noise %",
    ]
    lines = [_row(head), _row(["---"] * len(head))]
    for r in sorted(records, key=lambda r: (r["subscribers"], r["rate"])):
        lat = r["latency_ms"]
        client, core = client_busy(r)
        lines.append(
            _row(
                [
                    r["subscribers"],
                    int(r["rate"]),
                    int(r["subscribers"] * r["rate"]),
                    r["delivered_fps"],
                    f"{100 * (r['delivered_fraction'] or 0):.2f} %",
                    lat["p50"],
                    lat["p90"],
                    lat["p99"],
                    lat["p99.9"],
                    lat["max"],
                    (r.get("publisher_lag_ms") or {}).get("p99"),
                    r["server_cpu_pct"],
                    r["server_us_per_frame"],
                    r["server_peak_rss_mb"],
                    client,
                    core,
                    "yes" if saturated(r) else "no",
                    r.get("noise_pct"),
                ]
            )
        )
    return lines


def idle_rows(records: Sequence[dict[str, Any]]) -> list[str]:
    head = ["connections", "RSS before MB", "RSS after MB", "KB per connection", "target"]
    rows = [
        _row(
            [
                r["connected"],
                r["server_rss_before_mb"],
                r["server_rss_after_mb"],
                r["kb_per_connection"],
                f"<= {IDLE_TARGET_MB} MB: {'met' if r.get('target_met') else 'missed'}",
            ]
        )
        for r in records
    ]
    return [_row(head), _row(["---"] * len(head)), *rows]


def target_rows(records: Sequence[dict[str, Any]]) -> list[str]:
    lines = [
        _row(["target", "goal", "measured p99 ms", "delivered", "verdict"]),
        _row(["---"] * 5),
    ]
    for name, n, rate, limit in TARGETS:
        runs = [r for r in records if r["subscribers"] == n and r["rate"] == rate]
        if not runs:
            continue
        p99s = [r["latency_ms"]["p99"] for r in runs]
        fractions = [r["delivered_fraction"] or 0 for r in runs]
        all_in = all(f >= 1.0 for f in fractions)
        met = all(p is not None and p <= limit for p in p99s) and (name == "a" or all_in)
        lines.append(
            _row(
                [
                    f"{name}. N={n:,}, {rate:,} msg/s",
                    f"p99 <= {limit:g} ms" + ("" if name == "a" else ", all delivered"),
                    " / ".join(_fmt(p) for p in p99s),
                    " / ".join(f"{100 * f:.2f} %" for f in fractions),
                    "met" if met else "missed",
                ]
            )
        )
    return lines


def previous_quick(jsonl_dir: Path) -> dict[tuple[int, int], Any]:
    """The latest quick record of each cell in this directory, read before a quick run."""
    prev: dict[tuple[int, int], Any] = {}
    for path in sorted(jsonl_dir.glob("fanout-matrix-quick-*.jsonl")):
        with path.open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    if r.get("mode") == "fanout":
                        prev[(r["subscribers"], int(r["rate"]))] = r
    return prev


def compare_rows(records: Sequence[dict[str, Any]], prev: dict[tuple[int, int], Any]) -> list[str]:
    head = ["N", "msg/s", "p99 ms now", "p99 ms before", "µs/frame now", "µs/frame before", "at"]
    lines = [_row(head), _row(["---"] * len(head))]
    for r in sorted(records, key=lambda r: (r["subscribers"], r["rate"])):
        p = prev.get((r["subscribers"], int(r["rate"])))
        if p is None:
            continue
        lines.append(
            _row(
                [
                    r["subscribers"],
                    int(r["rate"]),
                    r["latency_ms"]["p99"],
                    p["latency_ms"]["p99"],
                    r["server_us_per_frame"],
                    p["server_us_per_frame"],
                    p.get("machine", {}).get("etherd_commit"),
                ]
            )
        )
    return lines if len(lines) > 2 else []


def markdown(
    records: Sequence[dict[str, Any]],
    machine: dict[str, Any],
    args: argparse.Namespace,
    plots: Sequence[str],
) -> str:
    fan = [r for r in records if r.get("mode") == "fanout"]
    idle = [r for r in records if r.get("mode") == "idle"]
    durations = sorted({r["duration_s"] for r in fan})
    lines = [
        f"# Fan-out matrix{' (quick)' if args.quick else ''}, {args.date}",
        "",
        *header_lines(machine),
        f"- Server pinned to core {args.server_cpu}; subscribers (`--client {args.client}`), "
        f"publisher and driver pinned to core {args.client_cpus}; loopback, SQLite, "
        f"non-durable events, one topic, {fan[0]['payload_bytes'] if fan else '?'}-byte event "
        f"JSON, open-loop publisher (one event per `POST /api/publish`), "
        f"{' / '.join(f'{d:g}' for d in durations) or '-'} s per cell, a fresh server per cell.",
        "- Produced by `python -m bench.fanout.matrix"
        + (" --quick" if args.quick else "")
        + "`; raw JSON lines next to this file. `client saturated` is yes when a client "
        f"process used >= {SATURATED_PCT:g} % of its core or the load core was >= 97 % busy: "
        "then the client side may have added latency. `noise %` is CPU used by other "
        "processes during the run (% of a core).",
        "",
    ]
    if fan:
        runs = max(Counter((r["subscribers"], r["rate"]) for r in fan).values())
        lines += [
            "## Targets",
            "",
            f"From the cells below ({runs} run{'s' if runs > 1 else ''} of "
            f"{' / '.join(f'{d:g}' for d in durations)} s per cell"
            + ("; indicative only, the targets are judged on 10 s runs" if args.quick else "")
            + "). `bench/fanout/run_targets.sh` repeats them.",
            "",
            *target_rows(fan),
            "",
        ]
    if idle:
        lines += ["## Idle connections", "", *idle_rows(idle), ""]
    if fan:
        lines += ["## Cells", "", *fanout_rows(fan), ""]
    lines += [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    return "\n".join(lines).rstrip() + "\n"


# -- plots ---------------------------------------------------------------------------------


def aggregate(records: Sequence[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    """Per N, one point per rate: medians, with min and max over repeats."""
    by_cell: dict[tuple[int, float], list[dict[str, Any]]] = {}
    for r in records:
        if r.get("mode") == "fanout" and r.get("delivered_fps"):
            by_cell.setdefault((r["subscribers"], r["rate"]), []).append(r)
    out: dict[int, list[dict[str, Any]]] = {}
    for (n, rate), runs in sorted(by_cell.items()):

        def stat(get: Any, runs: list[dict[str, Any]] = runs) -> tuple[float, float, float]:
            vals = [v for v in (get(r) for r in runs) if v is not None]
            if not vals:
                return math.nan, math.nan, math.nan
            return statistics.median(vals), min(vals), max(vals)

        out.setdefault(n, []).append(
            {
                "rate": rate,
                "fps": stat(lambda r: r["delivered_fps"]),
                "p50": stat(lambda r: r["latency_ms"]["p50"]),
                "p99": stat(lambda r: r["latency_ms"]["p99"]),
                "us": stat(lambda r: r["server_us_per_frame"]),
                "cpu": stat(lambda r: r["server_cpu_pct"]),
                "runs": len(runs),
                "saturated": any(saturated(r) for r in runs),
            }
        )
    return out


def _yerr(points: Sequence[dict[str, Any]], key: str) -> list[list[float]]:
    return [
        [p[key][0] - p[key][1] for p in points],
        [p[key][2] - p[key][0] for p in points],
    ]


SATURATED_NOTE = "open marker: load core ≥ 97 % busy (client may add latency)"


def hollow(ax: Any, points: Sequence[dict[str, Any]], key: str, colour: str, **kw: Any) -> None:
    """Redraw the points of client-limited runs with an open marker."""
    sat = [p for p in points if p["saturated"]]
    if sat:
        ax.plot(
            [p["fps"][0] for p in sat],
            [p[key][0] for p in sat],
            ls="none",
            marker=kw.get("marker", "o"),
            ms=kw.get("ms", 6),
            mfc="white",
            mec=colour,
            mew=1.5,
            zorder=4,
        )


def _fps_label(x: float, _pos: int) -> str:
    if x >= 1e6:
        return f"{x / 1e6:g}M"
    if x >= 1e3:
        return f"{x / 1e3:g}k"
    return f"{x:g}"


def plot(
    records: Sequence[dict[str, Any]], machine: dict[str, Any], out_dir: Path, title_note: str
) -> list[str]:
    """Draw fanout-latency.png and fanout-cpu.png; returns their paths."""
    import matplotlib  # type: ignore[import-not-found, unused-ignore]

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # type: ignore[import-not-found, unused-ignore]
    from matplotlib.ticker import (  # type: ignore[import-not-found, unused-ignore]
        FuncFormatter,
        LogLocator,
        NullFormatter,
    )

    def log_y(ax: Any) -> None:
        """Log scale with plain numbers at 1, 2 and 5 of each decade."""
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _pos: f"{y:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())

    def log_x(ax: Any) -> None:
        """Log scale in frames/s, labelled 10k, 20k, 50k, 100k ..."""
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(_fps_label))
        ax.xaxis.set_minor_formatter(NullFormatter())

    data = aggregate(records)
    if not data:
        return []
    colours = {
        n: c
        for n, c in zip(
            sorted(data),
            ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown"),
            strict=False,
        )
    }
    commit = machine.get("etherd_commit")
    virtual = "virtual machine" in str(machine.get("cpu_model", ""))
    sub = (
        f"etherd {commit} · {machine.get('cpu')}, {machine.get('cores')} "
        f"{'vCPUs' if virtual else 'cores'} · server pinned to one core, load on another, "
        "loopback"
    )
    paths: list[str] = []

    # (a) latency
    fig, ax = plt.subplots(figsize=(9, 6.6), dpi=120)
    for n, points in data.items():
        x = [p["fps"][0] for p in points]
        c = colours.get(n, "black")
        below = n == max(data) and len(data) > 1
        ax.errorbar(
            x,
            [p["p99"][0] for p in points],
            yerr=_yerr(points, "p99"),
            color=c,
            marker="o",
            lw=2,
            capsize=3,
            label=f"N = {n:,}: p99",
        )
        ax.errorbar(
            x,
            [p["p50"][0] for p in points],
            yerr=_yerr(points, "p50"),
            color=c,
            marker="s",
            ms=4,
            lw=1.2,
            ls="--",
            capsize=2,
            alpha=0.8,
            label=f"N = {n:,}: p50",
        )
        hollow(ax, points, "p99", c)
        hollow(ax, points, "p50", c, ms=4, marker="s")
        for p in points:
            ax.annotate(
                f"{p['rate']:g}/s",
                (p["fps"][0], p["p99"][0]),
                textcoords="offset points",
                xytext=(4, -11 if below else 5),
                fontsize=7,
                color=c,
            )
    for name, n, rate, limit in TARGETS:
        ax.plot(
            [n * rate],
            [limit],
            marker="v",
            color="crimson",
            ms=9,
            ls="none",
            label=(
                "target p99: a ≤ 10 ms and b ≤ 25 ms (N = 1,000), c ≤ 250 ms (N = 10,000)"
                if name == "a"
                else None
            ),
            zorder=5,
        )
        ax.annotate(
            name,
            (n * rate, limit),
            textcoords="offset points",
            xytext=(7, -3),
            fontsize=9,
            fontweight="bold",
            color="crimson",
        )
    log_y(ax)
    log_x(ax)
    ax.set_xlabel("delivered frames/s (N subscribers × publish rate; labels: msg/s)")
    ax.set_ylabel("publish-to-receive latency (ms, log scale)")
    ax.set_title(f"etherd fan-out latency against delivered load{title_note}", fontsize=12, pad=16)
    ax.text(0.5, 1.01, sub, transform=ax.transAxes, ha="center", va="bottom", fontsize=8)
    ax.grid(True, which="major", alpha=0.35)
    ax.grid(True, which="minor", alpha=0.12)
    ax.margins(x=0.08)
    if any(p["saturated"] for points in data.values() for p in points):
        ax.plot([], [], marker="o", mfc="white", mec="grey", ls="none", label=SATURATED_NOTE)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3)
    fig.tight_layout()
    path = out_dir / "fanout-latency.png"
    fig.savefig(path)
    plt.close(fig)
    paths.append(str(path))

    # (b) CPU per delivered frame, and the server core's load
    fig, (ax1, ax2) = plt.subplots(
        2, 1, figsize=(9, 7), dpi=120, sharex=True, gridspec_kw={"height_ratios": [3, 2]}
    )
    for n, points in data.items():
        x = [p["fps"][0] for p in points]
        c = colours.get(n, "black")
        below = n == max(data) and len(data) > 1
        ax1.errorbar(
            x,
            [p["us"][0] for p in points],
            yerr=_yerr(points, "us"),
            color=c,
            marker="o",
            lw=2,
            capsize=3,
            label=f"N = {n:,}",
        )
        ax2.errorbar(
            x,
            [p["cpu"][0] for p in points],
            yerr=_yerr(points, "cpu"),
            color=c,
            marker="o",
            lw=2,
            capsize=3,
            label=f"N = {n:,}",
        )
        hollow(ax1, points, "us", c)
        hollow(ax2, points, "cpu", c)
        for p in points:
            ax1.annotate(
                f"{p['rate']:g}/s",
                (p["fps"][0], p["us"][0]),
                textcoords="offset points",
                xytext=(4, -11 if below else 5),
                fontsize=7,
                color=c,
            )
    log_x(ax1)
    log_y(ax1)
    ax1.set_ylabel("server CPU per delivered frame\n(µs, user+sys, log scale)")
    ax1.set_title(f"etherd server CPU against delivered load{title_note}", fontsize=12, pad=16)
    ax1.text(0.5, 1.01, sub, transform=ax1.transAxes, ha="center", va="bottom", fontsize=8)
    ax1.grid(True, which="both", alpha=0.25)
    ax1.margins(x=0.08)
    if any(p["saturated"] for points in data.values() for p in points):
        ax1.plot([], [], marker="o", mfc="white", mec="grey", ls="none", label=SATURATED_NOTE)
    ax1.legend(fontsize=8)
    ax2.axhline(100, color="grey", lw=1, ls=":")
    ax2.set_ylim(0, 110)
    ax2.set_ylabel("server CPU\n(% of its one core)")
    ax2.set_xlabel("delivered frames/s (N subscribers × publish rate; labels: msg/s)")
    log_x(ax2)
    ax2.grid(True, which="both", alpha=0.25)
    fig.tight_layout()
    path = out_dir / "fanout-cpu.png"
    fig.savefig(path)
    plt.close(fig)
    paths.append(str(path))
    return paths


# -- main ----------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out_dir: Path = args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"fanout-matrix{'-quick' if args.quick else ''}-{args.date}"
    if args.side_by_side:
        stem = f"sidebyside-{args.name or args.date}"
    machine = {**machine_info(peers=args.side_by_side), "cpu_model": cpu_detail()}
    prev: dict[tuple[int, int], Any] = {}
    if args.plot_only:
        records = []
        for path in args.plot_only:
            with path.open(encoding="utf-8") as f:
                records += [json.loads(line) for line in f if line.strip()]
        if records and records[0].get("machine"):
            machine = {"cpu_model": cpu_detail(), **records[0]["machine"]}
        jsonl = args.plot_only[0]
    else:
        jsonl = out_dir / f"{stem}.jsonl"
        if args.quick:
            prev = previous_quick(out_dir)
        records = run_matrix(args, jsonl)
        if not records:
            print("no run succeeded", file=sys.stderr)
            return 1
    note = " (quick run)" if args.quick or "quick" in jsonl.name else ""
    side = args.side_by_side or any(r.get("server") == "uws" for r in records)
    try:
        if side:
            plot_stem = jsonl.stem if args.plot_only else stem
            plots = sidebyside.plot(records, machine, out_dir, plot_stem)
        else:
            plots = plot(records, machine, out_dir, note)
    except ImportError:
        print("matplotlib is not installed: pip install -e '.[bench]'; no plots", file=sys.stderr)
        plots = []
    if side:
        title = f"etherd and uWebSockets.js side by side, {args.date}"
        md = sidebyside.markdown(records, machine, title, plots)
    else:
        md = markdown(records, machine, args, plots)
    md_path = out_dir / f"{jsonl.stem if args.plot_only else stem}.md"
    md_path.write_text(md, encoding="utf-8")
    print()
    print(md)
    if args.quick and not args.plot_only:
        fan = [r for r in records if r.get("mode") == "fanout"]
        cmp = compare_rows(fan, prev)
        if cmp:
            print("Against the previous quick run in this directory:\n")
            print("\n".join(cmp) + "\n")
    rel = os.path.relpath
    print(f"wrote {rel(jsonl)}, {rel(md_path)}" + "".join(f", {rel(p)}" for p in plots))
    return 0


if __name__ == "__main__":
    sys.exit(main())
