"""Latency histograms: log-linear buckets (cheap to fill, mergeable) and exact percentiles.

The log-linear scheme counts microseconds: exact 1 µs buckets below 1.024 ms, then 512
sub-buckets per power of two, so a bucket's midpoint is within 0.1 % of any value in it.
``bench/fanout/subclient.c`` fills the same buckets, so its sparse histograms merge with
the Python clients'.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Final, TypeVar

K = TypeVar("K")

SUB_BUCKETS_LOG2: Final = 9  # 512 sub-buckets per power of two above LINEAR_US
LINEAR_US: Final = 1 << (SUB_BUCKETS_LOG2 + 1)  # exact 1 us buckets below 1.024 ms
HIST_SIZE: Final = 64 << SUB_BUCKETS_LOG2  # covers any int64 microsecond count


def bucket_of(us: int) -> int:
    """Index of the log-linear bucket holding a latency of ``us`` microseconds."""
    if us < LINEAR_US:
        return us if us > 0 else 0
    shift = us.bit_length() - (SUB_BUCKETS_LOG2 + 1)
    return (shift << SUB_BUCKETS_LOG2) + (us >> shift)


def bucket_value(index: int) -> float:
    """The representative latency (µs) of a bucket: its midpoint."""
    if index < LINEAR_US:
        return float(index)
    shift = (index >> SUB_BUCKETS_LOG2) - 1
    low = (index - (shift << SUB_BUCKETS_LOG2)) << shift
    return low + ((1 << shift) - 1) / 2


def new_hist() -> list[int]:
    """A dense, empty histogram (one counter per bucket)."""
    return [0] * HIST_SIZE


def to_sparse(hist: Sequence[int]) -> dict[int, int]:
    """Bucket -> count for the non-empty buckets of a dense histogram (small to pickle)."""
    return {i: c for i, c in enumerate(hist) if c}


def merge(into: dict[K, int], sparse: Mapping[K, int]) -> None:
    """Add a sparse histogram (or any key -> count map) into another."""
    for k, v in sparse.items():
        into[k] = into.get(k, 0) + v


def percentiles(hist: Mapping[int, int], qs: Sequence[float]) -> list[float]:
    """Latency percentiles in microseconds (NaN for an empty histogram)."""
    total = sum(hist.values())
    if total == 0:
        return [math.nan] * len(qs)
    ranks = [max(1, math.ceil(q * total)) for q in qs]
    out: list[float] = [math.nan] * len(qs)
    seen = 0
    pending = sorted(range(len(qs)), key=lambda j: ranks[j])
    pos = 0
    for idx in sorted(hist):
        seen += hist[idx]
        while pos < len(pending) and ranks[pending[pos]] <= seen:
            out[pending[pos]] = bucket_value(idx)
            pos += 1
        if pos == len(pending):
            break
    return out


def us_to_ms(us: float) -> float | None:
    """Microseconds to milliseconds (3 decimals); None for NaN, so JSON stays valid."""
    return None if math.isnan(us) else round(us / 1000, 3)


def pct(values: Sequence[int], q: float) -> float:
    """The q-quantile (nearest rank) of nanosecond values, in milliseconds (NaN if empty)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))] / 1e6


def summary_ms(values: Iterable[int]) -> dict[str, float]:
    """p50 / p90 / p99 / p99.9 / max (ms) and the count of nanosecond values."""
    v = sorted(values)
    return {
        "p50": round(pct(v, 0.5), 3),
        "p90": round(pct(v, 0.9), 3),
        "p99": round(pct(v, 0.99), 3),
        "p999": round(pct(v, 0.999), 3),
        "max": round(pct(v, 1.0), 3),
        "count": len(v),
    }
