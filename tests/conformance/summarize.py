"""Judge an Autobahn fuzzingclient run: behaviours by count and the failing cases.

Usage: ``summarize.py [--server-log FILE] REPORT_DIR`` where ``REPORT_DIR`` holds the
suite's ``index.json`` (``{agent: {case: {"behavior", "behaviorClose", ...}}}``) and one
``<agent>_case_<id>.json`` per case.

A case passes when its ``behavior`` is OK, NON-STRICT or INFORMATIONAL; any other case fails
the run (there is no allow-list: etherd owns its framing, so every case is its own). Exit
status: 0 pass, 1 failures, 2 unreadable input.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Final

__all__ = ["EXPECTED_CASES", "PASSING", "CaseResult", "main"]

PASSING: Final = frozenset({"OK", "NON-STRICT", "INFORMATIONAL"})

# autobahntestsuite 0.8.2 has 247 cases once 9.*, 12.* and 13.* are excluded; fewer means
# the run stopped early (etherd died, wstest crashed) and must not pass.
EXPECTED_CASES: Final = 247


@dataclass(frozen=True)
class CaseResult:
    """One case from ``index.json``, plus what its own report says about the close."""

    case: str
    behavior: str
    behavior_close: str
    remote_close_code: int | None
    remote_close_reason: str | None
    result: str

    @property
    def passed(self) -> bool:
        return self.behavior in PASSING


class InputError(Exception):
    """The report directory is missing or not what the suite writes."""


def case_key(case: str) -> tuple[int, ...]:
    """Sort key: ``"10.1.1"`` after ``"7.13.2"``."""
    return tuple(int(part) if part.isdigit() else 0 for part in case.split("."))


def _str(value: object) -> str:
    return value if isinstance(value, str) else ""


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def load(report_dir: Path) -> dict[str, list[CaseResult]]:
    """Every agent's cases from ``report_dir/index.json``, sorted by case id."""
    index_path = report_dir / "index.json"
    try:
        index: object = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read {index_path}: {exc}") from exc
    if not isinstance(index, dict) or not index:
        raise InputError(f"{index_path}: expected a non-empty object of agents")
    agents: dict[str, list[CaseResult]] = {}
    for agent, cases in index.items():
        if not isinstance(cases, dict):
            raise InputError(f"{index_path}: agent {agent!r} is not an object of cases")
        results: list[CaseResult] = []
        for case, entry in cases.items():
            if not isinstance(entry, dict) or not isinstance(entry.get("behavior"), str):
                raise InputError(f"{index_path}: case {case} has no behavior")
            detail = _case_report(report_dir, entry.get("reportfile"))
            code = _int_or_none(detail.get("remoteCloseCode", entry.get("remoteCloseCode")))
            reason = detail.get("remoteCloseReason")
            results.append(
                CaseResult(
                    case=str(case),
                    behavior=entry["behavior"],
                    behavior_close=_str(entry.get("behaviorClose")),
                    remote_close_code=code,
                    remote_close_reason=reason if isinstance(reason, str) else None,
                    result=_str(detail.get("result")),
                )
            )
        results.sort(key=lambda r: case_key(r.case))
        agents[str(agent)] = results
    return agents


def _case_report(report_dir: Path, name: object) -> dict[str, object]:
    """A case's own JSON report, or ``{}`` when it is missing (details are then blank)."""
    if not isinstance(name, str) or not name:
        return {}
    try:
        data: object = json.loads((report_dir / name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {str(k): v for k, v in data.items()} if isinstance(data, dict) else {}


def server_tracebacks(log_path: Path) -> int:
    """How many tracebacks the server logged (an exception escaped a handler)."""
    try:
        text = log_path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return 0
    return text.count("Traceback (most recent call last)")


def etherd_version() -> str:
    try:
        return metadata.version("etherd")
    except metadata.PackageNotFoundError:
        return "not installed"


def report(agents: dict[str, list[CaseResult]], tracebacks: int) -> int:
    """Print the summary; return the exit status."""
    failed_run = False
    print(f"etherd {etherd_version()}")
    for agent, results in agents.items():
        counts = Counter(r.behavior for r in results)
        print(f"\nagent {agent}: {len(results)} cases (9.*, 12.*, 13.* excluded)")
        print(f"  {'behavior':<15} {'count':>5}")
        print(f"  {'-' * 15} {'-' * 5}")
        for behavior, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
            print(f"  {behavior:<15} {n:>5}")
        if len(results) != EXPECTED_CASES:
            failed_run = True
            print(
                f"\n  ERROR: {len(results)} cases in the report, expected {EXPECTED_CASES}: "
                "the run stopped early or the suite version changed"
            )

        not_passing = [r for r in results if not r.passed]
        if not_passing:
            print("\n  cases not OK / NON-STRICT / INFORMATIONAL:")
        for r in not_passing:
            failed_run = True
            print(
                f"  FAIL    {r.case:<8} behavior={r.behavior} "
                f"behaviorClose={r.behavior_close} remoteCloseCode={r.remote_close_code} "
                f"reason={r.remote_close_reason!r}"
            )
            if r.result:
                print(f"          result: {r.result}")

    if tracebacks:
        failed_run = True
        print(f"\nERROR: the server log holds {tracebacks} traceback(s): an exception escaped")
    print("\nverdict:", "FAILED" if failed_run else "PASSED")
    return 1 if failed_run else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("report_dir", type=Path, help="folder with the suite's index.json")
    parser.add_argument("--server-log", type=Path, help="etherd's log, checked for tracebacks")
    args = parser.parse_args(argv)
    report_dir: Path = args.report_dir
    server_log: Path | None = args.server_log
    try:
        agents = load(report_dir)
    except InputError as exc:
        print(f"summarize: {exc}", file=sys.stderr)
        return 2
    tracebacks = server_tracebacks(server_log) if server_log is not None else 0
    return report(agents, tracebacks)


if __name__ == "__main__":
    sys.exit(main())
