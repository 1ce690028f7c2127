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
from collections.abc import Callable, Iterator, Sequence
from typing import Final

from prometheus_client import (
    GC_COLLECTOR,
    CollectorRegistry,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from etherd import __version__
from etherd.core.config import LogConfig
from etherd.edge.http.request import Request
from etherd.edge.http.router import OTHER_ROUTE
from etherd.services.cluster import LAG_BUCKETS
from etherd.services.stats import RuntimeStats

__all__ = ["CONTENT_TYPE", "Histogram", "Metrics"]

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


def _cumulative(bounds: Sequence[float], counts: Sequence[int]) -> list[tuple[str, float]]:
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
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(EtherdCollector(self))
        self.registry.register(ProcessCollector(registry=None))
        self.registry.register(PlatformCollector(registry=None))
        self.registry.register(GC_COLLECTOR)

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

    # -- exposition ------------------------------------------------------------------------

    def render(self) -> bytes:
        """The text exposition of every metric."""
        return generate_latest(self.registry)


class EtherdCollector(Collector):
    """Builds etherd's metric families from the plain counters at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        st = m.stats

        yield _gauge("etherd_build_info", "etherd version", 1, {"version": __version__})
        yield _gauge("etherd_start_time_seconds", "Unix time etherd started", st.started_at)
        yield _gauge("etherd_draining", "1 while a graceful stop is under way", int(st.draining))

        # Connections and subscriptions.
        yield _gauge(
            "etherd_websocket_connections_open", "Open WebSocket sessions", st.sessions_open
        )
        yield _counter(
            "etherd_websocket_connections_accepted",
            "WebSocket sessions accepted since start",
            st.sessions_accepted,
        )
        yield _gauge(
            "etherd_http_connections",
            "Open HTTP connections (not yet upgraded or streaming)",
            st.http_connections,
        )
        yield _gauge("etherd_sse_streams", "Open Server-Sent Events streams", st.sse_streams)
        yield _gauge(
            "etherd_subscriptions",
            "Subscriptions held (topic or pattern, subscriber)",
            st.subscriptions,
        )
        yield _gauge("etherd_topics", "Distinct topics and patterns with a subscriber", st.topics)

        # Fan-out.
        yield _counter("etherd_messages_published", "Events published to the hub", st.published)
        yield _counter(
            "etherd_messages_delivered",
            "Event frames queued for subscribers (one per event per subscriber)",
            st.delivered,
        )
        yield _counter(
            "etherd_writes", "Socket writes by the fan-out (coalesced frames)", st.writes
        )
        yield _counter("etherd_bytes_written", "Bytes written by the fan-out", st.bytes_written)
        slow = CounterMetricFamily(
            "etherd_slow_consumer_closes",
            "Connections closed because their unsent bytes passed the cap, by kind",
            labels=["kind"],
        )
        closes = st.slow_consumer_closes
        for kind in ("ws", "sse"):
            slow.add_metric([kind], closes.get(kind, 0))
        yield slow

        # HTTP.
        requests = CounterMetricFamily(
            "etherd_http_requests",
            "HTTP responses by route template and status",
            labels=["route", "status"],
        )
        for (route, status), n in sorted(m.responses.items()):
            requests.add_metric([route, str(status)], n)
        yield requests
        durations = HistogramMetricFamily(
            "etherd_http_request_duration_seconds",
            "Time from a request's arrival to its response, by route template",
            labels=["route"],
        )
        for route, hist in sorted(m.latency.items()):
            durations.add_metric([route], hist.cumulative(), hist.sum)
        yield durations
        yield _gauge("etherd_http_requests_in_flight", "Requests being handled", st.inflight)

        # Event loop.
        yield _histogram(
            "etherd_event_loop_lag_seconds",
            f"How late the event loop wakes from a {LOOP_LAG_INTERVAL_S:g} s sleep",
            m.loop_lag,
        )
        yield _gauge(
            "etherd_event_loop_lag_last_seconds",
            "The latest event loop lag measurement",
            m.loop_lag_last,
        )

        # Store.
        yield _gauge("etherd_store_up", "1 while the event log store answers", int(st.store_up))
        yield _counter("etherd_store_commits", "Group commits that succeeded", st.commits)
        yield _counter("etherd_store_rows", "Events stored by group commits", st.rows)
        yield _counter(
            "etherd_store_errors", "Group commits that failed (outage or error)", st.store_errors
        )
        yield _gauge("etherd_store_queue_rows", "Events waiting for a commit", st.queue_rows)
        yield _histogram("etherd_store_batch_rows", "Events per group commit", m.batch_rows)
        yield _histogram(
            "etherd_store_commit_duration_seconds", "Time of one group commit", m.commit_seconds
        )

        bus = st.bus
        cluster = st.cluster
        if bus is not None and cluster is not None:
            yield _gauge(
                "etherd_cluster_bus_connected", "1 while the bus is connected", bus.connected
            )
            yield _gauge("etherd_cluster_peers", "Other nodes heard from lately", bus.peers)
            yield _gauge(
                "etherd_cluster_leader",
                "1 while this node runs the cluster-wide duties",
                st.leading,
            )
            yield _counter(
                "etherd_cluster_events_published", "Events sent on the bus", cluster.published
            )
            yield _counter(
                "etherd_cluster_events_dropped",
                "Events that could not be sent on the bus (the others read them from the log)",
                cluster.dropped,
            )
            yield _counter(
                "etherd_cluster_events_received",
                "Events received from other nodes",
                cluster.received,
            )
            yield _counter(
                "etherd_cluster_bad_messages",
                "Malformed or foreign messages on etherd's subjects, dropped",
                cluster.bad_messages,
            )
            yield _counter(
                "etherd_cluster_gap_fills",
                "Reads of the log for offsets the bus did not bring in time",
                cluster.gaps_filled,
            )
            yield _counter(
                "etherd_cluster_gap_events",
                "Events those reads brought",
                cluster.gap_events,
            )
            yield _counter(
                "etherd_cluster_catch_ups",
                "Catch-ups of every followed topic from the log (bus back, slow consumer)",
                cluster.catch_ups,
            )
            lag = HistogramMetricFamily(
                "etherd_cluster_lag_seconds",
                "How late events from other nodes arrive (their commit to here)",
                buckets=_cumulative(LAG_BUCKETS, cluster.lag_counts),
                sum_value=cluster.lag_sum,
            )
            yield lag
        counts = st.task_counts
        if counts is not None:
            tasks = GaugeMetricFamily("etherd_tasks", "Tasks by status", labels=["status"])
            for task_status, count in sorted(counts.items()):
                tasks.add_metric([task_status], count)
            yield tasks


def _gauge(
    name: str, doc: str, value: float, labels: dict[str, str] | None = None
) -> GaugeMetricFamily:
    if labels is None:
        return GaugeMetricFamily(name, doc, value=value)
    family = GaugeMetricFamily(name, doc, labels=list(labels))
    family.add_metric(list(labels.values()), value)
    return family


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _histogram(name: str, doc: str, hist: Histogram) -> HistogramMetricFamily:
    return HistogramMetricFamily(name, doc, buckets=hist.cumulative(), sum_value=hist.sum)
