"""etherd's ``/metrics`` (Prometheus text), read into plain numbers for window deltas."""

from __future__ import annotations

import re
import urllib.request
from dataclasses import dataclass, field
from typing import Any

_LE = re.compile(r'le="([^"]+)"')
_ROUTE = re.compile(r'route="([^"]+)"')


@dataclass
class Scrape:
    """One ``/metrics`` answer.

    ``values``: each sample summed over its labels under its name, and, for samples with a
    ``route`` label, also under ``name|route``. ``buckets``: histogram name -> ``le`` ->
    cumulative count (summed over other labels).
    """

    values: dict[str, float] = field(default_factory=dict)
    buckets: dict[str, dict[str, float]] = field(default_factory=dict)

    def delta(self, before: Scrape, name: str) -> float:
        """How much ``name`` grew since ``before``."""
        return self.values.get(name, 0.0) - before.values.get(name, 0.0)


def parse(text: str) -> Scrape:
    """Parse Prometheus text format (the subset etherd writes)."""
    out = Scrape()
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value_text = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        try:
            value = float(value_text)
        except ValueError:
            continue
        if name.endswith("_bucket"):
            m = _LE.search(name_labels)
            if m:
                le = out.buckets.setdefault(name[: -len("_bucket")], {})
                le[m.group(1)] = le.get(m.group(1), 0.0) + value
            continue
        out.values[name] = out.values.get(name, 0.0) + value
        m = _ROUTE.search(name_labels)
        if m:
            key = f"{name}|{m.group(1)}"
            out.values[key] = out.values.get(key, 0.0) + value
    return out


def scrape(port: int, token: str = "test", host: str = "127.0.0.1") -> Scrape:
    """GET ``/metrics`` with a Bearer token."""
    request = urllib.request.Request(
        f"http://{host}:{port}/metrics", headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(request, timeout=30) as resp:
        return parse(resp.read().decode())


def histogram_delta(before: Scrape, after: Scrape, name: str) -> dict[str, Any]:
    """A histogram's observations over a window: count, sum, mean, p50/p90 bucket, buckets."""
    count = after.delta(before, f"{name}_count")
    total = after.delta(before, f"{name}_sum")
    cum_after = after.buckets.get(name, {})
    cum_before = before.buckets.get(name, {})
    per: dict[str, int] = {}
    previous = 0.0
    for le, cum in cum_after.items():
        n = cum - cum_before.get(le, 0.0)
        if n - previous > 0:
            per[le] = int(n - previous)
        previous = n

    def quantile(q: float) -> str | None:
        if count <= 0:
            return None
        for le, cum in cum_after.items():
            if cum - cum_before.get(le, 0.0) >= q * count:
                return f"<= {le}"
        return None

    return {
        "count": int(count),
        "sum": round(total, 6),
        "mean": round(total / count, 3) if count else None,
        "p50_bucket": quantile(0.5),
        "p90_bucket": quantile(0.9),
        "histogram": per,
    }


def commit_figures(before: Scrape, after: Scrape, elapsed_s: float) -> dict[str, Any]:
    """The group commit over a window: commits, rows, their mean size and time, and the
    share of the window the commit pipeline was busy."""
    commit_s = after.delta(before, "etherd_store_commit_duration_seconds_sum")
    commits = after.delta(before, "etherd_store_commit_duration_seconds_count")
    rows = after.delta(before, "etherd_store_rows_total")
    return {
        "commit_s": round(commit_s, 3),
        "commits": int(commits),
        "rows": int(rows),
        "rows_per_s": round(rows / elapsed_s, 1) if elapsed_s > 0 else None,
        "rows_per_commit": round(rows / commits, 1) if commits else None,
        "mean_commit_ms": round(1000 * commit_s / commits, 3) if commits else None,
        "busy_pct_of_window": round(100 * commit_s / elapsed_s, 1) if elapsed_s > 0 else None,
    }


def handler_mean_ms(before: Scrape, after: Scrape, route: str) -> float | None:
    """Mean time etherd spent in one route's handler over a window (ms)."""
    total = after.delta(before, f"etherd_http_request_duration_seconds_sum|{route}")
    count = after.delta(before, f"etherd_http_request_duration_seconds_count|{route}")
    return round(1000 * total / count, 3) if count else None
