"""Time as etherd writes it on the wire: integer milliseconds inside, RFC 3339 outside.

Every time etherd keeps is an ``int`` of milliseconds since the Unix epoch (UTC); every time
it sends (event ``ts``, ``updated_at``, ``lease_expires_at``, timeline ``at``) is the same
instant as an RFC 3339 string with exactly three fractional digits and a ``Z`` offset, for
example ``2026-11-29T07:16:08.123Z``. Pure: the caller supplies the milliseconds.
"""

from __future__ import annotations

import time

__all__ = ["rfc3339_ms"]

# One-entry cache of the formatted second: events are stamped in bursts within the same
# second, so the strftime/gmtime pair runs about once a second instead of once an event.
_last_second: tuple[int, str] = (-1, "1969-12-31T23:59:59")


def rfc3339_ms(ms: int) -> str:
    """Format milliseconds since the epoch as RFC 3339 UTC with milliseconds.

    Args:
        ms: milliseconds since 1970-01-01T00:00:00Z; negative values are before it.

    Returns:
        ``YYYY-MM-DDTHH:MM:SS.mmmZ``, for example ``2026-11-29T07:16:08.123Z``.
    """
    global _last_second
    second, millis = divmod(ms, 1000)
    cached_second, prefix = _last_second
    if second != cached_second:
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _last_second = (second, prefix)
    return f"{prefix}.{millis:03d}Z"
