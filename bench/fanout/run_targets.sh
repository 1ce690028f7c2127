#!/usr/bin/env bash
# The fan-out targets of the benchmark issue, server on core 0, load on core 1.
#
#   bash bench/fanout/run_targets.sh [OUT.jsonl]
#
# Appends one JSON line per run to OUT (default bench/results/fanout-runs.jsonl); turn it
# into a table with `python -m bench.fanout.report OUT`. Runs from the repository root with
# the project's virtualenv. Each run waits for a quiet machine first and is retried (up to
# 3 times) when other processes used more than 5 % of a core during it.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-bench/results/fanout-runs.jsonl}
PY=${PYTHON:-.venv/bin/python}
D=(-m bench.fanout.driver --server-cpu 0 --client-cpus 1 --retry-noisy 3 --out "$OUT")

# The C client (subclient.c, the default) times every frame; the raw Python reader is kept
# beside it for comparison with earlier results.
# a. N=1,000 at 100 msg/s for 10 s: p99 <= 10 ms.
"$PY" "${D[@]}" --label a -n 1000 --rate 100 --duration 10 --repeat 3
# b. N=1,000 at 1,000 msg/s (1M frames/s) for 10 s: all delivered, p99 <= 25 ms.
#    The picows client cannot take 1M frames/s on one core: it times every 10th frame.
"$PY" "${D[@]}" --label b -n 1000 --rate 1000 --duration 10 --repeat 2
"$PY" "${D[@]}" --label b-sample10 -n 1000 --rate 1000 --duration 10 --client picows \
    --sample-every 10 --repeat 2
"$PY" "${D[@]}" --label b-raw -n 1000 --rate 1000 --duration 10 --client raw --repeat 2
# c. N=10,000 at 100 msg/s for 10 s: all delivered, p99 <= 250 ms.
"$PY" "${D[@]}" --label c -n 10000 --rate 100 --duration 10 --repeat 2
"$PY" "${D[@]}" --label c-raw -n 10000 --rate 100 --duration 10 --client raw --repeat 2
# d. 10,000 idle connections (each subscribed to a topic): server memory <= 100 MB.
"$PY" "${D[@]}" --label d --idle 10000

# Diagnosis: the same loads with per-message first/last arrival (Python clients only) and
# the traced server (flush time, publish-to-written time, GC pauses, loop lag; Python
# allocations for d).
T=$(mktemp -d)
"$PY" "${D[@]}" --label a-trace -n 1000 --rate 100 --duration 10 --client raw --per-message \
    --trace-server "$T/a.json"
"$PY" "${D[@]}" --label b-raw-trace -n 1000 --rate 1000 --duration 10 --client raw \
    --per-message --trace-server "$T/b.json"
"$PY" "${D[@]}" --label c-raw-trace -n 10000 --rate 100 --duration 10 --client raw \
    --per-message --trace-server "$T/c.json"
"$PY" "${D[@]}" --label d-trace --idle 10000 --trace-server "$T/d.json"
rm -rf "$T"
