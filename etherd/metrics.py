"""Prometheus metrics for ``GET /metrics``, read from plain counters at scrape time.

The hot path never touches a metrics library: the hub, the sessions, the HTTP edge and the
store batcher increment plain ``int`` attributes (no locks, no allocations), and
``HttpCounters``' histograms are a precomputed tuple of bucket bounds plus a list of ints
(one ``bisect`` and two additions per observation). At scrape time ``EtherdCollector``
reads them all and builds the metric families; ``prometheus_client`` writes the text
exposition format. Each ``App`` has its own registry, so several apps in one process (tests)
never share or double-register collectors.

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
from typing import TYPE_CHECKING, Final, TypeVar

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
from etherd.auth import AuthError
from etherd.errors import ApiError
from etherd.http import Request, Response
from etherd.routes import Router

if TYPE_CHECKING:
    from etherd.app import App

__all__ = [
    "CONTENT_TYPE",
    "Histogram",
    "LabelledRouter",
    "Metrics",
    "metrics_endpoint",
]

H = TypeVar("H")

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
OTHER_ROUTE: Final = "other"

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


def _le(bound: float) -> str:
    return repr(float(bound))


class LabelledRouter(Router[H]):
    """A ``Router`` that also answers which route template a request matched (for labels)."""

    def __init__(self) -> None:
        super().__init__()
        self._templates: Router[str] = Router()

    def add(self, method: str, template: str, handler: H) -> None:
        super().add(method, template, handler)
        self._templates.add(method, template, template)

    def template(self, method: str, path: str) -> str:
        """The template of the route a request resolves to, or ``other``."""
        try:
            return self._templates.resolve(method, path)[0]
        except ApiError:
            return OTHER_ROUTE


class Metrics:
    """Per-app metrics state: HTTP counters and histograms, loop lag, store commits."""

    def __init__(self, app: App) -> None:
        self.app = app
        # (route template, status) -> answered requests. Shared with ``App.responses``.
        self.responses: Counter[tuple[str, int]] = app.responses
        self.latency: dict[str, Histogram] = {}
        self.loop_lag = Histogram(LOOP_LAG_BUCKETS)
        self.loop_lag_last = 0.0
        self.batch_rows = Histogram(BATCH_ROW_BUCKETS)
        self.commit_seconds = Histogram(LATENCY_BUCKETS)
        # Filled by whoever can count tasks cheaply (status -> tasks); exported when set.
        self.task_counts: Callable[[], dict[str, int]] | None = None
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
        route = self.app.router.template(request.method, request.path)
        self.responses[(route, status)] += 1
        seconds = time.perf_counter() - request.received
        hist = self.latency.get(route)
        if hist is None:
            hist = self.latency[route] = Histogram(LATENCY_BUCKETS)
        hist.observe(seconds)
        if self.app.config.log.access_log:
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
    """Builds etherd's metric families from the app's plain counters at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        app = m.app
        hub = app.hub
        batcher = app.batcher

        yield _gauge("etherd_build_info", "etherd version", 1, {"version": __version__})
        yield _gauge("etherd_start_time_seconds", "Unix time etherd started", app.started_at)
        yield _gauge("etherd_draining", "1 while a graceful stop is under way", int(app.draining))

        # Connections and subscriptions.
        yield _gauge(
            "etherd_websocket_connections_open", "Open WebSocket sessions", len(app.sessions)
        )
        yield _counter(
            "etherd_websocket_connections_accepted",
            "WebSocket sessions accepted since start",
            app.connections_total,
        )
        yield _gauge(
            "etherd_http_connections",
            "Open HTTP connections (not yet upgraded or streaming)",
            len(app.http_connections),
        )
        yield _gauge("etherd_sse_streams", "Open Server-Sent Events streams", len(app.sse_streams))
        yield _gauge(
            "etherd_subscriptions",
            "Subscriptions held (topic or pattern, subscriber)",
            hub.subscription_count,
        )
        yield _gauge(
            "etherd_topics", "Distinct topics and patterns with a subscriber", hub.topic_count
        )

        # Fan-out.
        yield _counter("etherd_messages_published", "Events published to the hub", hub.published)
        yield _counter(
            "etherd_messages_delivered",
            "Event frames queued for subscribers (one per event per subscriber)",
            hub.frames_queued,
        )
        yield _counter(
            "etherd_writes", "Socket writes by the fan-out (coalesced frames)", hub.writes
        )
        yield _counter("etherd_bytes_written", "Bytes written by the fan-out", hub.bytes_written)
        yield _counter(
            "etherd_slow_consumer_closes",
            "Connections closed because their unsent bytes passed the cap",
            app.slow_consumer_closes,
        )

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
        yield _gauge("etherd_http_requests_in_flight", "Requests being handled", app.inflight)

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
        yield _gauge("etherd_store_up", "1 while the event log store answers", int(batcher.is_up))
        yield _counter("etherd_store_commits", "Group commits that succeeded", batcher.batches)
        yield _counter("etherd_store_rows", "Events stored by group commits", batcher.rows)
        yield _counter(
            "etherd_store_errors", "Group commits that failed (outage or error)", batcher.errors
        )
        yield _gauge("etherd_store_queue_rows", "Events waiting for a commit", batcher.queued_rows)
        yield _histogram("etherd_store_batch_rows", "Events per group commit", m.batch_rows)
        yield _histogram(
            "etherd_store_commit_duration_seconds", "Time of one group commit", m.commit_seconds
        )

        if m.task_counts is not None:
            tasks = GaugeMetricFamily("etherd_tasks", "Tasks by status", labels=["status"])
            for task_status, count in sorted(m.task_counts().items()):
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


async def metrics_endpoint(app: App, request: Request) -> Response:
    """``GET /metrics``: needs an admin token when ``metrics.require_admin`` is true."""
    if app.config.metrics.require_admin:
        try:
            principal = app.auth.bearer(request.headers.get("authorization"))
        except AuthError as exc:
            raise ApiError(exc.code, exc.message) from None
        if not principal.is_admin:
            raise ApiError(
                "forbidden", "metrics need an admin token (metrics.require_admin = true)"
            )
    return Response(200, app.metrics.render(), content_type=CONTENT_TYPE)
