"""The fan-out driver against clusters: what the bus adds, what it costs, how workers scale.

Run from the repository root in the virtualenv (``make bench-cluster``)::

    python -m bench.fanout.cluster                          # every case, 3 rounds (~25 min)
    python -m bench.fanout.cluster --cases cross,same --rounds 1
    python -m bench.fanout.cluster --report-only bench/results/X.jsonl --name X
    python -m bench.fanout.cluster --cases cross,same --transient --py-spy DIR  # diagnosis

Every run is one ``bench.fanout.driver`` run (its subscribers, publisher, noise checks and
record) against servers this module starts, fresh for each run: a new database on one
throwaway PostgreSQL cluster (fsync on), a new nats-server on a free loopback port and new
etherd nodes. PostgreSQL, nats-server and every etherd process are pinned to core 0
(``taskset``; PostgreSQL's processes are re-pinned after it starts); the C subscriber
client, the publisher and this process run on core 1. Publishes are durable
``POST /api/publish`` events of ``--payload`` bytes, open loop.

Cases (``--cases``), each measured once per round, rounds interleaved:

``cross`` / ``same``
    Two nodes A and B (one database, one nats-server, distinct ``cluster.node_id``).
    ``--cross-subscribers`` (100) subscribers on B, ``--cross-rate`` (1,000) events/s.
    ``cross`` publishes on A, so every event reaches B over the bus; ``same`` publishes on
    B with A present and idle. The difference of their p99 is what the bus adds.
``cost-cluster`` / ``cost-single``
    ``--cost-subscribers`` (1,000) subscribers x ``--cost-rate`` (100) events/s.
    ``cost-cluster``: the two-node cluster, subscribers on B, publishes on A.
    ``cost-single``: one etherd with no bus, publisher and subscribers on it. Compared:
    the subscribers' node's CPU per delivered frame.
``scale-1`` / ``scale-2``
    ``etherd serve`` with ``server.workers`` 1 (one process, no bus, pinned to core 0) or 2
    (the supervisor, its two workers and the local nats-server it starts, on cores 0 and
    1, so the load on core 1 shares a core with the workers), at ``--scale-subscribers`` x
    ``--scale-rate``, a load that keeps one worker CPU-bound. Compared: delivered frames/s
    per core of worker CPU (the sum of every worker's user+sys seconds from /proc over the
    window, divided by the window).
``idle-cluster`` / ``idle-single``
    ``--idle`` idle connections, each subscribed to one of ``--idle-topics`` topics, on B
    of a two-node cluster or on a node with no bus: the node's RSS (the driver's ``--idle``).

Output (``--out-dir``, default ``bench/results``): ``cluster-<date>.jsonl`` with every
run's driver record plus ``case`` and, for cluster nodes, ``bus`` (each node's
``etherd_cluster_*`` and store counters, scraped before it stops), and ``cluster-<date>.md``
with the machine header, one table per case and the three targets' verdicts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing as mp
import os
import signal
import statistics
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, Final

from bench.common import pg
from bench.common.cpu import descendants, pin, pin_tree, proc_name, raise_nofile
from bench.common.machine import cpu_detail, header_lines, machine_info
from bench.common.metrics import Scrape, commit_figures, histogram_delta, scrape
from bench.common.nats import NatsServer, nats_version
from bench.common.server import ServerProcess, start_etherd
from bench.fanout import driver

ROOT: Final = Path(__file__).resolve().parents[2]
DATABASE: Final = "etherd_bench_cluster"
SERVER_CPU: Final = "0"
LOAD_CPU: Final = "1"
CASES: Final = (
    "cross",
    "same",
    "cost-cluster",
    "cost-single",
    "scale-1",
    "scale-2",
    "idle-cluster",
    "idle-single",
)
# Targets of the cluster benchmark.
ADDED_P99_MS: Final = 2.0
COST_RATIO: Final = 1.15
SCALE_RATIO: Final = 0.9
READING: Final = "\n## Reading"
BUS_COUNTERS: Final = (
    "etherd_cluster_events_published_total",
    "etherd_cluster_events_received_total",
    "etherd_cluster_events_dropped_total",
    "etherd_cluster_bad_messages_total",
    "etherd_cluster_gap_fills_total",
    "etherd_cluster_gap_events_total",
    "etherd_cluster_catch_ups_total",
)


# -- the servers of one run ----------------------------------------------------------------


@dataclass
class ClusterTarget(driver.Target):
    """The driver's target plus every process a cluster run started, stopped together."""

    nodes: dict[str, ServerProcess] = field(default_factory=dict)
    nats: NatsServer | None = None
    # Each node's counters, read just before it stops (fresh nodes: since their start).
    scraped: dict[str, Scrape] = field(default_factory=dict)
    # Sockets each worker held when the window opened: how the kernel spread the load.
    sockets: dict[str, int] = field(default_factory=dict)

    def worker(self, name: str, pid: int) -> Callable[[], list[int]]:
        """A group of one worker that notes its socket count each time it is listed."""

        def pids() -> list[int]:
            self.sockets[name] = count_sockets(pid)
            return [pid]

        return pids

    def stop(self) -> None:
        for name, node in self.nodes.items():
            with contextlib.suppress(OSError):
                self.scraped[name] = scrape(node.port)
        for node in reversed(self.nodes.values()):
            node.stop()
        if self.nats is not None:
            self.nats.stop()


def count_sockets(pid: int) -> int:
    """Open sockets of a process (its descriptors that are sockets)."""
    n = 0
    with contextlib.suppress(OSError):
        for fd in os.scandir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                n += os.readlink(fd.path).startswith("socket:")
    return n


def just(*pids: int) -> Callable[[], list[int]]:
    """A group of processes known at start (see ``driver.Target.groups``)."""
    return lambda: list(pids)


def readyz(port: int) -> dict[str, Any] | None:
    """``GET /readyz`` on a fresh connection: the body if 200, else None."""
    with (
        contextlib.suppress(OSError, ValueError),
        urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r,
    ):
        body: dict[str, Any] = json.loads(r.read())
        return body
    return None


def wait_bus(ports: Sequence[int], nodes: int, timeout: float = 30.0) -> None:
    """Wait until ``nodes`` distinct nodes answer on ``ports`` with the bus connected and
    every other node heard (heartbeats), so subscribers never meet a half-formed cluster.
    Fresh connections to one ``SO_REUSEPORT`` port reach its workers in turn."""
    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for port in ports:
            body = readyz(port)
            bus = (body or {}).get("cluster") or {}
            if bus.get("bus") == "connected" and bus.get("peers", 0) >= nodes - 1:
                seen.add(str(bus.get("node")))
        if len(seen) >= nodes:
            return
        time.sleep(0.1)
    raise RuntimeError(f"only {len(seen)} of {nodes} nodes joined the bus in {timeout:g} s")


class Placement:
    """What every run shares: the options, the PostgreSQL server and its postmaster."""

    def __init__(self, args: argparse.Namespace, pg_server: str) -> None:
        self.args = args
        self.pg_server = pg_server
        self.postmaster = pg.postmaster_pid(pg_server)

    def postgres(self) -> list[int]:
        return descendants(self.postmaster)

    def settings(self, n_conns: int, **sections: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """The driver's etherd settings for ``n_conns`` plus ``sections``."""
        out = driver.etherd_settings(self.args, n_conns)
        for name, values in sections.items():
            out.setdefault(name, {}).update(values)
        return out

    def pair(self, n_conns: int, publish_on: str) -> ClusterTarget:
        """Nodes A and B on one database and one nats-server; subscribers go to B."""
        store = pg.fresh_database(self.pg_server, DATABASE)
        nats = NatsServer(cpu=SERVER_CPU)
        target = ClusterTarget("etherd", "127.0.0.1", 0, None, nats=nats)
        try:
            for name in ("a", "b"):
                cluster = {"nats_url": nats.url, "node_id": f"node-{name}"}
                # One at a time: each migrates the (new) schema on start.
                target.nodes[name] = start_etherd(
                    cpu=SERVER_CPU,
                    store=store,
                    settings=self.settings(n_conns, cluster=cluster),
                )
            wait_bus([n.port for n in target.nodes.values()], 2)
        except BaseException:
            target.stop()
            raise
        a, b = target.nodes["a"], target.nodes["b"]
        target.port, target.pid = b.port, b.pid
        target.publish_port = a.port if publish_on == "a" else b.port
        target.groups = {
            "node_a": just(a.pid),
            "nats": just(nats.pid),
            "postgres": self.postgres,
        }
        return target

    def single(self, n_conns: int) -> ClusterTarget:
        """One etherd with no bus."""
        store = pg.fresh_database(self.pg_server, DATABASE)
        node = start_etherd(cpu=SERVER_CPU, store=store, settings=self.settings(n_conns))
        target = ClusterTarget("etherd", node.host, node.port, node.pid, nodes={"single": node})
        target.groups = {"postgres": self.postgres}
        return target

    def workers(self, n_conns: int, workers: int) -> ClusterTarget:
        """``etherd serve`` with ``server.workers`` (what ``--workers`` sets): one plain
        process on core 0, or a supervisor with its workers and nats-server on 0 and 1."""
        store = pg.fresh_database(self.pg_server, DATABASE)
        cpus = SERVER_CPU if workers == 1 else f"{SERVER_CPU},{LOAD_CPU}"
        top = start_etherd(
            cpu=cpus, store=store, settings=self.settings(n_conns, server={"workers": workers})
        )
        target = ClusterTarget("etherd", top.host, top.port, top.pid, nodes={"server": top})
        try:
            if workers > 1:
                wait_bus([top.port], workers)
        except BaseException:
            target.stop()
            raise
        children = [p for p in descendants(top.pid) if p != top.pid]
        nats = [p for p in children if proc_name(p) == "nats-server"]
        procs = [p for p in children if p not in nats] if workers > 1 else [top.pid]
        groups: dict[str, Callable[[], list[int]]] = {"postgres": self.postgres}
        for i, pid in enumerate(sorted(procs), 1):
            groups[f"worker_{i}"] = target.worker(f"worker_{i}", pid)
        if nats:
            groups["nats"] = just(*nats)
        target.groups = groups
        return target


# -- the cases -----------------------------------------------------------------------------


def driver_argv(args: argparse.Namespace, case: str) -> list[str]:
    """The driver's command line for one case."""
    common = [
        "--payload",
        str(args.payload),
        "--client-cpus",
        LOAD_CPU,
        "--wait-quiet",
        str(args.wait_quiet),
        "--wait-quiet-max",
        str(args.wait_quiet_max),
        "--max-noise",
        str(args.max_noise),
        "--retry-noisy",
        str(args.retry_noisy),
        "--label",
        case,
    ]
    if args.py_spy and not case.startswith("idle"):
        # The subscribers' node (B, or the single node); the driver samples it.
        spy = args.py_spy / f"{case}.txt"
        common += ["--py-spy", str(spy), "--py-spy-format", "raw"]
        common += ["--py-spy-bin", str(Path(sys.executable).parent / "py-spy")]
    if case.startswith("idle"):
        return [*common, "--idle", str(args.idle), "--topics", str(args.idle_topics)]
    n, rate = {
        "cross": (args.cross_subscribers, args.cross_rate),
        "same": (args.cross_subscribers, args.cross_rate),
        "cost-cluster": (args.cost_subscribers, args.cost_rate),
        "cost-single": (args.cost_subscribers, args.cost_rate),
        "scale-1": (args.scale_subscribers, args.scale_rate),
        "scale-2": (args.scale_subscribers, args.scale_rate),
    }[case]
    load = ["-n", str(n), "--rate", str(rate), "--duration", str(args.duration)]
    # --transient is a diagnosis: without the commit on the path, what is left is the bus.
    return [*common, *load, *([] if args.transient else ["--durable"])]


def starter(place: Placement, case: str, n_conns: int) -> Callable[[], ClusterTarget]:
    """How a case's servers start."""
    return {
        "cross": lambda: place.pair(n_conns, publish_on="a"),
        "same": lambda: place.pair(n_conns, publish_on="b"),
        "cost-cluster": lambda: place.pair(n_conns, publish_on="a"),
        "cost-single": lambda: place.single(n_conns),
        "scale-1": lambda: place.workers(n_conns, 1),
        "scale-2": lambda: place.workers(n_conns, 2),
        "idle-cluster": lambda: place.pair(n_conns, publish_on="b"),
        "idle-single": lambda: place.single(n_conns),
    }[case]


def bus_figures(scraped: dict[str, Scrape], window_s: float | None) -> dict[str, Any]:
    """Each node's bus and commit counters since it started."""
    out: dict[str, Any] = {}
    empty = Scrape()
    for name, s in scraped.items():
        figures: dict[str, Any] = {
            k.removeprefix("etherd_cluster_").removesuffix("_total"): int(s.values[k])
            for k in BUS_COUNTERS
            if k in s.values
        }
        lag = histogram_delta(empty, s, "etherd_cluster_lag_seconds")
        if lag["count"]:
            figures["lag"] = lag
        commits = commit_figures(empty, s, window_s or 0.0)
        if commits["rows"]:
            figures["commits"] = commits
        out[name] = figures
    return out


def run_case(
    place: Placement, ctx: Any, case: str, rnd: int, machine: dict[str, Any]
) -> dict[str, Any]:
    """One driver run of ``case``; its record."""
    args = driver.parse_args(driver_argv(place.args, case))
    n_conns = args.idle or args.subscribers
    started: list[ClusterTarget] = []

    def start() -> ClusterTarget:
        target = starter(place, case, n_conns)()
        started.append(target)
        return target

    record = driver.one_run(args, ctx, "etherd", start=start)
    target = started[-1]
    record = {"case": case, "round": rnd, **record, "machine": machine}
    if not case.startswith("scale"):  # a worker's /metrics would be one worker's of two
        record["bus"] = bus_figures(target.scraped, record.get("window_s"))
    if target.sockets:
        record["worker_sockets"] = target.sockets
    return record


# -- summaries -----------------------------------------------------------------------------


def median(values: Sequence[float | None]) -> float | None:
    """The median of the numbers among ``values`` (None if there are none)."""
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(vals) if vals else None


def worker_cpu_s(r: dict[str, Any]) -> float:
    """Seconds of CPU of every worker of a ``scale`` run over its window."""
    groups: dict[str, float] = r.get("server_side_cpu_s", {})
    return sum(v for k, v in groups.items() if k.startswith("worker_"))


def fps_per_core(r: dict[str, Any]) -> float | None:
    """Delivered frames/s per core of worker CPU (frames / worker CPU seconds)."""
    cpu = worker_cpu_s(r)
    return r["delivered_frames"] / cpu if cpu > 0 else None


def _f(v: Any, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _row(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def load_core(r: dict[str, Any]) -> str:
    busy: dict[str, float] = r.get("cpu_busy_pct", {})
    return " / ".join(f"{busy[c]:.0f}" for c in sorted(busy))


def side_cpu(r: dict[str, Any]) -> str:
    pct: dict[str, float] = r.get("server_side_cpu_pct", {})
    return ", ".join(f"{k} {v:.0f}" for k, v in pct.items())


def fanout_table(runs: Sequence[dict[str, Any]]) -> list[str]:
    """One row per run of a fan-out case."""
    lines = [
        _row(
            (
                "round",
                "delivered",
                "frames/s",
                "p50 ms",
                "p99 ms",
                "max ms",
                "node CPU %",
                "µs/frame",
                "other server-side CPU %",
                "client %",
                "core 0 / 1 busy %",
                "noise %",
                "try",
            )
        ),
        _row(["---"] * 13),
    ]
    for r in runs:
        lat = r["latency_ms"]
        lines.append(
            _row(
                (
                    r["round"],
                    f"{100 * (r['delivered_fraction'] or 0):.2f} %",
                    _f(r["delivered_fps"]),
                    _f(lat["p50"], 2),
                    _f(lat["p99"], 2),
                    _f(lat["max"], 1),
                    _f(r["server_cpu_pct"]),
                    _f(r["server_us_per_frame"], 2),
                    side_cpu(r),
                    ", ".join(f"{c:.0f}" for c in r["client_cpu_pct"]),
                    load_core(r),
                    _f(r["noise_pct"]),
                    r.get("attempt", 1),
                )
            )
        )
    return lines


def idle_table(runs: Sequence[dict[str, Any]]) -> list[str]:
    """One row per idle run."""
    lines = [
        _row(("round", "connected", "RSS before MB", "RSS after MB", "KB per connection")),
        _row(["---"] * 5),
    ]
    lines += [
        _row(
            (
                r["round"],
                _f(r["connected"]),
                _f(r["server_rss_before_mb"]),
                _f(r["server_rss_after_mb"]),
                _f(r["kb_per_connection"], 2),
            )
        )
        for r in runs
    ]
    return lines


def bus_lines(runs: Sequence[dict[str, Any]]) -> list[str]:
    """The bus counters of each run, one line per node."""
    out = []
    for r in runs:
        for node, f in (r.get("bus") or {}).items():
            counters = ", ".join(f"{k} {v:,}" for k, v in f.items() if isinstance(v, int))
            extra = ""
            if "lag" in f:
                extra += f"; lag p50 {f['lag']['p50_bucket']} s, p90 {f['lag']['p90_bucket']} s"
            if "commits" in f:
                c = f["commits"]
                extra += (
                    f"; {c['rows']:,} rows in {c['commits']:,} commits "
                    f"({c['rows_per_commit']} rows each, {c['mean_commit_ms']} ms)"
                )
            out.append(f"- round {r['round']}, {node}: {counters}{extra}")
    return out


def paired(
    by: dict[str, list[dict[str, Any]]],
    a: str,
    b: str,
    get: Callable[[dict[str, Any]], float | None],
    combine: Callable[[float, float], float],
    max_noise: float,
) -> list[tuple[float, bool]]:
    """Round by round, ``combine(get(a), get(b))`` and whether either run of the round had
    more than ``max_noise`` % of a core of other users' CPU."""
    rounds = {r["round"]: r for r in by.get(a, [])}
    out = []
    for rb in by.get(b, []):
        ra = rounds.get(rb["round"])
        if ra is None:
            continue
        va, vb = get(ra), get(rb)
        if va is not None and vb is not None:
            noisy = max(ra["noise_pct"], rb["noise_pct"]) > max_noise
            out.append((combine(va, vb), noisy))
    return out


def shown(pairs: Sequence[tuple[float, bool]], fmt: str) -> str:
    """Pairs as text, a star on the noisy ones."""
    return ", ".join(format(v, fmt) + ("*" if noisy else "") for v, noisy in pairs)


def verdict(
    pairs: Sequence[tuple[float, bool]], of_medians: float, good: Callable[[float], bool]
) -> str:
    """Judged on the quiet pairs when there are any (other users' load swamps the rest),
    else on the medians, saying so."""
    quiet = [v for v, noisy in pairs if not noisy]
    if quiet:
        value = statistics.median(quiet)
        word = "met" if good(value) else "missed"
        return f"{word} ({value:.2f} on {len(quiet)} quiet pair{'s' if len(quiet) > 1 else ''})"
    word = "met" if good(of_medians) else "missed"
    return f"{word} on the medians, every pair noisy"


def verdicts(by: dict[str, list[dict[str, Any]]], max_noise: float = 5.0) -> list[str]:
    """The three targets: from the medians over the rounds, and round by round (the two
    runs of a round ran minutes apart, so a pair saw the most similar machine)."""
    lines = [
        _row(("target", "medians of the rounds", "round by round", "goal", "verdict")),
        _row(["---"] * 5),
    ]

    def med(case: str, get: Callable[[dict[str, Any]], float | None]) -> float | None:
        return median([get(r) for r in by.get(case, [])])

    def p(q: str) -> Callable[[dict[str, Any]], float | None]:
        return lambda r: r["latency_ms"][q]

    def added(same: float, cross: float) -> float:
        return cross - same

    def ratio_of(a: float, b: float) -> float:
        return b / a if a else math.nan

    def us(r: dict[str, Any]) -> float | None:
        v: float | None = r["server_us_per_frame"]
        return v

    cross99, same99 = med("cross", p("p99")), med("same", p("p99"))
    if cross99 is not None and same99 is not None:
        a50 = paired(by, "same", "cross", p("p50"), added, max_noise)
        a99 = paired(by, "same", "cross", p("p99"), added, max_noise)
        lines.append(
            _row(
                (
                    "cross-node delivery: added p99 (ms)",
                    f"cross p50 {_f(med('cross', p('p50')), 2)} / p99 {_f(cross99, 2)} ms; "
                    f"same-node p50 {_f(med('same', p('p50')), 2)} / p99 {_f(same99, 2)} ms; "
                    f"added p99 {cross99 - same99:+.2f} ms",
                    f"added p50 {shown(a50, '+.2f')}; added p99 {shown(a99, '+.2f')}",
                    f"<= {ADDED_P99_MS:g} ms",
                    verdict(a99, cross99 - same99, lambda v: v <= ADDED_P99_MS),
                )
            )
        )
    cc, cs = med("cost-cluster", us), med("cost-single", us)
    if cc is not None and cs:
        pairs = paired(by, "cost-single", "cost-cluster", us, ratio_of, max_noise)
        lines.append(
            _row(
                (
                    "cost of clustering: node CPU per frame, cluster / single",
                    f"cluster node B {cc:.2f} µs, single node {cs:.2f} µs: ratio {cc / cs:.2f}",
                    shown(pairs, ".2f"),
                    f"<= {COST_RATIO}",
                    verdict(pairs, cc / cs, lambda v: v <= COST_RATIO),
                )
            )
        )
    s1, s2 = med("scale-1", fps_per_core), med("scale-2", fps_per_core)
    if s1 and s2 is not None:
        pairs = paired(by, "scale-1", "scale-2", fps_per_core, ratio_of, max_noise)
        lines.append(
            _row(
                (
                    "scaling: frames/s per worker core, 2 workers / 1",
                    f"1 worker {s1:,.0f}, 2 workers {s2:,.0f}: ratio {s2 / s1:.2f}",
                    shown(pairs, ".2f"),
                    f">= {SCALE_RATIO}",
                    verdict(pairs, s2 / s1, lambda v: v >= SCALE_RATIO),
                )
            )
        )
    if len(lines) > 2:
        lines += [
            "",
            f"\\* a round in which a run had more than {max_noise:g} % of a core of noise.",
        ]
    return lines


def scale_lines(runs: Sequence[dict[str, Any]]) -> list[str]:
    """Per scale run: frames, worker CPU and the frames per worker core."""
    out = []
    for r in runs:
        cpu = worker_cpu_s(r)
        per = fps_per_core(r)
        out.append(
            f"- round {r['round']}: {r['delivered_frames']:,} frames in {r['window_s']} s "
            f"({r['delivered_fps']:,}/s), worker CPU {cpu:.2f} s "
            f"({100 * cpu / r['window_s']:.0f} % of a core), "
            f"{_f(per, 0)} frames per worker-core-second"
            + (f"; sockets per worker {r['worker_sockets']}" if r.get("worker_sockets") else "")
        )
    return out


TITLES: Final = {
    "cross": "cross: subscribers on B, publisher on A",
    "same": "same: subscribers and publisher on B, A idle",
    "cost-cluster": "cost-cluster: subscribers on B, publisher on A",
    "cost-single": "cost-single: one node, no bus",
    "scale-1": "scale-1: one process (no bus), core 0",
    "scale-2": "scale-2: supervisor, 2 workers and nats-server on cores 0-1 (load on core 1)",
    "idle-cluster": "idle-cluster: idle subscribed connections on B of two nodes",
    "idle-single": "idle-single: idle subscribed connections on a node with no bus",
}


def markdown(records: Sequence[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The result file: header, verdicts, then every case's runs."""
    by: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by.setdefault(r["case"], []).append(r)
    machine = records[0]["machine"] if records else {}
    first = next((r for r in records if r.get("mode") == "fanout"), {})
    lines = [
        f"# Cluster fan-out ({meta.get('date', '')})",
        "",
        *header_lines(machine),
        f"- PostgreSQL {meta.get('postgres')}; {meta.get('nats')}",
        f"- {meta.get('rounds')} interleaved rounds, {first.get('duration_s')} s per run, "
        f"{first.get('payload_bytes')}-byte "
        f"{'durable' if first.get('durable', True) else 'non-durable'} events "
        "(POST /api/publish, open loop), "
        "C subscriber client",
        "- PostgreSQL, nats-server and every etherd process pinned to core 0, the load "
        "(C client, publisher, driver) to core 1; scale-2's server processes run on cores 0 "
        "and 1 and share core 1 with the load",
        "- node CPU: user+sys of the subscribers' node (B; the supervisor in scale-2) from "
        "/proc over the window; µs/frame is that per delivered frame; other server-side "
        "CPU: node A, nats-server, PostgreSQL's processes, each worker",
        "- noise: CPU other users' processes used during the run, % of a core",
        "",
        "## Targets",
        "",
        *verdicts(by, meta.get("max_noise", 5.0)),
    ]
    for case in CASES:
        runs = by.get(case)
        if not runs:
            continue
        lines += ["", f"## {TITLES[case]}", ""]
        if runs[0].get("mode") == "idle":
            lines += idle_table(runs)
            continue
        r0 = runs[0]
        lines += [f"{r0['subscribers']:,} subscribers x {r0['rate']:g} events/s", ""]
        lines += fanout_table(runs)
        if case.startswith("scale"):
            lines += ["", *scale_lines(runs)]
        bus = bus_lines(runs)
        if bus:
            lines += [
                "",
                "Bus and store counters of each node since it started (every attempt of the run):",
                "",
                *bus,
            ]
    return "\n".join(lines) + "\n"


# -- command line --------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.fanout.cluster",
        description="fan-out across etherd nodes (see the module docstring)",
    )
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated: " + ", ".join(CASES))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=10.0, help="publish seconds per run")
    p.add_argument("--payload", type=int, default=300, help="event JSON bytes")
    p.add_argument("--cross-subscribers", type=int, default=100)
    p.add_argument("--cross-rate", type=float, default=1000.0)
    p.add_argument("--cost-subscribers", type=int, default=1000)
    p.add_argument("--cost-rate", type=float, default=100.0)
    p.add_argument("--scale-subscribers", type=int, default=1000)
    p.add_argument("--scale-rate", type=float, default=1000.0)
    p.add_argument(
        "--transient",
        action="store_true",
        help="publish non-durable events instead (diagnosis: the bus without the commit)",
    )
    p.add_argument(
        "--py-spy",
        type=Path,
        metavar="DIR",
        help="record the subscribers' node of each run with py-spy into DIR/CASE.txt",
    )
    p.add_argument("--idle", type=int, default=10000, help="idle connections")
    p.add_argument("--idle-topics", type=int, default=100, help="topics the idle ones hold")
    p.add_argument("--server-max-pending-mb", type=int, default=256)
    p.add_argument("--wait-quiet", type=float, default=15.0, metavar="PCT")
    p.add_argument("--wait-quiet-max", type=float, default=30.0)
    p.add_argument("--max-noise", type=float, default=5.0, metavar="PCT")
    p.add_argument("--retry-noisy", type=int, default=1)
    p.add_argument("--pg-server", help="a local PostgreSQL server URL (default: throwaway)")
    p.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--name", default=f"cluster-{date.today().isoformat()}")
    p.add_argument("--report-only", type=Path, help="rewrite the Markdown of a JSON lines file")
    args = p.parse_args(argv)
    args.case_list = [c for c in args.cases.split(",") if c]
    for c in args.case_list:
        if c not in CASES:
            p.error(f"unknown case {c!r}")
    return args


@contextlib.contextmanager
def postgres(args: argparse.Namespace) -> Iterator[str]:
    """``--pg-server`` (left where it runs), or a throwaway cluster (fsync on) pinned to
    the server core."""
    if args.pg_server:
        yield args.pg_server
        return
    with pg.throwaway_cluster(fsync=True) as url:
        # Started from this process, so on the load core: move every process of it.
        pin_tree(pg.postmaster_pid(url), {int(SERVER_CPU)})
        yield url


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    jsonl = args.out_dir / f"{args.name}.jsonl"
    md = args.out_dir / f"{args.name}.md"
    if args.report_only:
        kept = [json.loads(line) for line in args.report_only.read_text().splitlines()]
        text = markdown(kept, kept[0].get("meta", {}) if kept else {})
        # A reading written by hand below the tables survives a rewrite of the tables.
        old = md.read_text() if md.exists() else ""
        at = old.find(READING)
        md.write_text(text + (old[at:] if at >= 0 else ""))
        print(md)
        return 0
    # Stopped by a signal, still stop every server it started (the ``finally`` blocks); a
    # shell's background job starts with SIGINT ignored, so take it back too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    raise_nofile()
    pin(LOAD_CPU)  # this process and the load it forks stay off the server core
    ctx = mp.get_context("fork")
    machine = {**machine_info(), "cpu_model": cpu_detail()}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    with postgres(args) as server:
        place = Placement(args, server)
        meta = {
            "date": date.today().isoformat(),
            "postgres": pg.version(server),
            "nats": nats_version(),
            "rounds": args.rounds,
            "max_noise": args.max_noise,
            "durable": not args.transient,
        }
        for rnd in range(1, args.rounds + 1):
            for case in args.case_list:
                print(f"== {case}, round {rnd} of {args.rounds}", flush=True)
                record = run_case(place, ctx, case, rnd, machine)
                record["meta"] = meta
                records.append(record)
                print(driver.human({k: v for k, v in record.items() if k != "meta"}), flush=True)
                with jsonl.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(record, separators=(",", ":")) + "\n")
        pg.drop_database(server, DATABASE)
    md.write_text(markdown(records, meta))
    print(f"\n{md}\n{jsonl}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
