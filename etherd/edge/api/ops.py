"""Operations routes: ``GET /healthz`` (alive), ``GET /readyz`` (ready to serve) and
``GET /metrics`` (Prometheus text format, behind an admin token unless configured off)."""

from __future__ import annotations

from etherd.core.auth import Authenticator
from etherd.core.errors import Refusal
from etherd.edge.api.common import Body, Route, authenticate, json_response
from etherd.edge.api.shapes import Health, Ready
from etherd.edge.http.request import Request
from etherd.edge.http.response import Response
from etherd.edge.ops.metrics import CONTENT_TYPE, Metrics
from etherd.services.eventlog import EventLog
from etherd.services.state import ServerState

__all__ = ["OpsRoutes"]


class OpsRoutes:
    """Health, readiness and metrics."""

    def __init__(
        self, auth: Authenticator, eventlog: EventLog, metrics: Metrics, state: ServerState
    ) -> None:
        self.auth = auth
        self.eventlog = eventlog
        self.metrics = metrics
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
        return json_response(200, Ready(epoch=self.eventlog.epoch))

    async def metrics_text(self, request: Request) -> Response:
        """``GET /metrics``: needs an admin token when ``metrics.require_admin`` is true."""
        if self.state.config.metrics.require_admin:
            principal = authenticate(self.auth, request)
            if not principal.is_admin:
                raise Refusal(
                    "forbidden", "metrics need an admin token (metrics.require_admin = true)"
                )
        return Response(200, self.metrics.render(), content_type=CONTENT_TYPE)
