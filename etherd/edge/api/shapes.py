"""Response bodies of the operations and realtime routes, as Structs, so the OpenAPI
document describes them from the same declaration the handlers encode."""

from __future__ import annotations

from typing import Literal

import msgspec

__all__ = ["ClusterStatus", "Health", "Ready", "RealtimeClientConfig"]


class Health(msgspec.Struct, kw_only=True):
    """``GET /healthz``: the event loop turns."""

    status: str = "ok"


class ClusterStatus(msgspec.Struct, kw_only=True, omit_defaults=True):
    """How a clustered node stands on the bus (in ``GET /readyz``)."""

    # "degraded" is still ready: the node serves its own subscribers and commits.
    bus: Literal["connected", "degraded"]
    node: str
    # Other nodes heard from lately.
    peers: int
    # Whether this node runs the cluster-wide duties (sweeps, retention).
    leader: bool
    # Why the bus is not connected (left out when it is).
    reason: str = ""


class Ready(msgspec.Struct, kw_only=True, omit_defaults=True):
    """``GET /readyz``: the store answers and etherd is not draining."""

    # No default: omit_defaults (for ``cluster``) would leave it out.
    status: Literal["ready"]
    # The epoch of the event log: offsets are comparable only within one epoch.
    epoch: str
    # Only on a clustered node.
    cluster: ClusterStatus | None = None


class RealtimeClientConfig(msgspec.Struct, kw_only=True, omit_defaults=True):
    """``GET /api/realtime/config``: how a frontend should connect."""

    prefer_websocket: bool
    websocket_url: str
    sse_url: str
    replay_max_events: int
    # The development token, only while development auth is on (left out otherwise).
    dev_token: str | None = None
