"""Command line: ``etherd serve | token | migrate | check-config`` (the server side) and
``etherd tail | publish | tasks | demo-harness`` (clients over ``etherd.client``).

Every command answers bad input with one line on stderr and the exit codes of
``etherd.cli.common``; none prints a traceback for a mistake a person can make.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import msgspec

from etherd import __version__
from etherd.cli.common import EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE, add_target, fail
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

    token = sub.add_parser(
        "token", help="print a signed token (the development key in development mode)"
    )
    with_config(token)
    token.add_argument("--sub", required=True, help="subject (user id)")
    token.add_argument("--role", default="user", help="user, harness, service or admin")
    token.add_argument("--ttl", type=float, default=3600.0, help="lifetime in seconds")
    token.add_argument("--topics", help="comma-separated topics claim (patterns allowed)")
    token.add_argument("--data-dir", help="where the development key lives (server.data_dir)")

    tail = sub.add_parser("tail", help="follow topics and print each event")
    add_target(tail)
    tail.add_argument("topics", nargs="+")
    tail.add_argument("--since", type=int, help="replay every topic after this offset first")
    tail.add_argument(
        "--format", choices=["json", "human"], help="default: human on a terminal, else json"
    )
    tail.add_argument("--count", type=int, default=0, help="exit after this many events")

    publish = sub.add_parser("publish", help="publish one event (service or admin token)")
    add_target(publish)
    publish.add_argument("topic")
    publish.add_argument("event")
    publish.add_argument("--data", help='the event\'s fields, a JSON object: \'{"text":"hi"}\'')
    publish.add_argument("--transient", action="store_true", help="durable: false (no offset)")
    publish.add_argument(
        "--websocket", action="store_true", help="publish over the WebSocket instead of HTTP"
    )

    tasks = sub.add_parser("tasks", help="create, list, show, answer and cancel tasks")
    actions = tasks.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="create a task")
    create.add_argument("prompt")
    create.add_argument("--title")
    create.add_argument("--scope", help='a JSON object, e.g. \'{"repo":"org/repo"}\'')
    create.add_argument("--owner", help="create it for someone else (service or admin token)")
    listing = actions.add_parser("list", help="your tasks, newest change first")
    listing.add_argument("--limit", type=int, default=20)
    show = actions.add_parser("show", help="one task: status, last step, question, delivery")
    show.add_argument("task_id")
    answer = actions.add_parser("answer", help="answer the question a task asks")
    answer.add_argument("task_id")
    answer.add_argument("answer")
    answer.add_argument("--option", help="one of the offered options")
    cancel = actions.add_parser("cancel", help="cancel a task (also while it runs)")
    cancel.add_argument("task_id")
    for p in (create, listing, show, answer, cancel):
        add_target(p)
        p.add_argument("--json", action="store_true", help="print the whole answer as JSON")

    demo = sub.add_parser(
        "demo-harness", help="a harness that narrates fake work and delivers a pull request"
    )
    add_target(demo)
    demo.add_argument("--app", default="etherd-demo", help="the X-Ether-Harness-App id")
    demo.add_argument(
        "--ask",
        choices=["always", "sometimes", "never"],
        default="sometimes",
        help="when to ask the user a question (default: sometimes)",
    )
    demo.add_argument("--step-delay", type=float, default=0.8, help="seconds between steps")
    demo.add_argument("--poll", type=float, default=1.0, help="seconds between looks for tasks")
    demo.add_argument("--max-tasks", type=int, default=0, help="exit after this many (0: never)")
    demo.add_argument("--seed", type=int, help="seed for the 'sometimes' questions")

    migrate = sub.add_parser("migrate", help="create or upgrade the store's schema")
    with_config(migrate)
    migrate.add_argument("--store")

    check = sub.add_parser("check-config", help="validate and print the effective configuration")
    with_config(check)

    sub.add_parser("openapi", help="print the OpenAPI document of the HTTP API (make openapi)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``etherd`` script; returns the exit code."""
    args = _parser().parse_args(argv)
    command = args.command
    if command in ("tail", "publish", "tasks", "demo-harness"):
        return _client_command(args)
    if command == "openapi":
        return _openapi()
    try:
        config = _config(args)
    except ConfigError as exc:
        return fail("etherd", str(exc), EXIT_USAGE)
    if command == "check-config":
        print(json.dumps(masked(config), indent=2))
        return EXIT_OK
    setup_logging(config.log)
    if command == "serve":
        from etherd.supervisor import SUPERVISED_ENV

        if config.server.workers > 1 and not os.environ.get(SUPERVISED_ENV):
            from etherd.supervisor import supervise

            return supervise(config, _without_workers(argv if argv is not None else sys.argv[1:]))
        from etherd.server import run

        # SIGHUP reloads from the same file, environment and flags; a LISTEN_FDS socket
        # (systemd socket activation) is picked up by run().
        return run(config, reload=lambda: _config(args))
    if command == "token":
        return _token(config, args)
    return _migrate(config)


def _client_command(args: argparse.Namespace) -> int:
    try:
        return _dispatch_client(args)
    except ConfigError as exc:
        # From --config: where the server listens could not be read.
        return fail(f"etherd {args.command}", str(exc), EXIT_USAGE)


def _dispatch_client(args: argparse.Namespace) -> int:
    if args.command == "tail":
        from etherd.cli.realtime import tail

        return tail(args)
    if args.command == "publish":
        from etherd.cli.realtime import publish

        return publish(args)
    if args.command == "tasks":
        from etherd.cli.tasks import tasks

        return tasks(args)
    from etherd.cli.demo import demo_harness

    return demo_harness(args)


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
    from etherd.edge.ops.devkey import dev_key
    from etherd.edge.ops.keyfiles import read_key_files

    try:
        role = Role(args.role)
    except ValueError:
        return fail(
            "etherd token", f"unknown role {args.role!r}; use user, harness, service or admin", 2
        )
    topics = [t.strip() for t in args.topics.split(",")] if args.topics else None
    try:
        dev = config.dev_auth
        auth = Authenticator(
            config.auth,
            dev=dev,
            key_files=read_key_files(config.auth),
            dev_secret=dev_key(config.server.data_dir) if dev else None,
        )
        print(auth.issue(args.sub, role, args.ttl, topics))
    except (ConfigError, ValueError) as exc:
        return fail("etherd token", str(exc), EXIT_USAGE)
    return EXIT_OK


def _openapi() -> int:
    """Print the document ``GET /api/openapi.json`` serves, without serving."""
    from etherd.edge.api.openapi import render
    from etherd.server import Services

    # Development mode off: building the services must not make a development key.
    config = msgspec.convert({"auth": {"dev": False}}, Config)
    loop = asyncio.new_event_loop()
    try:
        services = Services(config, loop)
        sys.stdout.buffer.write(render(services.routes))
    finally:
        loop.close()
    return EXIT_OK


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
        return fail("etherd migrate", str(exc), EXIT_UNREACHABLE)
    print(f"schema is current in {config.store_url.split('@')[-1]}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
