"""Values that travel through the event log: what is appended, what is stored, what a replay
returns. Pure data; the stores in ``etherd.store`` persist them.

An event is identified by ``(topic, offset)``. Offsets start at 1 in each topic, grow by one
per stored event (gap-free among stored events, retention only trims the oldest), and are
meaningful only within one ``epoch``: a reset log gets a new epoch so a client can tell a
resume from a restart.

A write may also carry a task row (``TaskWrite``): the store keeps it in the same transaction
as the write's events, with optimistic concurrency on the row's version, so task state and
event history never disagree.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import msgspec

__all__ = [
    "Idempotency",
    "IdempotentAnswer",
    "NewEvent",
    "Replay",
    "Respond",
    "StoredEvent",
    "TaskWrite",
    "Write",
]


class NewEvent(msgspec.Struct, gc=False, frozen=True):
    """An event before it is stored: its topic, its name and its fields as a JSON object."""

    topic: str
    event: str
    # The event's own fields, encoded as one JSON object (no envelope keys).
    data: bytes


class StoredEvent(msgspec.Struct, gc=False, frozen=True):
    """An event after its commit: it now has an offset and the server time of the commit."""

    topic: str
    offset: int
    ts_ms: int
    event: str
    data: bytes


class Idempotency(msgspec.Struct, gc=False, frozen=True):
    """An ``Idempotency-Key`` whose answer is stored in the same commit as the events.

    ``fingerprint`` identifies the request body; a retry with the same key but another body
    is a conflict. The answer itself comes from ``Write.respond`` once offsets are known.
    """

    key: str
    # Who may see this key's answer: keys are per principal and route.
    scope: str
    fingerprint: str


class IdempotentAnswer(msgspec.Struct, gc=False, frozen=True):
    """A stored answer to an earlier request with the same idempotency key."""

    fingerprint: str
    status: int
    body: bytes


@dataclass(slots=True, frozen=True)
class TaskWrite:
    """A task row to store with a write's events.

    The columns the store queries on are copied out of the task; ``data`` is the whole task
    and is what the store's task reads return, byte for byte.
    """

    id: str
    owner: str
    status: str
    created_ms: int
    updated_ms: int
    lease_expires_ms: int | None
    holder: str | None
    # The new version; greater than ``expected_version``.
    version: int
    # The version the change was computed from; 0 = create (the row must not exist).
    expected_version: int
    # The whole Task as msgspec JSON.
    data: bytes


# Produces the (status, body) answer kept under an idempotency key, from the stored events.
Respond = Callable[[list[StoredEvent]], tuple[int, bytes]]


@dataclass(slots=True)
class Write:
    """One unit of a group commit: its events are stored together, all or none."""

    events: list[NewEvent]
    idempotency: Idempotency | None = None
    # Called by the store inside the transaction, after offsets are assigned, to produce the
    # (status, body) answer kept under the idempotency key.
    respond: Respond | None = None
    # A task row stored with the events, only if its version still is ``expected_version``
    # (else the whole write is refused with ``TaskConflict``).
    task: TaskWrite | None = None


class Replay(msgspec.Struct, gc=False, frozen=True):
    """Stored events of one topic after a given offset.

    ``first`` is the oldest retained offset (0 when the topic holds nothing) and ``head``
    the newest offset ever assigned (0 for a topic never written). A replay from ``after``
    is complete when ``after >= first - 1`` (nothing trimmed in between) and every event up
    to ``head`` fitted under the caller's limit.
    """

    events: list[StoredEvent]
    first: int
    head: int
