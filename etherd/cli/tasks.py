"""``etherd tasks create | list | show | answer | cancel``: the product task API."""

from __future__ import annotations

import argparse
import json
from typing import Any

from etherd.cli.common import EXIT_OK, UsageError, json_arg, run_client, target
from etherd.client import Client

__all__ = ["tasks"]


def _show(task: dict[str, Any]) -> str:
    lines = [
        f"{task['task_id']}  {task['status']}  {task['title']}",
        f"  owner {task['owner']}, attempts {task['attempts']}, updated {task['updated_at']}",
    ]
    step = task.get("last_step")
    if step:
        lines.append(f"  last step: {step['user_message']}")
    if task.get("question"):
        options = ", ".join(task.get("options") or []) or "free text"
        lines.append(f"  question: {task['question']} ({options})")
    delivery = task.get("delivery")
    if delivery:
        lines.append(f"  delivery: {delivery['status']} at {delivery['at']}")
        for block in delivery.get("blocks", []):
            if block.get("type") == "outcome":
                lines.append(f"    {block['title']}: {block['summary']}")
            elif block.get("type") == "hero" and block.get("kind") == "pull_request":
                lines.append(f"    pull request #{block.get('number')}: {block.get('url')}")
    return "\n".join(lines)


def tasks(args: argparse.Namespace) -> int:
    """Run one ``etherd tasks`` subcommand."""
    url, token = target(args)

    async def go() -> int:
        async with Client(url, token) as client:
            result: Any
            if args.action == "create":
                scope = json_arg(args.scope, "--scope") if args.scope else None
                if scope is not None and not isinstance(scope, dict):
                    raise UsageError('--scope must be a JSON object, e.g. \'{"repo": "org/r"}\'')
                result = await client.create_task(
                    args.prompt, title=args.title, scope=scope, owner=args.owner
                )
                text = f"{result['task_id']}  {result['status']}  {result['title']}"
            elif args.action == "list":
                result = await client.tasks(limit=args.limit)
                rows = [f"{t['task_id']}  {t['status']:<11}  {t['title']}" for t in result["tasks"]]
                text = "\n".join(rows) if rows else "no tasks"
            elif args.action == "show":
                result = await client.task(args.task_id)
                text = _show(result)
            elif args.action == "answer":
                result = await client.answer(args.task_id, args.answer, args.option)
                text = f"{result['task_id']}  {result['status']}"
            else:
                result = await client.cancel(args.task_id)
                text = f"{result['task_id']}  {result['status']}"
        print(json.dumps(result, indent=2, ensure_ascii=False) if args.json else text)
        return EXIT_OK

    return run_client(f"etherd tasks {args.action}", go)
