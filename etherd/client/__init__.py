"""etherd.client: an asyncio client for etherd (and any server of the Ether contract).

- ``Client``: the HTTP API (publish, tasks), idempotent retries, typed errors.
- ``Subscriber``: events of topics over WebSocket, resumed with ``since`` across drops,
  ``Reset`` when a resume cannot be honoured, token refresh in place.
- ``RealtimePublisher``: publishing over the WebSocket ``publish`` action.
- ``Harness`` and ``Run``: claim tasks, keep the lease, narrate, ask, deliver.

See ``docs/client.md`` for examples.
"""

from __future__ import annotations

from etherd.client.api import Client, Published, backoff_delay, http_url, websocket_url
from etherd.client.errors import (
    AlreadyClaimed,
    ApiError,
    EtherdError,
    Forbidden,
    LeaseExpired,
    NotFound,
    RunEnded,
    RunMismatch,
    SubscriptionRefused,
    TaskCancelled,
    TokenExpired,
    TransportError,
    Unauthorized,
)
from etherd.client.harness import Answer, Harness, Run
from etherd.client.realtime import Event, RealtimePublisher, Reset, Subscriber, token_expiry

__all__ = [
    "AlreadyClaimed",
    "Answer",
    "ApiError",
    "Client",
    "EtherdError",
    "Event",
    "Forbidden",
    "Harness",
    "LeaseExpired",
    "NotFound",
    "Published",
    "RealtimePublisher",
    "Reset",
    "Run",
    "RunEnded",
    "RunMismatch",
    "Subscriber",
    "SubscriptionRefused",
    "TaskCancelled",
    "TokenExpired",
    "TransportError",
    "Unauthorized",
    "backoff_delay",
    "http_url",
    "token_expiry",
    "websocket_url",
]
