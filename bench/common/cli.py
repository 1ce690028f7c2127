"""Command-line options every load benchmark shares: placement, output, profiling."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_placement(parser: argparse.ArgumentParser) -> None:
    """``--server-cpu`` (etherd's core, default 0) and ``--client-cpu`` (the load's, 1)."""
    parser.add_argument("--server-cpu", type=int, default=0, help="etherd's core")
    parser.add_argument("--client-cpu", type=int, default=1, help="the load's core")


def add_output(parser: argparse.ArgumentParser, what: str = "one JSON line per run") -> None:
    """``--label`` (a name kept in each record) and ``--json FILE`` (append records)."""
    parser.add_argument("--label", default="", help="a name for this run in the JSON line")
    parser.add_argument("--json", type=Path, help=f"append {what}")


def add_py_spy(parser: argparse.ArgumentParser) -> None:
    """``--py-spy FILE`` with its sampling rate and ``--py-spy-native``."""
    parser.add_argument("--py-spy", type=Path, help="record the server into this raw profile")
    parser.add_argument("--py-spy-rate", type=int, default=200, help="samples per second")
    parser.add_argument("--py-spy-native", action="store_true", help="include C frames")


def add_settings(parser: argparse.ArgumentParser) -> None:
    """``--set section.key=value``, repeatable: etherd settings for the run."""
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="an etherd setting for the run, e.g. store.batch_max_rows=10000",
    )
