"""Times on the wire: integer milliseconds inside, RFC 3339 with milliseconds outside."""

from __future__ import annotations

import pytest

from etherd.core.rfc3339 import rfc3339_ms


@pytest.mark.parametrize(
    ("ms", "text"),
    [
        (0, "1970-01-01T00:00:00.000Z"),
        (1_795_936_568_123, "2026-11-29T07:16:08.123Z"),
        (1_795_936_568_999, "2026-11-29T07:16:08.999Z"),
        (1_795_936_569_000, "2026-11-29T07:16:09.000Z"),
        (1_795_936_568_007, "2026-11-29T07:16:08.007Z"),
        (-1, "1969-12-31T23:59:59.999Z"),
    ],
)
def test_rfc3339_ms(ms: int, text: str) -> None:
    assert rfc3339_ms(ms) == text
    # Twice, so the cached second is used as well.
    assert rfc3339_ms(ms) == text
