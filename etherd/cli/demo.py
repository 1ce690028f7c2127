"""``etherd demo-harness``: a harness built on ``etherd.client`` that shows the product work.

It waits for claimable tasks, claims one, narrates a made-up piece of work step by step
(each step is an ``os.harness.step`` a frontend shows live), sometimes asks the user a
question and waits for the answer, and delivers a result with a pull-request artifact.
Nothing is really changed anywhere: the repository, the branch and the pull request are
invented from the task.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import zlib
from typing import Any

from etherd.cli.common import EXIT_OK, run_client, target
from etherd.client import Harness, Run, RunEnded

__all__ = ["demo_harness"]

QUESTION = "Which tests should I run before opening the pull request?"
OPTIONS = ["All tests", "Only the affected tests"]


def _say(task_id: str, text: str) -> None:
    print(f"[{task_id}] {text}", flush=True)


def _wants_question(mode: str, prompt: str, rng: random.Random) -> bool:
    if mode == "always":
        return True
    if mode == "never":
        return False
    # "sometimes": a prompt that asks something always gets a question back.
    return prompt.rstrip().endswith("?") or rng.random() < 0.5


def pull_request(task_id: str, repo: str) -> dict[str, Any]:
    """The made-up pull request a demo run delivers (stable for a task)."""
    number = zlib.crc32(task_id.encode()) % 900 + 100
    return {
        "number": number,
        "branch": f"etherd-demo/{task_id}",
        "url": f"https://github.com/{repo}/pull/{number}",
    }


async def work(run: Run, mode: str, delay_s: float, rng: random.Random) -> dict[str, Any]:
    """Narrate one run from claim to result; returns the result answer."""
    bundle = run.bundle
    tid = run.task_id
    scope = bundle.get("scope") or {}
    repo = str(scope.get("repo") or "example/repo")
    prompt = str(bundle.get("prompt") or "")

    async def step(message: str, label: str) -> None:
        _say(tid, message)
        await run.step(message, label=label)
        await asyncio.sleep(delay_s)

    await step(f"Reading {repo}…", "read_files")
    await step("Found the code this task is about.", "locate")
    await step("Planning the change…", "plan")
    tests = "the affected tests"
    if _wants_question(mode, prompt, rng):
        _say(tid, f"Asking: {QUESTION}")
        answer = await run.interrupt(QUESTION, OPTIONS)
        _say(tid, f"Answer: {answer.answer}")
        tests = (
            "all tests" if answer.option == OPTIONS[0] or "all" in answer.answer.lower() else tests
        )
    await step("Making the changes…", "edit")
    await step(f"Running {tests}… passed.", "test")
    pr = pull_request(tid, repo)
    await step(f"Opening pull request #{pr['number']}…", "open_pr")
    answer_body = await run.result(
        "submitted",
        agent_status=f"Opened PR #{pr['number']}",
        artifact={"pr": pr},
        working_summary=f"Made the change the task asked for in {repo} and ran {tests}.",
    )
    _say(tid, f"Delivered: {pr['url']} (task {answer_body.get('status')})")
    return answer_body


def demo_harness(args: argparse.Namespace) -> int:
    """Claim and run tasks until ``--max-tasks`` are done (0: forever)."""
    url, token = target(args)
    rng = random.Random(args.seed)

    async def go() -> int:
        done = 0
        async with Harness(url, token, args.app, answer_poll_s=args.poll) as harness:
            # Fail fast and clearly on a wrong URL or a refused token.
            await harness.claimable(limit=1)
            print(
                f"etherd demo-harness: waiting for tasks on {harness.client.url} "
                f"(create one: etherd tasks create 'Fix the checkout bug')",
                file=sys.stderr,
                flush=True,
            )
            while not args.max_tasks or done < args.max_tasks:
                run = await harness.next_run(poll_s=args.poll)
                _say(run.task_id, f"Claimed (run {run.run_id})")
                try:
                    async with run:
                        await work(run, args.ask, args.step_delay, rng)
                except RunEnded as exc:
                    _say(run.task_id, f"Stopped: {exc.message}")
                done += 1
        return EXIT_OK

    return run_client("etherd demo-harness", go)
