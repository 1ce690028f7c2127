"""``python -m etherd`` and the ``etherd`` script: the command line lives in ``etherd.cli``."""

from __future__ import annotations

import sys

from etherd.cli.main import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
