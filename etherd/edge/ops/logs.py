"""Logging: human-readable lines by default, JSON lines with ``log.format = "json"``.

JSON lines carry ``ts`` (UTC, RFC 3339 with milliseconds), ``level``, ``logger`` and
``message``, plus every context field passed with ``extra=`` (``task_id``, ``topic``,
``peer``, ...). ``setup_logging`` may be called again at any time (SIGHUP) to change the
level or the format; the access log (``log.access_log``) is the ``etherd.access`` logger.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Final

import msgspec

from etherd.core.config import LogConfig

__all__ = ["JsonFormatter", "setup_logging"]

# Attributes every LogRecord has; anything else passed with extra= is context worth keeping.
_STANDARD: Final = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys() | {"message", "asctime"}
)
# Context values of other types (exceptions, paths, ...) are written as their str().
_ENCODER: Final = msgspec.json.Encoder(enc_hook=str)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any context fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(
            (key, value)
            for key, value in record.__dict__.items()
            if key not in _STANDARD and not key.startswith("_")
        )
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return _ENCODER.encode(entry).decode()


def setup_logging(config: LogConfig) -> None:
    """Configure the root logger from the ``[log]`` section (also used on reload)."""
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    if config.format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.handlers[:] = [handler]
    root.setLevel(config.level.upper())
