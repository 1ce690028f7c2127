"""Turn the driver's JSON lines into Markdown tables.

    python -m bench.fanout.report bench/results/fanout-runs.jsonl > table.md

One table for fan-out runs, one for idle runs, and the diagnostics of traced runs
(``--per-message`` and ``--trace-server``). The machine header comes from the first record.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from typing import Any

TARGETS: dict[str, str] = {
    "a": "p99 <= 10 ms",
    "b": "all delivered, p99 <= 25 ms",
    "c": "all delivered, p99 <= 250 ms",
    "d": "<= 100 MB",
}


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _row(cells: Iterable[Any]) -> str:
    return "| " + " | ".join(_fmt(c) for c in cells) + " |"


def machine_header(record: dict[str, Any]) -> list[str]:
    m = record.get("machine", {})
    return [
        f"- Machine: {m.get('cpu')}, {m.get('cores')} cores, {m.get('ram_gb')} GB RAM, "
        f"kernel {m.get('kernel')}",
        f"- Python {m.get('python')}, uvloop {m.get('uvloop')}, picows {m.get('picows')}, "
        f"msgspec {m.get('msgspec')}, httptools {m.get('httptools')}, "
        f"asyncpg {m.get('asyncpg')}",
        f"- etherd commit {m.get('etherd_commit')}"
        + (f" ({m['etherd_tree']})" if m.get("etherd_tree") else ""),
    ]


def fanout_table(records: Sequence[dict[str, Any]]) -> list[str]:
    head = [
        "run",
        "N",
        "msg/s",
        "client",
        "timed",
        "delivered",
        "frames/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "p99.9 ms",
        "max ms",
        "server CPU %",
        "µs/frame",
        "server peak RSS MB",
        "client CPU %",
        "noise %",
    ]
    lines = [_row(head), _row(["---"] * len(head))]
    for r in records:
        lat = r["latency_ms"]
        lines.append(
            _row(
                [
                    f"{r['label']}#{r.get('run', 1)}",
                    r["subscribers"],
                    r["rate"],
                    r.get("client", "picows"),
                    "all" if r.get("sample_every", 1) == 1 else f"1/{r['sample_every']}",
                    f"{100 * (r['delivered_fraction'] or 0):.2f} %",
                    r["delivered_fps"],
                    lat["p50"],
                    lat["p90"],
                    lat["p99"],
                    lat["p99.9"],
                    lat["max"],
                    r["server_cpu_pct"],
                    r["server_us_per_frame"],
                    r["server_peak_rss_mb"],
                    "/".join(_fmt(c) for c in r["client_cpu_pct"]),
                    r.get("noise_pct"),
                ]
            )
        )
    return lines


def idle_table(records: Sequence[dict[str, Any]]) -> list[str]:
    head = [
        "run",
        "connections",
        "subscribed",
        "RSS before MB",
        "RSS after MB",
        "KB per connection",
        "connect s",
    ]
    rows = [
        _row(
            [
                r["label"],
                r["connected"],
                r["subscribed"],
                r["server_rss_before_mb"],
                r["server_rss_after_mb"],
                r["kb_per_connection"],
                r["connect_s"],
            ]
        )
        for r in records
    ]
    return [_row(head), _row(["---"] * len(head)), *rows]


def diagnostics(records: Sequence[dict[str, Any]]) -> list[str]:
    out: list[str] = []
    for r in records:
        pm = r.get("per_message")
        tr = r.get("server_trace")
        if not pm and not tr:
            continue
        out.append(f"**{r['label']}** ({r.get('subscribers', r.get('connections'))} conns)")
        out.append("")
        if pm:
            for key in ("first_arrival_ms", "last_arrival_ms", "spread_ms"):
                v = pm[key]
                out.append(
                    f"- per message, {key[:-3].replace('_', ' ')}: p50 {v['p50']} / "
                    f"p90 {v['p90']} / p99 {v['p99']} / max {v['max']} ms"
                )
        if tr:
            for key in ("flush", "publish_to_flushed", "loop_lag_5ms_tick"):
                v = tr.get(key, {})
                if v.get("count"):
                    out.append(
                        f"- server {key.replace('_', ' ')}: n={v['count']}, p50 {v['p50']} / "
                        f"p90 {v['p90']} / p99 {v['p99']} / max {v['max']} ms"
                    )
            gcs = [
                f"gen{g}: {v['count']} (max {v.get('max', 0)} ms)"
                for g, v in tr.get("gc", {}).items()
            ]
            if gcs:
                out.append("- server GC collections: " + ", ".join(gcs))
            if "tracemalloc_growth_kb" in tr:
                out.append(f"- Python allocations grew {tr['tracemalloc_growth_kb']} KB; top:")
                out.extend(
                    f"  - {t['where']}: {t['kb']} KB in {t['count']} blocks"
                    for t in tr["tracemalloc_top"][:12]
                )
        out.append("")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print("usage: python -m bench.fanout.report RUNS.jsonl", file=sys.stderr)
        return 2
    records: list[dict[str, Any]] = []
    for path in args:
        with open(path, encoding="utf-8") as f:
            records.extend(json.loads(line) for line in f if line.strip())
    if not records:
        return 0
    fan = [r for r in records if r.get("mode") == "fanout"]
    idle = [r for r in records if r.get("mode") == "idle"]
    lines = [*machine_header(records[0]), ""]
    if fan:
        lines += [*fanout_table(fan), ""]
    if idle:
        lines += [*idle_table(idle), ""]
    lines += diagnostics(records)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
