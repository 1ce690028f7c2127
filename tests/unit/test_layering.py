"""The architecture, checked against the code: which folder may import which, no import
cycles anywhere in etherd, and a pure core that does no I/O.

Rules are per folder, so a new module is covered the moment it is created. Every import
counts: ``from etherd.x import y``, ``import etherd.x``, relative imports, imports inside
functions and under ``if TYPE_CHECKING:``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "etherd"

# Layer of a module: its folder under etherd/ (edge is split by sub-folder); modules
# directly in etherd/ (the composition root, the supervisor) and in etherd/cli/ (the
# command line) are "top".
# Each layer may import these layers (and stdlib or third-party modules).
ALLOWED: dict[str, set[str]] = {
    "core": {"core"},
    "store": {"core", "store"},
    "services": {"core", "store", "services"},
    "edge": set(),
    "edge.http": {"core", "services", "edge.http"},
    "edge.ws": {"core", "services", "edge.ws"},
    "edge.ops": {"core", "services", "edge.http", "edge.ops"},
    "edge.api": {"core", "services", "edge.http", "edge.ws", "edge.ops", "edge.api"},
    "client": {"core", "client"},
    "top": {
        "top",
        "core",
        "store",
        "services",
        "edge.http",
        "edge.ws",
        "edge.ops",
        "edge.api",
        "client",
    },
}

# What the pure core may not import: anything that talks to the world (sockets, files, the
# environment, processes, threads, the event loop, drivers).
IO_MODULES = {
    "asyncio",
    "socket",
    "ssl",
    "selectors",
    "select",
    "threading",
    "concurrent",
    "multiprocessing",
    "subprocess",
    "signal",
    "os",
    "pathlib",
    "io",
    "shutil",
    "tempfile",
    "glob",
    "importlib",
    "sqlite3",
    "asyncpg",
    "picows",
    "httptools",
    "uvloop",
    "aiofastnet",
    "nats",
    "http",
    "urllib.request",
    "logging",
}
# Builtins that read or write the world.
IO_BUILTINS = {"open", "input", "print", "exec", "eval", "__import__"}
# Services run on the loop but never own a socket.
SOCKET_MODULES = {"socket", "ssl", "picows", "httptools", "uvloop", "aiofastnet", "selectors"}


def modules() -> dict[str, Path]:
    """``etherd.x.y`` -> its file, for every module of the package."""
    out: dict[str, Path] = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = modules()


def layer(module: str) -> str:
    parts = module.split(".")[1:]
    if len(parts) <= 1 and (PACKAGE / f"{parts[0] if parts else '__init__'}.py").is_file():
        return "top"
    if parts[0] == "cli":
        return "top"  # the command line: a front end over everything, like __main__
    if parts[0] == "edge":
        return "edge." + parts[1] if len(parts) > 1 else "edge"
    return parts[0]


def imports(module: str) -> Iterator[tuple[str, int]]:
    """Every module ``module`` imports (absolute names, etherd or not), with the line."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            yield name, node.lineno
            for alias in node.names:
                # ``from etherd.store import migrate`` imports the module etherd.store.migrate.
                if f"{name}.{alias.name}" in MODULES:
                    yield f"{name}.{alias.name}", node.lineno


def etherd_imports(module: str) -> set[str]:
    return {name for name, _ in imports(module) if name in MODULES and name != module}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_follow_the_layers(module: str) -> None:
    own = layer(module)
    allowed = ALLOWED[own]
    for name, line in imports(module):
        if name in MODULES and name != "etherd":
            target = layer(name)
            assert target in allowed, (
                f"{module} (layer {own}) imports {name} (layer {target}) at line {line}; "
                f"{own} may import only {sorted(allowed)}"
            )


def test_no_import_cycles() -> None:
    graph = {m: etherd_imports(m) - {"etherd"} for m in MODULES}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = 0

    def visit(node: str) -> None:
        nonlocal counter
        index[node] = low[node] = counter
        counter += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if layer(m) == "core"))
def test_the_core_does_no_io(module: str) -> None:
    roots = set()
    for name, line in imports(module):
        for forbidden in IO_MODULES:
            if name == forbidden or name.startswith(forbidden + "."):
                roots.add(f"{name} (line {line})")
    assert not roots, f"{module} imports I/O modules: {sorted(roots)}"
    tree = ast.parse(MODULES[module].read_text())
    calls = {
        f"{node.func.id}() at line {node.lineno}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in IO_BUILTINS
    }
    assert not calls, f"{module} calls {sorted(calls)}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if layer(m) == "services"))
def test_services_own_no_socket(module: str) -> None:
    found = {
        name
        for name, _ in imports(module)
        if any(name == s or name.startswith(s + ".") for s in SOCKET_MODULES)
    }
    assert not found, f"{module} imports socket-level modules {sorted(found)}"


def test_the_rules_see_every_folder() -> None:
    layers = {layer(m) for m in MODULES}
    assert layers <= set(ALLOWED), f"folders without rules: {sorted(layers - set(ALLOWED))}"
    # A module the rules could never flag would make this test vacuous.
    assert {"core", "services", "edge.http", "edge.ws", "edge.api", "store", "top"} <= layers
