"""Command line: ``etherd serve | token | tail | migrate | check-config``."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

import msgspec

from etherd import __version__
from etherd.core.config import Config, ConfigError, masked
from etherd.edge.ops.configfile import load
from etherd.edge.ops.logs import setup_logging

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="etherd", description="Realtime hub for agent harnesses")
    parser.add_argument("--version", action="version", version=f"etherd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", "-c", help="TOML file (default: conf/etherd.toml if present)")

    serve = sub.add_parser("serve", help="run the hub")
    with_config(serve)
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--data-dir")
    serve.add_argument("--store", help="store URL: sqlite:///FILE or postgresql://...")
    serve.add_argument(
        "--workers", type=int, help="worker processes on the one port (needs PostgreSQL)"
    )

    token = sub.add_parser("token", help="print a signed token for the configured key")
    with_config(token)
    token.add_argument("--sub", required=True, help="subject (user id)")
    token.add_argument("--role", default="user", help="user, harness, service or admin")
    token.add_argument("--ttl", type=float, default=3600.0, help="lifetime in seconds")
    token.add_argument("--topics", help="comma-separated topics claim (patterns allowed)")

    tail = sub.add_parser("tail", help="subscribe to topics and print each event")
    tail.add_argument("topics", nargs="+")
    tail.add_argument("--url", default="ws://127.0.0.1:8080/api/realtime")
    tail.add_argument("--token", default="test")
    tail.add_argument("--since", type=int, help="resume every topic after this offset")

    migrate = sub.add_parser("migrate", help="create or upgrade the store's schema")
    with_config(migrate)
    migrate.add_argument("--store")

    check = sub.add_parser("check-config", help="validate and print the effective configuration")
    with_config(check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``etherd`` script; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "tail":
            return _tail(args)
        config = _config(args)
    except ConfigError as exc:
        print(f"etherd: {exc}", file=sys.stderr)
        return 2
    if args.command == "check-config":
        print(json.dumps(masked(config), indent=2))
        return 0
    setup_logging(config.log)
    if args.command == "serve":
        from etherd.supervisor import SUPERVISED_ENV

        if config.server.workers > 1 and not os.environ.get(SUPERVISED_ENV):
            from etherd.supervisor import supervise

            return supervise(config, _without_workers(argv if argv is not None else sys.argv[1:]))
        from etherd.server import run

        # SIGHUP reloads from the same file, environment and flags; a LISTEN_FDS socket
        # (systemd socket activation) is picked up by run().
        return run(config, reload=lambda: _config(args))
    if args.command == "token":
        return _token(config, args)
    if args.command == "migrate":
        return _migrate(config)
    return 2


def _without_workers(argv: Sequence[str]) -> list[str]:
    """``serve``'s arguments for a worker: the supervisor's, less the command and --workers."""
    out: list[str] = []
    skip = False
    for arg in list(argv)[1:]:
        if skip:
            skip = False
        elif arg == "--workers":
            skip = True
        elif not arg.startswith("--workers="):
            out.append(arg)
    return out


def _config(args: argparse.Namespace) -> Config:
    overrides: dict[str, dict[str, Any]] = {
        "server": {
            "host": getattr(args, "host", None),
            "port": getattr(args, "port", None),
            "data_dir": getattr(args, "data_dir", None),
            "workers": getattr(args, "workers", None),
        },
        "store": {"url": getattr(args, "store", None)},
    }
    return load(args.config, overrides=overrides)


def _token(config: Config, args: argparse.Namespace) -> int:
    from etherd.core.auth import Authenticator, Role
    from etherd.edge.ops.keyfiles import read_key_files

    try:
        role = Role(args.role)
    except ValueError:
        print(
            f"etherd: unknown role {args.role!r}; use user, harness, service or admin",
            file=sys.stderr,
        )
        return 2
    topics = [t.strip() for t in args.topics.split(",")] if args.topics else None
    try:
        auth = Authenticator(config.auth, dev=False, key_files=read_key_files(config.auth))
        print(auth.issue(args.sub, role, args.ttl, topics))
    except ConfigError as exc:
        print(f"etherd: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"etherd: {exc}", file=sys.stderr)
        return 2
    return 0


def _migrate(config: Config) -> int:
    from etherd.store import StoreUnavailable
    from etherd.store.factory import open_store

    config = msgspec.structs.replace(
        config, store=msgspec.structs.replace(config.store, migrate_on_start=True)
    )

    async def go() -> None:
        store = open_store(config)
        await store.open()
        await store.close()

    try:
        asyncio.run(go())
    except StoreUnavailable as exc:
        print(f"etherd: {exc}", file=sys.stderr)
        return 1
    print(f"schema is current in {config.store_url.split('@')[-1]}")
    return 0


def _tail(args: argparse.Namespace) -> int:
    from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

    topics = list(args.topics)

    class Printer(WSListener):
        def on_ws_connected(self, transport: WSTransport) -> None:
            command: dict[str, Any] = {"action": "subscribe", "topics": topics, "id": "tail"}
            if args.since is not None:
                command["since"] = {t: args.since for t in topics}
            transport.send(WSMsgType.TEXT, json.dumps(command).encode())

        def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
            if frame.msg_type == WSMsgType.TEXT:
                print(frame.get_payload_as_utf8_text(), flush=True)
            elif frame.msg_type == WSMsgType.CLOSE:
                print(
                    f"closed: {frame.get_close_code()} {frame.get_close_message()!r}",
                    file=sys.stderr,
                )
                transport.disconnect()

    url = args.url
    sep = "&" if "?" in url else "?"
    url = f"{url}{sep}token={quote(args.token)}"

    async def go() -> None:
        transport, _ = await ws_connect(Printer, url)
        await transport.wait_disconnected()

    logging.getLogger("picows").setLevel(logging.WARNING)
    try:
        asyncio.run(go())
    except KeyboardInterrupt:
        return 0
    except OSError as exc:
        print(f"etherd tail: cannot connect to {args.url}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
