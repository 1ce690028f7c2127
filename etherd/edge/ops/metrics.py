"""Prometheus metrics for ``GET /metrics``, read from plain counters at scrape time.

The hot path never touches a metrics library: the hub, the sessions, the HTTP edge and the
store batcher increment plain ``int`` attributes (no locks, no allocations), read through
``services.stats.RuntimeStats``; the histograms here are a precomputed tuple of bucket
bounds plus a list of ints (one ``bisect`` and two additions per observation). At scrape
time ``EtherdCollector`` reads them all and builds the metric families;
``prometheus_client`` writes the text exposition format. Each ``Metrics`` has its own
registry, so several servers in one process (tests) never share or double-register
collectors.

HTTP requests are labelled by route *template* (``/api/tasks/{id}``), never by the raw path,
so the label set stays bounded; paths no route matches are labelled ``other``.

Metric names and meanings are listed in ``docs/operations.md``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Final

from etherd.core.config import LogConfig
from etherd.edge.http.request import Request
from etherd.edge.http.router import OTHER_ROUTE
from etherd.services.stats import RuntimeStats

__all__ = ["CONTENT_TYPE", "Histogram", "Metrics", "cumulative"]

# The classic text format: every name etherd exposes is a legal pre-UTF-8 name, and every
# Prometheus server and agent reads this version.
CONTENT_TYPE: Final = b"text/plain; version=0.0.4; charset=utf-8"

# Seconds. HTTP answers are usually sub-millisecond; commits wait for fsync.
LATENCY_BUCKETS: Final = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
BATCH_ROW_BUCKETS: Final = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)
LOOP_LAG_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
LOOP_LAG_INTERVAL_S: Final = 0.5

access_log = logging.getLogger("etherd.access")


class Histogram:
    """A cheap histogram: fixed upper bounds, an int per bucket, a running sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        if list(self.bounds) != sorted(set(self.bounds)):
            raise ValueError("histogram bounds must be strictly increasing")
        # counts[i] holds observations v with bounds[i-1] < v <= bounds[i]; the last one +Inf.
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """Count one observation."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        """Observations so far."""
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, float]]:
        """Prometheus buckets: ``(le, observations <= le)``, ending with ``+Inf``."""
        out: list[tuple[str, float]] = []
        total = 0
        for bound, n in zip(self.bounds, self.counts, strict=False):
            total += n
            out.append((_le(bound), total))
        out.append(("+Inf", total + self.counts[-1]))
        return out


def cumulative(bounds: Sequence[float], counts: Sequence[int]) -> list[tuple[str, float]]:
    """Prometheus buckets from per-bucket counts (the last one +Inf)."""
    out: list[tuple[str, float]] = []
    total = 0
    for bound, n in zip(bounds, counts, strict=False):
        total += n
        out.append((_le(bound), total))
    out.append(("+Inf", total + counts[-1]))
    return out


def _le(bound: float) -> str:
    return repr(float(bound))


class Metrics:
    """Metrics state of one server: HTTP counters and histograms, loop lag, store commits.

    ``template(method, path)`` names the route a request matched (the router's);
    ``log_config()`` says whether to write the access log (re-read per request).
    """

    def __init__(
        self,
        stats: RuntimeStats,
        template: Callable[[str, str], str],
        log_config: Callable[[], LogConfig],
    ) -> None:
        self.stats = stats
        self._template = template
        self._log_config = log_config
        # (route template, status) -> answered requests.
        self.responses: Counter[tuple[str, int]] = Counter()
        self.latency: dict[str, Histogram] = {}
        self.loop_lag = Histogram(LOOP_LAG_BUCKETS)
        self.loop_lag_last = 0.0
        self.batch_rows = Histogram(BATCH_ROW_BUCKETS)
        self.commit_seconds = Histogram(LATENCY_BUCKETS)
        # The prometheus_client registry, made by ``exposition`` on the first scrape: the
        # library is imported only then (about 4 MB a process that is never scraped keeps).
        self.registry: object | None = None

    # -- hooks -----------------------------------------------------------------------------

    def response(self, request: Request | None, status: int) -> None:
        """Count one answered request; log it when ``log.access_log`` is on."""
        if request is None:
            self.responses[(OTHER_ROUTE, status)] += 1
            return
        route = self._template(request.method, request.path)
        self.responses[(route, status)] += 1
        seconds = time.perf_counter() - request.received
        hist = self.latency.get(route)
        if hist is None:
            hist = self.latency[route] = Histogram(LATENCY_BUCKETS)
        hist.observe(seconds)
        if self._log_config().access_log:
            ms = round(seconds * 1000, 3)
            access_log.info(
                '%s "%s %s" %d %.3fms',
                request.peer,
                request.method,
                request.path,
                status,
                ms,
                extra={
                    "method": request.method,
                    "path": request.path,
                    "route": route,
                    "status": status,
                    "duration_ms": ms,
                    "peer": request.peer,
                },
            )

    def on_commit(self, seconds: float, rows: int) -> None:
        """The batcher's hook: one successful group commit."""
        self.batch_rows.observe(rows)
        self.commit_seconds.observe(seconds)

    async def measure_loop_lag(self, interval: float = LOOP_LAG_INTERVAL_S) -> None:
        """Forever: sleep ``interval`` and record how late the loop woke up."""
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await asyncio.sleep(interval)
            lag = max(0.0, loop.time() - started - interval)
            self.loop_lag_last = lag
            self.loop_lag.observe(lag)
