from collections.abc import Iterable
from typing import TypeVar

# Any object with the attributes of ``etherd.core.hub.Sink`` it reads (direct, pending,
# send) and, to be written to past its transport, ``fd`` and ``unsent()``.
_S = TypeVar("_S")

def send_all(sinks: Iterable[_S], data: bytes, slow: list[_S], /) -> int: ...
