"""etherd next to the uWebSockets.js peer: the standard fan-out cells, tables and plots.

Run from the repository root (``make bench-client bench-peers`` first)::

    python -m bench.fanout.matrix --side-by-side --rounds 3 --name baseline-2026-12-01
    python -m bench.fanout.matrix --side-by-side --plot-only bench/results/sidebyside-X.jsonl

Each cell is one driver process with ``--peers etherd,uws --rounds R``: the two servers
alternate run by run (etherd, uws, etherd, uws, ...), each run on a fresh server pinned to
the server core, with the C client and the publisher on the load core. A performance
claim is the ratio etherd / uWS measured in the same process, minutes apart.

Output in ``--out-dir`` (default ``bench/results``): ``sidebyside-<label>.jsonl`` (every
run), ``sidebyside-<label>.md`` (the machine header, one row per cell and server with the
medians over rounds, the ratios, noise) and ``sidebyside-<label>-latency.png`` /
``sidebyside-<label>-cpu.png`` (one line per server).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

from bench.common.machine import header_lines

# The standard cells: (subscribers, msg/s); 0 msg/s is the idle-connections cell.
STANDARD: Final = ((1000, 100), (1000, 1000), (10000, 100), (10000, 1), (10000, 0))
SERVERS: Final = ("etherd", "uws")
COLOURS: Final = {"etherd": "tab:blue", "uws": "tab:orange"}


def cell_of(r: dict[str, Any]) -> tuple[int, int]:
    """``(N, msg/s)`` of a record; idle runs are ``(N, 0)``."""
    if r.get("mode") == "idle":
        return int(r["connections"]), 0
    return int(r["subscribers"]), int(r["rate"])


def cell_name(cell: tuple[int, int]) -> str:
    n, rate = cell
    return f"{n:,} idle" if rate == 0 else f"{n:,} x {rate:,}/s"


def driver_args(cell: tuple[int, int], duration: float) -> list[str]:
    """The driver's arguments for one standard cell."""
    n, rate = cell
    if rate == 0:
        return ["--idle", str(n)]
    return ["-n", str(n), "--rate", str(rate), "--duration", str(duration), "--client", "c"]


def _median(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(vals) if vals else None


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}g}" if abs(v) < 1000 else f"{v:,.0f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def _row(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(_fmt(c) if not isinstance(c, str) else c for c in cells) + " |"


Getter = Callable[[dict[str, Any]], float | None]

FANOUT: Final[dict[str, Getter]] = {
    "p50 ms": lambda r: r["latency_ms"]["p50"],
    "p99 ms": lambda r: r["latency_ms"]["p99"],
    "server µs/frame": lambda r: r["server_us_per_frame"],
    "delivered %": lambda r: 100 * (r["delivered_fraction"] or 0),
    "server CPU %": lambda r: r["server_cpu_pct"],
    "load core busy %": lambda r: max(
        (v for c, v in (r.get("cpu_busy_pct") or {}).items() if c != "0"), default=None
    ),
}
IDLE: Final[dict[str, Getter]] = {
    "RSS MB": lambda r: r["server_rss_after_mb"],
    "RSS KB / connection": lambda r: r["rss_kb_per_connection"],
}
# The figures the ratio row divides (the rest are context).
RATIO_KEYS: Final = ("p50 ms", "p99 ms", "server µs/frame", "delivered %", "RSS MB")


def current(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records a table shows: those not ``superseded`` by a rerun of their cell."""
    return [r for r in records if not r.get("superseded")]


def by_cell(records: Sequence[dict[str, Any]]) -> dict[tuple[int, int], dict[str, list[Any]]]:
    """cell -> server -> its records, in run order (superseded runs left out)."""
    out: dict[tuple[int, int], dict[str, list[Any]]] = {}
    for r in current(records):
        out.setdefault(cell_of(r), {}).setdefault(r.get("server", "etherd"), []).append(r)
    return out


def medians(runs: Sequence[dict[str, Any]], getters: dict[str, Getter]) -> dict[str, Any]:
    return {k: _median([g(r) for r in runs]) for k, g in getters.items()}


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a is not None and b else None


def table(records: Sequence[dict[str, Any]]) -> list[str]:
    """One row per cell and server (medians over rounds), then etherd / uWS."""
    lines: list[str] = []
    cells = by_cell(records)
    fan = [c for c in cells if c[1] > 0]
    idle = [c for c in cells if c[1] == 0]
    if fan:
        head = ["cell", "server", "runs", *FANOUT, "p99 ratio per round", "noise % (max)"]
        lines += [_row(head), _row(["---"] * len(head))]
        for cell in sorted(fan, key=lambda c: STANDARD.index(c) if c in STANDARD else 99):
            lines += _cell_rows(cell, cells[cell], FANOUT, lambda r: r["latency_ms"]["p99"])
        lines.append("")
    if idle:
        head = ["cell", "server", "runs", *IDLE, "RSS ratio per round", "noise % (max)"]
        lines += [_row(head), _row(["---"] * len(head))]
        for cell in idle:
            lines += _cell_rows(cell, cells[cell], IDLE, lambda r: r["server_rss_after_mb"])
        lines.append("")
    return lines


def _cell_rows(
    cell: tuple[int, int],
    servers: dict[str, list[dict[str, Any]]],
    getters: dict[str, Getter],
    per_round: Getter,
) -> list[str]:
    rows: list[str] = []
    meds = {s: medians(runs, getters) for s, runs in servers.items()}
    for server in [s for s in SERVERS if s in servers]:
        runs = servers[server]
        noise = max((r.get("noise_pct") or 0.0 for r in runs), default=None)
        rows.append(
            _row(
                [
                    cell_name(cell),
                    server,
                    len(runs),
                    *meds[server].values(),
                    "",
                    noise if runs[0].get("mode") != "idle" else "-",
                ]
            )
        )
    if "etherd" in meds and "uws" in meds:
        e, u = meds["etherd"], meds["uws"]
        rounds = [
            ratio(per_round(a), per_round(b))
            for a, b in zip(servers["etherd"], servers["uws"], strict=False)
        ]
        rows.append(
            _row(
                [
                    f"**{cell_name(cell)}**",
                    "**etherd / uWS**",
                    "",
                    *(f"**{_fmt(ratio(e[k], u[k]))}**" if k in RATIO_KEYS else "" for k in e),
                    " / ".join(_fmt(x) for x in rounds),
                    "",
                ]
            )
        )
    return rows


def markdown(
    records: Sequence[dict[str, Any]], machine: dict[str, Any], title: str, plots: Sequence[str]
) -> str:
    """The result file: header, how it was measured, the table, the plots."""
    fan = [r for r in current(records) if r.get("mode") == "fanout"]
    durations = sorted({r["duration_s"] for r in fan})
    payload = fan[0]["payload_bytes"] if fan else "?"
    noisy = [r for r in fan if (r.get("noise_pct") or 0) > 5.0]
    superseded = len(records) - len(current(records))
    lines = [
        f"# {title}",
        "",
        *header_lines(machine),
        f"- Server pinned to core 0 (`taskset`); the C client (`subclient.c`), the "
        f"open-loop publisher and the driver on core 1; loopback; {payload}-byte event JSON; "
        f"non-durable events on one topic, one event per `POST /api/publish`; "
        f"{' / '.join(f'{d:g}' for d in durations) or '-'} s per run; a fresh server per "
        "run; etherd and uWS alternate run by run.",
        "- Figures are medians over the rounds; the ratio rows divide etherd's median by "
        "uWS's (above 1: etherd is slower, costlier or bigger). `noise %` is CPU other "
        "processes used during a run (% of a core), the highest over the rounds; "
        "`load core busy %` near 100 means the load side may have limited the run.",
    ]
    if noisy:
        lines.append(
            f"- {len(noisy)} of {len(fan)} runs had more than 5 % of a core of noise from "
            "other processes (other test suites on this machine); see the JSON lines."
        )
    if superseded:
        lines.append(
            f"- {superseded} runs are marked `superseded` in the JSON lines: their cell was "
            "measured again because other processes disturbed it; the table shows the rerun."
        )
    lines += ["", *table(records)]
    lines += [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    return "\n".join(lines).rstrip() + "\n"


def latency_getter(key: str) -> Getter:
    """The ``latency_ms[key]`` of a record."""

    def get(r: dict[str, Any]) -> float | None:
        value: float | None = r["latency_ms"][key]
        return value

    return get


def plot(
    records: Sequence[dict[str, Any]], machine: dict[str, Any], out_dir: Path, stem: str
) -> list[str]:
    """``STEM-latency.png`` and ``STEM-cpu.png``: one line per server."""
    import matplotlib  # type: ignore[import-not-found, unused-ignore]

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # type: ignore[import-not-found, unused-ignore]

    cells = by_cell(records)
    fan = sorted(
        (c for c in cells if c[1] > 0), key=lambda c: STANDARD.index(c) if c in STANDARD else 99
    )
    idle = [c for c in cells if c[1] == 0]
    if not fan and not idle:
        return []
    sub = (
        f"etherd {machine.get('etherd_commit')} vs {machine.get('uws')} · {machine.get('cpu')}, "
        f"{machine.get('cores')} cores · server on core 0, load on core 1, loopback"
    )
    x = list(range(len(fan)))
    labels = [cell_name(c) for c in fan]
    paths: list[str] = []

    def series(server: str, get: Getter) -> tuple[list[float], list[list[float]]]:
        mid: list[float] = []
        err: list[list[float]] = [[], []]
        for c in fan:
            vals = [v for v in (get(r) for r in cells[c].get(server, [])) if v is not None]
            m = statistics.median(vals) if vals else math.nan
            mid.append(m)
            err[0].append(m - min(vals) if vals else 0.0)
            err[1].append(max(vals) - m if vals else 0.0)
        return mid, err

    if fan:
        fig, ax = plt.subplots(figsize=(9, 5.5), dpi=120)
        for server in SERVERS:
            if not any(server in cells[c] for c in fan):
                continue
            colour = COLOURS[server]
            for key, style, marker in (("p99", "-", "o"), ("p50", "--", "s")):
                mid, err = series(server, latency_getter(key))
                ax.errorbar(
                    x,
                    mid,
                    yerr=err,
                    color=colour,
                    ls=style,
                    marker=marker,
                    capsize=3,
                    label=f"{server} {key}",
                )
        ax.set_yscale("log")
        ax.set_xticks(x, labels)
        ax.set_ylabel("publish-to-receive latency (ms, log scale)")
        ax.set_xlabel("cell: subscribers x published msg/s (median of rounds, bars: min-max)")
        ax.set_title("Fan-out latency: etherd and uWebSockets.js, same load", pad=16)
        ax.text(0.5, 1.01, sub, transform=ax.transAxes, ha="center", va="bottom", fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{stem}-latency.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(str(path))

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8), dpi=120, width_ratios=[3, 1])
    ax1, ax2 = axes
    for server in SERVERS:
        if fan and any(server in cells[c] for c in fan):
            mid, err = series(server, lambda r: r["server_us_per_frame"])
            ax1.errorbar(
                x, mid, yerr=err, color=COLOURS[server], marker="o", capsize=3, label=server
            )
    ax1.set_xticks(x, labels)
    ax1.set_yscale("log")
    ax1.set_ylabel("server CPU per delivered frame (µs, log scale)")
    ax1.set_title("Server CPU per frame", pad=16)
    ax1.text(0.5, 1.01, sub, transform=ax1.transAxes, ha="center", va="bottom", fontsize=7)
    ax1.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=8)
    if idle:
        c = idle[0]
        shown = [s for s in SERVERS if s in cells[c]]
        for j, server in enumerate(shown):
            rss = statistics.median(r["server_rss_after_mb"] for r in cells[c][server])
            ax2.bar(j, rss, color=COLOURS[server])
            ax2.annotate(f"{rss:.0f} MB", (j, rss), ha="center", va="bottom", fontsize=8)
        ax2.set_xticks(range(len(shown)), shown)
        ax2.set_title(f"Server RSS, {cell_name(c)}", pad=16)
        ax2.set_ylabel("VmRSS (MB)")
    else:
        ax2.set_axis_off()
    fig.tight_layout()
    path = out_dir / f"{stem}-cpu.png"
    fig.savefig(path)
    plt.close(fig)
    paths.append(str(path))
    return paths
