"""The two systemd protocols etherd speaks, implemented directly (no libsystemd).

Readiness notification (``sd_notify``): systemd passes ``$NOTIFY_SOCKET``, a unix datagram
socket (a path, or an abstract name written with a leading ``@``). Each notification is one
datagram of newline-separated ``KEY=VALUE`` lines: ``READY=1`` once etherd listens,
``STOPPING=1`` when a graceful stop begins, ``RELOADING=1`` around a SIGHUP reload,
``STATUS=...`` for ``systemctl status``, ``WATCHDOG=1`` as a liveness ping when the unit sets
``WatchdogSec`` (systemd then passes ``$WATCHDOG_USEC``; etherd pings every half of it from
the event loop, so a stuck loop stops the pings and systemd restarts the service).

Socket activation (``sd_listen_fds``): systemd passes listening sockets as file descriptors
3, 4, ... with ``$LISTEN_FDS`` (how many) and ``$LISTEN_PID`` (which process they are for).
The variables are removed once read so that child processes do not take the sockets as
theirs.

Without these variables every function here does nothing, so the same binary runs under
systemd, under another supervisor or in a terminal.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import MutableMapping

__all__ = ["LISTEN_FDS_START", "Notifier", "listen_fds", "watchdog_interval"]

log = logging.getLogger("etherd.systemd")

# The first file descriptor systemd passes (SD_LISTEN_FDS_START).
LISTEN_FDS_START = 3


class Notifier:
    """Sends notifications to ``$NOTIFY_SOCKET``; a no-op when it is not set."""

    def __init__(self, environ: MutableMapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        self.address: str | bytes | None = None
        if raw.startswith("@"):
            # Abstract namespace: a leading NUL byte instead of the '@'.
            self.address = b"\0" + raw[1:].encode()
        elif raw.startswith("/"):
            self.address = raw
        elif raw:
            log.warning("ignoring NOTIFY_SOCKET=%r: not a path or an abstract name", raw)
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        """Whether a notification socket was given."""
        return self.address is not None

    def notify(self, state: str) -> bool:
        """Send one notification (``KEY=VALUE`` lines); True if it was sent.

        Never raises: a supervisor that went away must not take etherd down with it.
        """
        if self.address is None:
            return False
        try:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                sock.setblocking(False)
                self._sock = sock
            self._sock.sendto(state.encode(), self.address)
        except OSError as exc:
            log.debug("notify %r failed: %s", state.split("\n", 1)[0], exc)
            return False
        return True

    def ready(self, status: str = "") -> bool:
        """``READY=1``, with a status line when given."""
        return self.notify("READY=1" + (f"\nSTATUS={status}" if status else ""))

    def stopping(self, status: str = "", extend_s: float = 0.0) -> bool:
        """``STOPPING=1``; ``extend_s`` asks systemd for that much more stop time."""
        lines = ["STOPPING=1"]
        if status:
            lines.append(f"STATUS={status}")
        if extend_s > 0:
            lines.append(f"EXTEND_TIMEOUT_USEC={int(extend_s * 1_000_000)}")
        return self.notify("\n".join(lines))

    def reloading(self) -> bool:
        """``RELOADING=1`` with the monotonic time systemd uses to match the reload."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")

    def status(self, status: str) -> bool:
        """``STATUS=...`` only."""
        return self.notify(f"STATUS={status}")

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: a liveness ping."""
        return self.notify("WATCHDOG=1")

    def close(self) -> None:
        """Close the datagram socket (a later notify opens a new one)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval(environ: MutableMapping[str, str] | None = None) -> float | None:
    """Seconds between watchdog pings (half of ``$WATCHDOG_USEC``), or None when off.

    ``$WATCHDOG_PID``, when set, must name this process (``sd_watchdog_enabled``).
    """
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC", "")
    if not usec:
        return None
    pid = env.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r: not a number of microseconds", usec)
        return None
    if value <= 0:
        return None
    return value / 2 / 1_000_000


def listen_fds(
    environ: MutableMapping[str, str] | None = None, first_fd: int = LISTEN_FDS_START
) -> list[socket.socket]:
    """The sockets systemd passed to this process, as ``socket.socket`` objects.

    Honours ``$LISTEN_PID`` (the sockets are for this process only) and ``$LISTEN_FDS``,
    then removes ``LISTEN_PID``, ``LISTEN_FDS`` and ``LISTEN_FDNAMES`` from the environment.
    The descriptors are marked close-on-exec. ``first_fd`` exists for tests; systemd always
    starts at 3.

    Raises:
        ValueError: ``$LISTEN_FDS`` is set for this process but is not a usable count, or
            a descriptor it names is not open.
    """
    env = os.environ if environ is None else environ
    pid = env.pop("LISTEN_PID", None)
    count = env.pop("LISTEN_FDS", None)
    env.pop("LISTEN_FDNAMES", None)
    if pid is None or count is None:
        return []
    if pid.strip() != str(os.getpid()):
        # Meant for another process (e.g. inherited through a wrapper that forked).
        return []
    try:
        n = int(count)
    except ValueError:
        raise ValueError(f"LISTEN_FDS={count!r} is not a number of sockets") from None
    if n < 0:
        raise ValueError(f"LISTEN_FDS={count!r} is negative")
    socks: list[socket.socket] = []
    for fd in range(first_fd, first_fd + n):
        try:
            os.set_inheritable(fd, False)
            socks.append(socket.socket(fileno=fd))
        except OSError as exc:
            raise ValueError(
                f"LISTEN_FDS names descriptor {fd}, which is unusable: {exc}"
            ) from None
    return socks
