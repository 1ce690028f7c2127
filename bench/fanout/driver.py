"""Fan-out latency driver: N WebSocket subscribers, an open-loop HTTP publisher, one report.

Run from the repository root::

    python -m bench.fanout.driver --subscribers 1000 --rate 100 --duration 10
    python -m bench.fanout.driver -n 1000 --rate 100 --peers etherd,uws --rounds 3
    python -m bench.fanout.driver --idle 10000 --peer uws

What it does
------------
1. Starts the server under test pinned with ``taskset`` to ``--server-cpu`` (default core
   0): ``python -m etherd serve`` with a generated configuration (dev auth, a temporary
   data directory, SQLite unless ``--store``, limits raised for N connections), or the
   uWebSockets.js peer (``bench/peers/uws/server.js``, same routes and event bytes).
   ``--peers etherd,uws`` (or ``--peer uws``) measures each load against both, a fresh
   server per run, interleaved: etherd, uws, etherd, uws, ... for ``--rounds`` rounds.
   ``--url`` targets an etherd that is already running instead (``--server-pid`` then
   lets the driver still read its CPU and memory).
2. Connects N subscribers from ``--clients`` processes pinned to ``--client-cpus``
   (default core 1). Subscriber ``i`` subscribes to ``bench/{i % T}`` (zero-padded; or
   ``bench/*`` with ``--pattern``) and waits for the ``subscribed`` reply. ``--client c``
   (default) is ``subclient.c``; ``picows`` and ``raw`` are the Python clients.
3. A publisher process (``publisher.py``, pinned with the clients, ``SCHED_FIFO``) sends one
   event per ``POST /api/publish`` over ``--publish-conns`` pipelined keep-alive
   connections, open loop: event ``i`` is due at ``t0 + i / R`` and carries that scheduled
   ``time.monotonic_ns()`` as ``t``. Topics are used round-robin. Events are padded to
   ``--payload`` bytes of JSON.
4. Each client takes ``monotonic_ns()`` when frames arrive, finds ``"t":`` in each event and
   adds ``receive - scheduled`` to a log-linear histogram (``bench.common.histogram``).
5. After the last publish the driver waits until every expected frame has arrived or
   nothing arrived for ``--drain-timeout`` seconds, then reports delivery, latency
   percentiles, server CPU (``/proc/PID/stat`` user+sys over the window, as % of one core
   and µs per delivered frame), server RSS and each load process's CPU %, so a saturated
   client is visible. With two servers it prints the ratios etherd / uWS per round and of
   the medians.

``--idle N`` opens N connections (each subscribed to one topic unless
``--idle-no-subscribe``) and reports the server's total VmRSS and VmRSS / N.

Diagnosis (etherd only): ``--per-message`` (first arrival and fan-out spread of each
message; Python clients), ``--trace-server FILE`` (runs ``traced_server.py``: flush time,
publish-to-written time, GC pauses, loop lag, and Python allocations in idle mode),
``--py-spy FILE``. On a shared machine, ``--wait-quiet``, ``--max-noise`` and
``--retry-noisy`` keep other people's work out of the numbers, and each record says how
much CPU others used (``noise_pct``).

Output: a human-readable table on stdout and one JSON line per run, appended to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing as mp
import os
import re
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from bench.common import cpu as cpumod
from bench.common.cli import add_settings
from bench.common.cpu import (
    all_procs,
    busiest,
    cpu_times,
    others_s,
    parse_cpus,
    pin,
    proc_cpu_s,
    proc_status_kb,
    raise_nofile,
)
from bench.common.histogram import percentiles, us_to_ms
from bench.common.machine import machine_info
from bench.common.profile import start_py_spy
from bench.common.server import ServerProcess, start_etherd, start_uws
from bench.fanout.clients import ClientOptions, Totals, make_clients, topic_name
from bench.fanout.publisher import PublishPlan, data_template, publisher_process

SERVERS: Final = ("etherd", "uws")
TRACER: Final = Path(__file__).resolve().parent / "traced_server.py"


# -- the server under test -----------------------------------------------------------------


@dataclass
class Target:
    """The server a run measures: one the driver started, or one given by ``--url``."""

    kind: str
    host: str
    port: int
    pid: int | None
    server: ServerProcess | None = None
    trace: str | None = None  # --trace-server: traced_server.py's summary file
    # Where the publisher sends (default: the server the subscribers use). A cluster run
    # publishes on one node and subscribes on another.
    publish_port: int | None = None
    # Named groups of server-side processes (another node, nats-server, PostgreSQL) whose
    # CPU each run reports beside the server's. Each is listed when the window opens (a
    # process started later is not counted); their pids are not noise.
    groups: dict[str, Callable[[], list[int]]] = field(default_factory=dict)

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}/api/realtime?token=test"

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()

    def group_pids(self) -> dict[str, list[int]]:
        """The processes of every group, as they are now."""
        return {name: pids() for name, pids in self.groups.items()}

    def touch(self, suffix: str) -> None:
        """Create one of traced_server.py's control files (``.start``, ``.dump``, ...)."""
        if self.trace is not None:
            Path(self.trace + suffix).touch()

    def read_trace(self, timeout: float = 5.0) -> dict[str, Any] | None:
        """Ask the traced server for its summary (``.dump``) and read it."""
        if self.trace is None:
            return None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.trace)
        self.touch(".dump")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
                data: dict[str, Any] = json.loads(Path(self.trace).read_text())
                return data
            time.sleep(0.02)
        return None


def etherd_settings(args: argparse.Namespace, n_conns: int) -> dict[str, dict[str, Any]]:
    """etherd's limits raised for ``n_conns`` load connections, and a quick drain."""
    limit = n_conns + 1000
    return {
        "server": {
            "max_connections": max(limit, 50_000),
            "drain_window_s": 0.2,
            "shutdown_grace_s": 2.0,
        },
        "ws": {
            "max_connections_per_subject": limit,
            "max_pending_bytes": args.server_max_pending_mb * 1024 * 1024,
        },
    }


def start_target(args: argparse.Namespace, kind: str, n_conns: int) -> Target:
    """Start etherd or the uWS peer for one run (or attach to ``--url``)."""
    if args.url:
        m = re.match(r"https?://([^:/]+):(\d+)", args.url)
        if not m:
            raise SystemExit("--url must look like http://host:port")
        target = Target("etherd", m.group(1), int(m.group(2)), args.server_pid)
        with urllib.request.urlopen(f"{args.url}/healthz", timeout=5):
            pass
        return target
    if kind == "uws":
        server = start_uws(cpu=args.server_cpu)
        return Target("uws", server.host, server.port, server.pid, server)
    settings = etherd_settings(args, n_conns)
    launcher: list[str] = ["-m", "etherd"]
    trace = None
    if args.trace_server:
        trace = os.path.abspath(args.trace_server)
        extra = ["--tracemalloc"] if args.idle and not args.experiment else []
        if args.experiment:
            extra += ["--experiment", args.experiment]
        launcher = [str(TRACER), *extra, trace]
    server = start_etherd(
        cpu=args.server_cpu,
        store=args.store,
        settings=settings,
        overrides=args.set,
        launcher=launcher,
    )
    return Target("etherd", server.host, server.port, server.pid, server, trace)


# -- one run -------------------------------------------------------------------------------


def client_options(
    args: argparse.Namespace, target: Target, n: int, subscribe: bool
) -> ClientOptions:
    """The subscribers' side of a run, from the command line."""
    return ClientOptions(
        ws_url=target.ws_url,
        n=n,
        topics=args.topics,
        pattern=args.pattern,
        processes=args.clients,
        cpus=args.client_cpus,
        concurrency=args.connect_concurrency,
        connect_timeout=args.connect_timeout,
        subscribe=subscribe,
        read_buffer=args.read_buffer,
        sample_every=args.sample_every,
        per_message=round(args.rate * args.duration) if args.per_message else 0,
    )


def run_idle(args: argparse.Namespace, ctx: Any, target: Target) -> dict[str, Any]:
    """Open N connections and read the server's memory."""
    n = args.idle
    pid = target.pid
    target.touch(".snap1")
    time.sleep(1.0)
    before = proc_status_kb(pid, "VmRSS") if pid else -1
    clients = make_clients(
        args.client, ctx, client_options(args, target, n, not args.idle_no_subscribe)
    )
    setup = clients.start()
    time.sleep(args.idle_settle)
    after = proc_status_kb(pid, "VmRSS") if pid else -1
    hwm = proc_status_kb(pid, "VmHWM") if pid else -1
    trace = None
    if target.trace:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(target.trace)
        target.touch(".snap2")
        trace = target.read_trace(timeout=180.0)  # tracemalloc's snapshot diff is slow
    totals = clients.finish()
    connected = setup["connected"]
    record: dict[str, Any] = {
        "mode": "idle",
        "connections": n,
        "subscribed": not args.idle_no_subscribe,
        **setup,
        "closed_early": totals.closed,
        "server_rss_before_mb": round(before / 1024, 1),
        "server_rss_after_mb": round(after / 1024, 1),
        "server_peak_rss_mb": round(hwm / 1024, 1),
        # Total RSS over the connections (nothing subtracted), and the growth per connection.
        "rss_kb_per_connection": round(after / max(1, connected), 2),
        "kb_per_connection": round((after - before) / max(1, connected), 2),
        "target_mb": 100,
        "target_met": connected == n and 0 < after <= 100 * 1024,
    }
    if trace is not None:
        record["server_trace"] = trace
    if args.experiment:
        record["experiment"] = args.experiment
    return record


@dataclass
class Sample:
    """CPU counters at one instant of the publish window."""

    t: float
    server: float
    clients: list[float]
    publisher: float
    driver: float
    cpus: dict[str, cpumod.CpuTimes]
    groups: dict[str, dict[int, float]]

    @classmethod
    def take(
        cls,
        server: int | None,
        clients: Sequence[int],
        publisher: int,
        groups: dict[str, list[int]] | None = None,
    ) -> Sample:
        return cls(
            time.monotonic(),
            proc_cpu_s(server) if server else math.nan,
            [proc_cpu_s(p) for p in clients],
            proc_cpu_s(publisher),
            proc_cpu_s(os.getpid()),
            cpu_times(),
            {name: {pid: proc_cpu_s(pid) for pid in pids} for name, pids in (groups or {}).items()},
        )


def group_delta(start: Sample, end: Sample) -> dict[str, float]:
    """CPU seconds each group used between two samples (the groups' processes are listed
    once, at the start of the window; one gone by the end is left out)."""
    out: dict[str, float] = {}
    for name, now in end.groups.items():
        then = start.groups.get(name, {})
        out[name] = sum(c - then[pid] for pid, c in now.items() if not math.isnan(c))
    return out


def expected_frames(args: argparse.Namespace, n: int, pub: dict[str, Any]) -> int:
    """Frames the subscribers should receive, given what the publisher got accepted."""
    ok: int = pub["statuses"].get(200, 0)
    if args.pattern:
        return n * ok
    # Message i went to topic i % T; subscriber j listens to topic j % T.
    per_topic_msgs = [len(range(t, pub["sent"], args.topics)) for t in range(args.topics)]
    subs_per_topic = [len(range(t, n, args.topics)) for t in range(args.topics)]
    expected = sum(s * m for s, m in zip(subs_per_topic, per_topic_msgs, strict=True))
    if ok < pub["sent"]:  # which publishes failed is unknown: assume they spread evenly
        expected = round(expected * ok / max(1, pub["sent"]))
    return expected


def exact_summary_ms(values_ns: Sequence[int]) -> dict[str, float | None]:
    """p50/p90/p99/max of a short list of nanosecond values, in milliseconds."""
    if not values_ns:
        return {"p50": None, "p90": None, "p99": None, "max": None}
    v = sorted(values_ns)
    n = len(v)

    def q(p: float) -> float:
        return round(v[min(n - 1, max(0, math.ceil(p * n) - 1))] / 1e6, 3)

    return {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": round(v[-1] / 1e6, 3)}


def per_message(totals: Totals) -> dict[str, Any] | None:
    """``--per-message``: first arrival, last arrival and spread of each message."""
    seen = [i for i in range(len(totals.first)) if totals.last[i] >= 0]
    if not seen:
        return None
    first, last = totals.first, totals.last
    return {
        "messages": len(seen),
        "first_arrival_ms": exact_summary_ms([first[i] for i in seen]),
        "last_arrival_ms": exact_summary_ms([last[i] for i in seen]),
        "spread_ms": exact_summary_ms([last[i] - first[i] for i in seen]),
    }


def run_fanout(args: argparse.Namespace, ctx: Any, target: Target) -> dict[str, Any]:
    """Subscribe N clients, publish open loop for ``--duration`` s, drain, report."""
    n = args.subscribers
    pid = target.pid
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    clients = make_clients(args.client, ctx, client_options(args, target, n, True))
    setup = clients.start()
    if setup["connected"] < n:
        print(f"warning: only {setup['connected']} of {n} subscribers connected", file=sys.stderr)
    topics = [topic_name(t, args.topics) for t in range(args.topics)]
    plan = PublishPlan(
        host=target.host,
        port=target.publish_port or target.port,
        topics=topics,
        rate=args.rate,
        duration=args.duration,
        payload=args.payload,
        durable=args.durable,
        conns=args.publish_conns,
        cpus=parse_cpus(args.publisher_cpus or args.client_cpus) or None,
        realtime=args.publisher_rt,
    )
    frame_bytes = data_template(args.payload, topics[0], args.durable)[1]
    parent, child = ctx.Pipe()
    pub = ctx.Process(target=publisher_process, args=(plan, child), daemon=True)
    pub.start()
    child.close()
    if not parent.poll(30):
        clients.kill()
        raise SystemExit("the publisher did not connect")
    parent.recv()

    profiler: subprocess.Popen[bytes] | None = None
    if args.py_spy and pid and target.kind == "etherd":
        profiler = start_py_spy(
            pid,
            args.py_spy,
            rate=args.py_spy_rate,
            fmt=args.py_spy_format,
            duration=math.ceil(args.duration + 1),
            binary=args.py_spy_bin,
        )
        time.sleep(1.0)

    t0 = time.monotonic_ns() + 300_000_000
    parent.send(t0)
    target.touch(".start")
    while time.monotonic_ns() < t0:
        time.sleep(0.001)
    client_pids = clients.pids
    everyone_before = all_procs()
    groups = target.group_pids()
    start = Sample.take(pid, client_pids, pub.pid or 0, groups)
    w0 = start.t

    # Poll delivery while publishing, then drain.
    last_total = -1
    last_progress = w0
    mark = start
    pub_result: dict[str, Any] | None = None
    expected: int | None = None
    while True:
        time.sleep(args.poll_interval)
        now = time.monotonic()
        total = clients.poll()
        if total != last_total:
            last_total = total
            last_progress = now
            mark = Sample.take(pid, client_pids, pub.pid or 0, groups)
        if pub_result is None and parent.poll():
            _, pub_result = parent.recv()
            expected = expected_frames(args, n, pub_result)
        if expected is not None:
            if total >= expected or now - last_progress > args.drain_timeout:
                break
        elif now - w0 > args.duration + 120:
            print("warning: the publisher did not finish", file=sys.stderr)
            break
    everyone_after = all_procs()
    t_after = time.monotonic()
    if profiler is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            profiler.wait(args.duration + 30)
    window = max(1e-9, mark.t - w0)
    ours = {os.getpid(), pub.pid or 0, *client_pids}
    if pid:
        ours.add(pid)
    for pids in mark.groups.values():
        ours.update(pids)
    if profiler is not None:
        ours.add(profiler.pid)  # --py-spy's sampler is ours, not a neighbour's
    span = t_after - w0
    noise = 100 * others_s(everyone_before, everyone_after, ours, kernel=False) / span
    foreign_top = busiest(everyone_before, everyone_after, ours, span, kernel=False)
    kthreads = sum(
        p.cpu_s - everyone_before[q].cpu_s
        for q, p in everyone_after.items()
        if p.kernel and q in everyone_before
    )
    trace = target.read_trace() if target.trace else None
    totals = clients.finish()
    pub.join(10)
    hwm = proc_status_kb(pid, "VmHWM") if pid else -1
    rss = proc_status_kb(pid, "VmRSS") if pid else -1

    p50, p90, p99, p999 = percentiles(totals.hist, (0.50, 0.90, 0.99, 0.999))
    delivered = totals.delivered
    assert pub_result is not None
    sent = pub_result["sent"]
    ok = pub_result["statuses"].get(200, 0)
    lag50, lag99, lagmax = percentiles(pub_result["lag_hist"], (0.5, 0.99, 1.0))
    rtt50, rtt99, rttmax = percentiles(pub_result["rtt_hist"], (0.5, 0.99, 1.0))
    exp = expected or 0
    server_cpu = mark.server - start.server
    client_cpu = [b - a for a, b in zip(start.clients, mark.clients, strict=True)]
    own = server_cpu + sum(client_cpu) + mark.publisher - start.publisher
    own += mark.driver - start.driver

    def per_cpu(k: int) -> dict[str, float]:
        return {
            name[3:]: round(100 * (mark.cpus[name][k] - start.cpus[name][k]) / window, 1)
            for name in sorted(mark.cpus)
            if name != "cpu" and name in start.cpus
        }

    task_pct, irq_pct, steal_pct = per_cpu(0), per_cpu(1), per_cpu(2)
    busy_pct = {c: round(task_pct[c] + irq_pct[c], 1) for c in task_pct}
    # Tick-based accounting charges softirq ticks to the task they interrupted too, so the
    # processes' own times are compared with task + irq time.
    foreign = sum(busy_pct.values()) - 100 * own / window
    record: dict[str, Any] = {
        "mode": "fanout",
        "subscribers": n,
        "topics": args.topics,
        "pattern": args.pattern,
        "rate": args.rate,
        "duration_s": args.duration,
        "durable": args.durable,
        "payload_bytes": frame_bytes,
        "client": args.client,
        "clients": len(client_pids),
        "publish_conns": args.publish_conns,
        "sample_every": args.sample_every,
        **setup,
        "published_ok": ok,
        "publish_sent": sent,
        "publish_statuses": {str(k): v for k, v in pub_result["statuses"].items()},
        "publish_errors": pub_result["errors"],
        "expected_frames": exp,
        "delivered_frames": delivered,
        "delivered_fraction": round(delivered / exp, 6) if exp else None,
        "window_s": round(window, 3),
        "delivered_fps": round(delivered / window),
        "latency_ms": {
            "p50": us_to_ms(p50),
            "p90": us_to_ms(p90),
            "p99": us_to_ms(p99),
            "p99.9": us_to_ms(p999),
            "max": round(totals.max_ns / 1e6, 3),
        },
        "latency_samples": sum(totals.hist.values()),
        "publisher_lag_ms": {
            "p50": us_to_ms(lag50),
            "p99": us_to_ms(lag99),
            "max": us_to_ms(lagmax),
        },
        "publish_rtt_ms": {"p50": us_to_ms(rtt50), "p99": us_to_ms(rtt99), "max": us_to_ms(rttmax)},
        "server_cpu_s": round(server_cpu, 3),
        "server_cpu_pct": round(100 * server_cpu / window, 1),
        "server_us_per_frame": round(1e6 * server_cpu / delivered, 3) if delivered else None,
        "server_peak_rss_mb": round(hwm / 1024, 1),
        "server_rss_end_mb": round(rss / 1024, 1),
        "server_side_cpu_s": {k: round(v, 3) for k, v in group_delta(start, mark).items()},
        "server_side_cpu_pct": {
            k: round(100 * v / window, 1) for k, v in group_delta(start, mark).items()
        },
        "client_cpu_pct": [round(100 * c / window, 1) for c in client_cpu],
        "publisher_cpu_pct": round(100 * (mark.publisher - start.publisher) / window, 1),
        "publisher_rt": pub_result.get("rt", False),
        "cpu_busy_pct": busy_pct,
        "cpu_softirq_pct": irq_pct,
        "cpu_steal_pct": steal_pct,
        # Busy CPU not charged to the benchmark's processes (softirq, kernel threads, others).
        "foreign_cpu_pct": round(foreign, 1),
        # CPU of other user processes during the run: other people's work on a shared
        # machine. A run with more than a few % here measured the neighbours too.
        "noise_pct": round(noise, 1),
        "noise_top_pct": foreign_top,
        "kernel_threads_pct": round(100 * kthreads / span, 1),
        "loadavg_before": load_before,
        "closed_early": totals.closed,
        "close_codes": totals.close_codes,
        "bad_frames": totals.bad,
        "unconnected_subscribers": totals.unconnected,
    }
    pm = per_message(totals) if args.per_message else None
    if pm is not None:
        record["per_message"] = pm
    if trace is not None:
        record["server_trace"] = trace
    if args.py_spy and profiler is not None:
        record["py_spy"] = os.path.basename(args.py_spy)
    if args.experiment:
        record["experiment"] = args.experiment
    return record


# -- side by side --------------------------------------------------------------------------


def _median(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(vals) if vals else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a is not None and b else None


def figures(record: dict[str, Any]) -> dict[str, float | None]:
    """The figures compared across servers: p50, p99, µs/frame, delivered (or memory)."""
    if record.get("mode") == "idle":
        return {
            "rss_mb": record["server_rss_after_mb"],
            "rss_kb_per_conn": record["rss_kb_per_connection"],
        }
    return {
        "p50_ms": record["latency_ms"]["p50"],
        "p99_ms": record["latency_ms"]["p99"],
        "us_per_frame": record["server_us_per_frame"],
        "delivered": record["delivered_fraction"],
    }


def compare(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Medians per server over the rounds, and etherd / uWS of each median."""
    by: dict[str, list[dict[str, float | None]]] = {}
    for r in records:
        by.setdefault(r["server"], []).append(figures(r))
    medians = {
        server: {k: _median([f[k] for f in runs]) for k in runs[0]} for server, runs in by.items()
    }
    out: dict[str, Any] = {"medians": medians, "runs": {s: len(v) for s, v in by.items()}}
    if "etherd" in medians and "uws" in medians:
        e, u = medians["etherd"], medians["uws"]
        out["ratio_etherd_over_uws"] = {k: _ratio(e[k], u[k]) for k in e}
        # Round by round too: the pair measured back to back saw the most similar machine.
        pairs = zip(by["etherd"], by["uws"], strict=False)
        out["ratio_per_round"] = [{k: _ratio(a[k], b[k]) for k in a} for a, b in pairs]
    return out


def comparison_text(result: dict[str, Any]) -> str:
    """A small table: one line per server (medians), then the ratios."""
    lines = []
    for server, m in result["medians"].items():
        shown = ", ".join(f"{k} {v:g}" if v is not None else f"{k} -" for k, v in m.items())
        lines.append(f"{server:>8} (median of {result['runs'][server]}): {shown}")
    ratio = result.get("ratio_etherd_over_uws")
    if ratio:
        lines.append(
            "etherd/uWS of the medians: " + ", ".join(f"{k} {v}" for k, v in ratio.items())
        )
        for i, r in enumerate(result["ratio_per_round"], 1):
            lines.append(f"  round {i}: " + ", ".join(f"{k} {v}" for k, v in r.items()))
    return "\n".join(lines)


def human(record: dict[str, Any]) -> str:
    """A two-column table of a run's record."""
    rows: list[tuple[str, str]] = []
    for key, value in record.items():
        if key == "machine":
            continue
        if (
            isinstance(value, dict)
            and value
            and all(not isinstance(v, dict) for v in value.values())
        ):
            text = ", ".join(f"{k}={v}" for k, v in value.items())
        else:
            text = json.dumps(value) if isinstance(value, dict | list) else str(value)
        rows.append((key, text))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


# -- command line --------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.fanout.driver",
        description="etherd fan-out latency driver (see the module docstring)",
    )
    p.add_argument("--subscribers", "-n", type=int, default=1000, help="N subscribers")
    p.add_argument("--topics", "-t", type=int, default=1, help="T topics, N/T subscribers each")
    p.add_argument("--pattern", action="store_true", help="subscribe to bench/* instead")
    p.add_argument("--rate", "-r", type=float, default=100.0, help="published msg/s (open loop)")
    p.add_argument("--duration", "-d", type=float, default=10.0, help="publish seconds")
    p.add_argument("--payload", type=int, default=300, help="event JSON bytes a client receives")
    p.add_argument("--durable", action="store_true", help="publish durable events (default not)")
    p.add_argument(
        "--peers",
        default="etherd",
        help="servers to measure, comma-separated: etherd, uws (interleaved per round)",
    )
    p.add_argument("--peer", help="shorthand: --peer uws is --peers etherd,uws")
    p.add_argument(
        "--rounds",
        "--repeat",
        type=int,
        default=1,
        help="rounds of runs over --peers (a fresh server per run)",
    )
    p.add_argument(
        "--client",
        choices=("c", "picows", "raw"),
        default="c",
        help="c: subclient.c (default); picows: a listener per frame; raw: frames per read",
    )
    p.add_argument("--clients", "-k", type=int, default=1, help="client processes")
    p.add_argument("--client-cpus", default="1", help="CPUs for clients and publisher ('' any)")
    p.add_argument(
        "--publisher-cpus", default=None, help="CPUs for the publisher (default clients')"
    )
    p.add_argument("--server-cpu", default="0", help="CPUs for the server ('' = no pinning)")
    p.add_argument(
        "--publisher-rt",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the publisher SCHED_FIFO so it sends on time (needs root/CAP_SYS_NICE)",
    )
    p.add_argument("--publish-conns", type=int, default=4, help="keep-alive publish connections")
    p.add_argument("--read-buffer", type=int, default=2048, help="picows read_buffer_init_size")
    p.add_argument("--connect-concurrency", type=int, default=200, help="handshakes in flight")
    p.add_argument("--connect-timeout", type=float, default=30.0)
    p.add_argument(
        "--sample-every",
        type=int,
        default=1,
        help="Python clients: histogram every k-th frame (all counted)",
    )
    p.add_argument("--drain-timeout", type=float, default=5.0, help="stop after this long idle")
    p.add_argument("--poll-interval", type=float, default=0.1)
    p.add_argument("--url", help="target a running etherd (http://host:port) instead")
    p.add_argument("--server-pid", type=int, help="with --url: the server's pid, for CPU/RSS")
    p.add_argument("--store", help="store URL for the started etherd (default SQLite)")
    # The bench server never sees the caller's ETHERD_* variables: A/B runs go through this.
    add_settings(p)
    p.add_argument("--server-max-pending-mb", type=int, default=256, help="ws.max_pending_bytes")
    p.add_argument("--idle", type=int, default=0, help="idle mode: open N connections only")
    p.add_argument("--idle-no-subscribe", action="store_true", help="idle without subscribing")
    p.add_argument("--idle-settle", type=float, default=3.0, help="seconds before reading RSS")
    p.add_argument(
        "--per-message",
        action="store_true",
        help="also report each message's first arrival and fan-out spread (Python clients)",
    )
    p.add_argument(
        "--trace-server",
        metavar="FILE",
        help="run etherd under traced_server.py (flush time, GC pauses, loop lag)",
    )
    p.add_argument(
        "--experiment",
        help="with --trace-server: apply a proposed etherd change (traced_server.py)",
    )
    p.add_argument("--py-spy", metavar="FILE", help="record etherd with py-spy into FILE")
    p.add_argument("--py-spy-format", default="flamegraph", help="flamegraph, speedscope, raw")
    p.add_argument("--py-spy-rate", type=int, default=250)
    p.add_argument("--py-spy-bin", default=None, help="py-spy executable (default: on PATH)")
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=15.0,
        metavar="PCT",
        help="before each run wait until other processes use < PCT %% of a core (0: don't)",
    )
    p.add_argument(
        "--max-noise",
        type=float,
        default=5.0,
        metavar="PCT",
        help="a run where other processes used more than PCT %% of a core is noisy",
    )
    p.add_argument("--retry-noisy", type=int, default=0, help="rerun a noisy run up to N times")
    p.add_argument("--wait-quiet-max", type=float, default=300.0, help="give up waiting after s")
    p.add_argument("--label", default="", help="a name for the run in the JSON line")
    p.add_argument("--out", help="append the JSON lines to this file")
    args = p.parse_args(argv)
    args.servers = ["etherd", args.peer] if args.peer else args.peers.split(",")
    for s in args.servers:
        if s not in SERVERS:
            p.error(f"unknown server {s!r}: choose from {', '.join(SERVERS)}")
    if args.url and args.servers != ["etherd"]:
        p.error("--url measures one running etherd; leave out --peers")
    if "uws" in args.servers and args.pattern:
        p.error("the uWS peer has no topic patterns: leave out --pattern")
    if args.per_message and args.client == "c":
        p.error("--per-message needs a Python client (--client raw or picows)")
    return args


def one_run(
    args: argparse.Namespace,
    ctx: Any,
    kind: str,
    start: Callable[[], Target] | None = None,
) -> dict[str, Any]:
    """Start the server, wait for quiet, measure (retrying noisy runs), stop it.

    ``start`` replaces the driver's own way of starting the server (``start_target``): a
    cluster run starts several processes and describes them in the ``Target``.
    """
    n_conns = args.idle or args.subscribers
    target = start() if start is not None else start_target(args, kind, n_conns)
    try:
        ours = [target.pid] if target.pid else []
        ours += [pid for pids in target.group_pids().values() for pid in pids]
        quiet = None
        attempts = 1 + (0 if args.idle else args.retry_noisy)
        record: dict[str, Any] = {}
        for attempt in range(1, attempts + 1):
            if args.wait_quiet > 0:
                quiet = cpumod.wait_quiet(args.wait_quiet, args.wait_quiet_max, ours, calm=3)
            record = run_idle(args, ctx, target) if args.idle else run_fanout(args, ctx, target)
            record["attempt"] = attempt
            if args.idle or record["noise_pct"] <= args.max_noise or attempt == attempts:
                break
            print(
                f"noisy run ({record['noise_pct']} % of a core used by other processes: "
                f"{record['noise_top_pct']}); retrying",
                file=sys.stderr,
            )
    finally:
        target.stop()
    record["server"] = kind
    record["quiet_before_pct"] = quiet.others_pct if quiet is not None else None
    return record


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    raise_nofile()
    ctx = mp.get_context("fork")
    pin(args.client_cpus)  # the driver itself stays off the server's core
    machine = machine_info(peers="uws" in args.servers)
    records: list[dict[str, Any]] = []
    for rnd in range(args.rounds):
        for kind in args.servers:
            record = {"label": args.label, "run": rnd + 1, **one_run(args, ctx, kind)}
            record["round"] = rnd + 1
            if kind == "etherd" and args.set:
                record["settings"] = list(args.set)
            record["machine"] = machine
            records.append(record)
            print(f"== {kind}, round {rnd + 1} of {args.rounds}")
            print(human(record))
            line = json.dumps(record, separators=(",", ":"))
            if args.out:
                with open(args.out, "a", encoding="utf-8") as f:
                    f.write(line + "\n")
            else:
                print(line)
            sys.stdout.flush()
    if len(args.servers) > 1 or args.rounds > 1:
        print("\n" + comparison_text(compare(records)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
