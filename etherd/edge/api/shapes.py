"""Response bodies of the operations and realtime routes, as Structs, so the OpenAPI
document describes them from the same declaration the handlers encode."""

from __future__ import annotations

import msgspec

__all__ = ["Health", "Ready", "RealtimeClientConfig"]


class Health(msgspec.Struct, kw_only=True):
    """``GET /healthz``: the event loop turns."""

    status: str = "ok"


class Ready(msgspec.Struct, kw_only=True):
    """``GET /readyz``: the store answers and etherd is not draining."""

    status: str = "ready"
    # The epoch of the event log: offsets are comparable only within one epoch.
    epoch: str


class RealtimeClientConfig(msgspec.Struct, kw_only=True):
    """``GET /api/realtime/config``: how a frontend should connect."""

    prefer_websocket: bool
    websocket_url: str
    sse_url: str
    replay_max_events: int
