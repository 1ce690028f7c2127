"""The pure core imports no I/O: no asyncio, sockets, picows, httptools or database drivers."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "etherd"
PURE = [
    "auth",
    "clock",
    "config",
    "delivery",
    "errors",
    "eventlog",
    "hub",
    "messages",
    "routes",
    "tasks",
    "topics",
]
FORBIDDEN = {
    "asyncio",
    "socket",
    "picows",
    "httptools",
    "asyncpg",
    "sqlite3",
    "uvloop",
    "selectors",
    "threading",
    "concurrent",
}


def imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    roots: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
            if node.module.split(".")[0] == "etherd":
                roots.add("etherd." + node.module.split(".")[1])
    return roots


@pytest.mark.parametrize("module", PURE)
def test_pure_module_imports_no_io(module: str) -> None:
    roots = imported_roots(PACKAGE / f"{module}.py")
    assert not roots & FORBIDDEN, f"etherd.{module} imports {sorted(roots & FORBIDDEN)}"
    impure = {r for r in roots if r.startswith("etherd.") and r[7:] not in PURE}
    assert not impure, f"etherd.{module} imports edge modules {sorted(impure)}"
