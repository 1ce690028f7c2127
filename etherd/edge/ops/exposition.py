"""The Prometheus text exposition of ``Metrics``: built from the plain counters at scrape
time by ``EtherdCollector``, written by ``prometheus_client``.

Imported on the first scrape only, so a process that is never scraped does not load the
library. Each ``Metrics`` gets its own registry, so several servers in one process (tests)
never share or double-register collectors.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import cast

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
from etherd.edge.ops.metrics import LOOP_LAG_INTERVAL_S, Histogram, Metrics, cumulative
from etherd.services.cluster import LAG_BUCKETS

__all__ = ["EtherdCollector", "render"]


def render(metrics: Metrics) -> bytes:
    """The text exposition of every metric of ``metrics`` (and of the process)."""
    registry = metrics.registry
    if registry is None:
        built = CollectorRegistry(auto_describe=False)
        built.register(EtherdCollector(metrics))
        built.register(ProcessCollector(registry=None))
        built.register(PlatformCollector(registry=None))
        built.register(GC_COLLECTOR)
        metrics.registry = registry = built
    return generate_latest(cast(CollectorRegistry, registry))


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
        refused = CounterMetricFamily(
            "etherd_replays_refused",
            "Resumes refused because realtime.max_replay_bytes was in flight, by kind",
            labels=["kind"],
        )
        for kind in ("ws", "sse"):
            refused.add_metric([kind], st.replays_refused.get(kind, 0))
        yield refused
        yield GaugeMetricFamily(
            "etherd_replay_bytes",
            "Replay bytes read from the store and not yet taken by their clients",
            value=st.replay_bytes,
        )
        hits = CounterMetricFamily(
            "etherd_limit_hits",
            "Requests refused and connections closed because a configured limit was hit, "
            "by the limit's configuration key",
            labels=["limit"],
        )
        for key, n in sorted(st.limit_hits.items()):
            hits.add_metric([key], n)
        yield hits

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
            yield _counter(
                "etherd_cluster_tail_reads",
                "Topics read from the log because their newest events never came on the bus",
                cluster.tail_reads,
            )
            lag = HistogramMetricFamily(
                "etherd_cluster_lag_seconds",
                "How late events from other nodes arrive (their commit to here)",
                buckets=cumulative(LAG_BUCKETS, cluster.lag_counts),
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
