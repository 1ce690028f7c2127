"""What every target shares: starting libFuzzer on a ``test_one_input`` function."""

from __future__ import annotations

import sys
from collections.abc import Callable

import atheris


def main(test_one_input: Callable[[bytes], None]) -> None:
    """Hand ``sys.argv`` (libFuzzer flags and corpus directories) to atheris and fuzz."""
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
