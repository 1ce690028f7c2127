"""``etherd tail`` and ``etherd publish``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from etherd.cli.common import EXIT_OK, UsageError, json_arg, run_client, target
from etherd.client import Client, Event, RealtimePublisher, Reset, Subscriber

__all__ = ["publish", "tail"]

ENVELOPE = ("type", "event", "topic", "offset", "ts")


def _human(item: Event) -> str:
    fields = {k: v for k, v in item.data.items() if k not in ENVELOPE}
    where = item.topic if item.offset is None else f"{item.topic}#{item.offset}"
    return f"{item.ts} {where} {item.event} {json.dumps(fields, ensure_ascii=False)}"


def tail(args: argparse.Namespace) -> int:
    """Follow topics and print each event; resumes across drops."""
    url, token = target(args)
    human = args.format == "human" or (args.format is None and sys.stdout.isatty())

    async def go() -> int:
        seen = 0
        async with Subscriber(url, token, args.topics, since=args.since) as sub:
            async for item in sub:
                if isinstance(item, Reset):
                    print(
                        f"etherd tail: {item.topic}: the resume could not be honoured "
                        f"(recovered: false); continuing after offset {item.offset}",
                        file=sys.stderr,
                        flush=True,
                    )
                    continue
                if human:
                    print(_human(item), flush=True)
                else:
                    print(json.dumps(item.data, ensure_ascii=False), flush=True)
                seen += 1
                if args.count and seen >= args.count:
                    break
        return EXIT_OK

    return run_client("etherd tail", go)


def publish(args: argparse.Namespace) -> int:
    """Publish one event; prints ``{"topic", "event", "offset"}``."""
    url, token = target(args)

    async def go() -> int:
        data: Any = json_arg(args.data, "--data") if args.data is not None else {}
        if not isinstance(data, dict):
            raise UsageError(f"--data must be a JSON object, got {type(data).__name__}")
        durable = not args.transient
        offset: int | None
        if args.websocket:
            async with RealtimePublisher(url, token) as ws:
                offset = await ws.publish(args.topic, args.event, data, durable=durable)
        else:
            async with Client(url, token) as client:
                published = await client.publish(args.topic, args.event, data, durable=durable)
                offset = published.offset
        answer: dict[str, Any] = {"topic": args.topic, "event": args.event}
        if offset is not None:
            answer["offset"] = offset
        print(json.dumps(answer))
        return EXIT_OK

    return run_client("etherd publish", go)
