"""Collect ``bench_*.py`` here: pytest's default ``python_files`` only matches ``test_*.py``.

The project's ``testpaths`` is ``tests``, so a plain ``pytest`` never comes here; this hook
makes ``python -m pytest bench/micro --benchmark-only`` (``make bench-micro``) find the
benchmark modules without renaming them into the test suite's namespace.
"""

from __future__ import annotations

from pathlib import Path

import pytest


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Module | None:
    # A file named on the command line is collected by pytest itself already.
    if parent.session.isinitpath(file_path):
        return None
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        module: pytest.Module = pytest.Module.from_parent(parent, path=file_path)
        return module
    return None
