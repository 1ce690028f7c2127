"""The header of every result: machine, kernel, versions, and the etherd commit measured."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import platform
import shutil
import sqlite3
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Final

ROOT: Final = Path(__file__).resolve().parents[2]
PACKAGES: Final = ("uvloop", "picows", "msgspec", "httptools", "asyncpg")
UWS_DIR: Final = ROOT / "bench" / "peers" / "uws"


def cpu_model() -> str:
    """``model name`` of /proc/cpuinfo (else the platform's processor string)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def cpu_detail() -> str:
    """The CPU model with family and model numbers, and whether the kernel runs in a VM."""
    info: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "cpu family", "model", "flags") and key not in info:
                info[key] = value.strip()
    text = info.get("model name", cpu_model())
    if "cpu family" in info:
        text += f" (family {info['cpu family']}, model {info.get('model', '?')})"
    if "hypervisor" in info.get("flags", "").split():
        text += ", virtual machine"
    return text


def git_state() -> tuple[str | None, str | None, str | None]:
    """The commit measured: ``(etherd, head, tree)``.

    ``etherd`` is the last commit that changed ``etherd/`` (what the server runs; bench
    commits on top do not change it), ``head`` is ``git rev-parse --short HEAD``, and
    ``tree`` says ``clean``, ``dirty outside etherd/`` or ``dirty in etherd/`` (tracked
    files only, as with ``git describe --dirty``); with ``etherd/`` dirty the etherd commit
    gets a ``+dirty`` suffix.
    """

    def git(*argv: str) -> str:
        return subprocess.run(
            ["git", *argv], capture_output=True, text=True, check=True, cwd=ROOT
        ).stdout

    try:
        head = git("rev-parse", "--short", "HEAD").strip()
        etherd = git("log", "-1", "--format=%h", "--", "etherd").strip() or head
        changed = [
            line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines()
        ]
    except (OSError, subprocess.CalledProcessError):
        return None, None, None
    if not changed:
        return etherd, head, "clean"
    if any(path.startswith("etherd/") for path in changed):
        return etherd + "+dirty", head, "dirty in etherd/"
    return etherd, head, "dirty outside etherd/"


def node_version() -> str | None:
    """``node --version`` without the ``v``, or None without Node.js."""
    node = shutil.which("node")
    if node is None:
        return None
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        out = subprocess.run([node, "--version"], capture_output=True, text=True, check=True)
        return out.stdout.strip().lstrip("v")
    return None


def uws_version() -> str | None:
    """The installed uWS peer package as ``name@version``, or None if not installed."""
    with contextlib.suppress(OSError, ValueError):
        meta = json.loads((UWS_DIR / "node_modules" / "uwebsockets" / "package.json").read_text())
        return f"{meta['name']}@{meta['version']}"
    return None


def machine_info(peers: bool = False) -> dict[str, Any]:
    """CPU model, cores, RAM, kernel, Python and library versions, the etherd commit;
    with ``peers`` also Node.js and the uWS package."""
    mem_kb = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    versions: dict[str, str | None] = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    commit, head, tree = git_state()
    # The server runs with this interpreter and environment, so it is the etherd this
    # process would import: the repository's, or a scratch copy named by PYTHONPATH.
    spec = importlib.util.find_spec("etherd")
    origin = Path(spec.origin).resolve() if spec is not None and spec.origin else None
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "ram_gb": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        **versions,
        "sqlite": sqlite3.sqlite_version,
        "etherd_commit": commit,
        "head_commit": head,
        "etherd_tree": tree,
        "etherd_source": "repository"
        if origin is not None and origin.is_relative_to(ROOT)
        else "other copy",
    }
    if peers:
        info["node"] = node_version()
        info["uws"] = uws_version()
    return info


def header_lines(m: dict[str, Any]) -> list[str]:
    """Markdown bullets naming the machine, the versions and the commit of a result."""
    lines = [
        f"- Machine: {m.get('cpu_model') or m.get('cpu')}, {m.get('cores')} cores, "
        f"{m.get('ram_gb')} GB RAM, kernel {m.get('kernel')}",
        f"- Python {m.get('python')}, uvloop {m.get('uvloop')}, picows {m.get('picows')}, "
        f"msgspec {m.get('msgspec')}, httptools {m.get('httptools')}, "
        f"asyncpg {m.get('asyncpg')}",
    ]
    if m.get("node") or m.get("uws"):
        lines.append(f"- Node.js {m.get('node')}, uWS peer package {m.get('uws')}")
    lines.append(
        f"- etherd commit {m.get('etherd_commit')} (last change to etherd/)"
        + (f", measured from {m['head_commit']}" if m.get("head_commit") else "")
        + (f" ({m['etherd_tree']})" if m.get("etherd_tree") else "")
    )
    return lines
