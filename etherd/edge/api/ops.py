"""Operations routes: ``GET /healthz`` (alive), ``GET /readyz`` (ready to serve),
``GET /metrics`` (Prometheus text format, behind an admin token unless configured off) and
``GET /api/admin/stats`` (what the operator view shows, for admin tokens)."""

from __future__ import annotations

from typing import Final, Literal

import msgspec

from etherd.core.auth import Authenticator, Principal
from etherd.core.errors import Refusal
from etherd.core.rfc3339 import rfc3339_ms
from etherd.edge.api.common import Body, Route, authenticate, json_response
from etherd.edge.api.shapes import ClusterStatus, Health, Ready
from etherd.edge.http.request import Request
from etherd.edge.http.response import Response
from etherd.edge.ops.metrics import CONTENT_TYPE, Metrics
from etherd.services.eventlog import EventLog
from etherd.services.state import ServerState
from etherd.services.stats import RateSampler, RuntimeStats

__all__ = ["OpsRoutes", "Stats"]

# Topics the operator's stats list, busiest first.
TOP_TOPICS: Final = 100


class ConnectionCounts(msgspec.Struct, kw_only=True, frozen=True):
    websocket: int
    sse: int
    # HTTP connections that are neither upgraded nor streaming.
    http: int


class TopicCount(msgspec.Struct, kw_only=True, frozen=True):
    topic: str
    subscribers: int


class RateView(msgspec.Struct, kw_only=True, frozen=True):
    published_per_s: float
    delivered_per_s: float
    commits_per_s: float
    stored_per_s: float


class StoreStatus(msgspec.Struct, kw_only=True, frozen=True):
    up: bool
    kind: Literal["sqlite", "postgresql"]
    queue_rows: int
    epoch: str


class Stats(msgspec.Struct, kw_only=True, frozen=True):
    """``GET /api/admin/stats``."""

    node: str
    started_at: str
    connections: ConnectionCounts
    subscriptions: int
    # The busiest topics and patterns (at most ``TOP_TOPICS``), most subscribers first.
    topics: list[TopicCount]
    rates: RateView
    store: StoreStatus


class OpsRoutes:
    """Health, readiness and metrics."""

    def __init__(
        self,
        auth: Authenticator,
        eventlog: EventLog,
        metrics: Metrics,
        stats: RuntimeStats,
        rates: RateSampler,
        state: ServerState,
    ) -> None:
        self.auth = auth
        self.eventlog = eventlog
        self.metrics = metrics
        self.stats = stats
        self.rates = rates
        self.state = state

    def routes(self) -> list[Route]:
        """The route table entries."""
        ops = "operations"
        return [
            Route(
                "GET",
                "/healthz",
                lambda req, p: self.healthz(req),
                summary="Alive: the event loop turns",
                responses={200: Health},
                auth=False,
                tag=ops,
            ),
            Route(
                "GET",
                "/readyz",
                lambda req, p: self.readyz(req),
                summary="Ready: the store answers and etherd is not draining",
                responses={200: Ready},
                auth=False,
                tag=ops,
            ),
            Route(
                "GET",
                "/metrics",
                lambda req, p: self.metrics_text(req),
                summary="Prometheus metrics (admin token unless metrics.require_admin = false)",
                responses={200: Body("text/plain", {"type": "string"})},
                tag=ops,
            ),
            Route(
                "GET",
                "/api/admin/stats",
                lambda req, p: self.admin_stats(req),
                summary="What the operator view shows: connections, topics, rates, the store",
                responses={200: Stats},
                tag=ops,
            ),
        ]

    async def healthz(self, request: Request) -> Response:
        """Alive: the loop turns and answers."""
        return json_response(200, Health())

    async def readyz(self, request: Request) -> Response:
        """Ready: the store answers and the server is not draining."""
        if self.state.draining:
            raise Refusal("not_ready", "draining: the server is stopping")
        if not self.eventlog.is_up:
            raise Refusal("not_ready", "the event log is unavailable")
        await self.eventlog.ping()
        bus = self.stats.bus
        cluster = None
        if bus is not None:
            cluster = ClusterStatus(
                bus="connected" if bus.connected else "degraded",
                node=bus.node,
                peers=bus.peers,
                leader=self.stats.leading,
                reason="" if bus.connected else bus.reason,
            )
        return json_response(200, Ready(status="ready", epoch=self.eventlog.epoch, cluster=cluster))

    async def metrics_text(self, request: Request) -> Response:
        """``GET /metrics``: needs an admin token when ``metrics.require_admin`` is true."""
        if self.state.config.metrics.require_admin:
            principal = authenticate(self.auth, request)
            if not principal.is_admin:
                raise Refusal(
                    "forbidden", "metrics need an admin token (metrics.require_admin = true)"
                )
        # prometheus_client is imported on the first scrape, not at start.
        from etherd.edge.ops.exposition import render

        return Response(200, render(self.metrics), content_type=CONTENT_TYPE)

    async def admin_stats(self, request: Request) -> Response:
        """``GET /api/admin/stats``: what an operator watches, for admin tokens only."""
        principal = authenticate(self.auth, request)
        _admin(principal)
        st = self.stats
        rates = self.rates.rates()
        kind: Literal["sqlite", "postgresql"] = (
            "postgresql" if st.store_kind == "postgresql" else "sqlite"
        )
        return json_response(
            200,
            Stats(
                node=st.node_id,
                started_at=rfc3339_ms(int(st.started_at * 1000)),
                connections=ConnectionCounts(
                    websocket=st.sessions_open, sse=st.sse_streams, http=st.http_connections
                ),
                subscriptions=st.subscriptions,
                topics=[
                    TopicCount(topic=t, subscribers=n) for t, n in st.busiest_topics(TOP_TOPICS)
                ],
                rates=RateView(**rates._asdict()),
                store=StoreStatus(
                    up=st.store_up, kind=kind, queue_rows=st.queue_rows, epoch=st.epoch
                ),
            ),
        )


def _admin(principal: Principal) -> None:
    if not principal.is_admin:
        raise Refusal(
            "forbidden", f"stats need an admin token; {principal.sub} is a {principal.role}"
        )
