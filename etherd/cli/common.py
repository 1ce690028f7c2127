"""What every client command shares: where the server is, which token to send, how errors
become one line on stderr and a documented exit code.

Exit codes (docs/client.md lists them too):

===  =====================================================================
0    done
1    the server refused the request (unknown task, invalid transition, ...)
2    bad usage: arguments, JSON, or the configuration file
3    the server cannot be reached (wrong URL, not running, timed out)
4    the token was refused (401) or may not do this (403, refused topics)
===  =====================================================================
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any, Final

from etherd.client import (
    ApiError,
    Forbidden,
    SubscriptionRefused,
    TokenExpired,
    TransportError,
    Unauthorized,
)
from etherd.core.auth import DEV_TOKEN
from etherd.core.config import ConfigError

__all__ = [
    "EXIT_AUTH",
    "EXIT_OK",
    "EXIT_REFUSED",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "add_target",
    "fail",
    "json_arg",
    "run_client",
    "target",
]

EXIT_OK: Final = 0
EXIT_REFUSED: Final = 1
EXIT_USAGE: Final = 2
EXIT_UNREACHABLE: Final = 3
EXIT_AUTH: Final = 4

DEFAULT_URL: Final = "http://127.0.0.1:8080"


class UsageError(Exception):
    """Bad input on the command line; the message is the one line to print."""


def fail(prog: str, message: str, code: int) -> int:
    """Print ``prog: message`` as one line on stderr and return ``code``."""
    line = " ".join(message.split())
    print(f"{prog}: {line}", file=sys.stderr, flush=True)
    return code


def add_target(parser: argparse.ArgumentParser) -> None:
    """``--url``, ``--token`` and ``--config``, for commands that talk to a server."""
    parser.add_argument(
        "--url",
        help=f"etherd's URL (default: $ETHERD_URL, else the --config listener, else {DEFAULT_URL})",
    )
    parser.add_argument(
        "--token",
        help="bearer token (default: $ETHERD_TOKEN, else the development token 'test')",
    )
    parser.add_argument(
        "--config", "-c", help="TOML file whose [server] section says where etherd listens"
    )


def target(args: argparse.Namespace) -> tuple[str, str]:
    """The URL and token a client command uses.

    Raises:
        ConfigError: the ``--config`` file does not load.
    """
    url = args.url or os.environ.get("ETHERD_URL")
    if not url and args.config:
        from etherd.edge.ops.configfile import load

        config = load(args.config)
        if config.server.public_url:
            url = config.public_url
        else:
            host = config.server.host
            # A wildcard listener is reached on loopback from this machine.
            if host in ("0.0.0.0", "::", ""):
                host = "127.0.0.1"
            shown = f"[{host}]" if ":" in host else host
            url = f"http://{shown}:{config.server.port}"
    token = args.token or os.environ.get("ETHERD_TOKEN") or DEV_TOKEN
    return url or DEFAULT_URL, token


def json_arg(text: str, what: str) -> Any:
    """``text`` parsed as JSON.

    Raises:
        UsageError: it is not JSON (the message says where).
    """
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{what} is not valid JSON: {exc.msg} at character {exc.pos}") from None


def run_client(prog: str, work: Callable[[], Awaitable[int]]) -> int:
    """Run a client command; every expected failure becomes one line and an exit code."""
    try:
        return asyncio.run(_awaited(work))
    except KeyboardInterrupt:
        return EXIT_OK
    except UsageError as exc:
        return fail(prog, str(exc), EXIT_USAGE)
    except ConfigError as exc:
        return fail(prog, str(exc), EXIT_USAGE)
    except TransportError as exc:
        return fail(prog, str(exc), EXIT_UNREACHABLE)
    except (Unauthorized, Forbidden) as exc:
        return fail(prog, f"{exc.code or exc.status}: {exc.message}", EXIT_AUTH)
    except SubscriptionRefused as exc:
        return fail(prog, str(exc), EXIT_AUTH)
    except TokenExpired as exc:
        return fail(prog, str(exc), EXIT_AUTH)
    except ApiError as exc:
        return fail(prog, f"{exc.code or exc.status}: {exc.message}", EXIT_REFUSED)


async def _awaited(work: Callable[[], Awaitable[int]]) -> int:
    # asyncio.run takes a coroutine; ``work`` may return any awaitable.
    return await work()
