#!/usr/bin/env bash
# Autobahn fuzzingclient against etherd's echo endpoint (same framing code as real sessions).
#
#   bash tests/conformance/run.sh
#
# Installs autobahntestsuite 0.8.2 for python2.7 into tests/conformance/.autobahn/ (once,
# git-ignored), starts etherd with `ws.echo_path = "/echo"` on a free port, runs every case
# except 9.* (performance), 12.* and 13.* (permessage-deflate, not negotiated), stops etherd
# and lets summarize.py judge tests/conformance/reports/servers/index.json.
#
# Environment:
#   PYTHON   interpreter with etherd installed (default .venv/bin/python)
#   PYTHON2  Python 2.7 interpreter (default python2.7 on PATH; with pyenv, a 2.7.x version
#            is selected automatically when the shim has none active)
#
# Exit codes: 0 all cases pass (or are allow-listed), 1 cases failed, 3 no python2.7,
# 4 install failed, 5 etherd did not start or died, 6 wstest failed.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
cd "$ROOT"

PYTHON="${PYTHON:-.venv/bin/python}"
PY2="${PYTHON2:-python2.7}"
AB_VERSION="0.8.2"
AB_DIR="$HERE/.autobahn"
AB_MARKER="$AB_DIR/.installed-autobahntestsuite-$AB_VERSION"
REPORTS="$HERE/reports"
WSTEST_TIMEOUT_S="${WSTEST_TIMEOUT_S:-240}"

die() {
    local code="$1"
    shift
    echo "conformance: $*" >&2
    exit "$code"
}

is_py27() {
    "$PY2" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (2, 7) else 1)' >/dev/null 2>&1
}

# --- python2.7 ---------------------------------------------------------------------------
if ! is_py27 && command -v pyenv >/dev/null 2>&1; then
    # A pyenv shim on PATH runs only the versions that are active; pick an installed 2.7.
    for v in $(pyenv versions --bare 2>/dev/null | grep -E '^2\.7(\.|$)' || true); do
        export PYENV_VERSION="$v"
        if is_py27; then
            break
        fi
        unset PYENV_VERSION
    done
fi
is_py27 || die 3 "no working Python 2.7 ('$PY2'): autobahntestsuite $AB_VERSION is Python 2 code." \
    "Install Python 2.7 (e.g. pyenv install 2.7.18) or set PYTHON2 to a 2.7 interpreter."
"$PY2" -m pip --version >/dev/null 2>&1 || die 3 "'$PY2' has no pip; run '$PY2 -m ensurepip'."

[ -x "$PYTHON" ] || command -v "$PYTHON" >/dev/null 2>&1 || die 5 "no interpreter '$PYTHON' (set PYTHON)"
"$PYTHON" -c 'import etherd' 2>/dev/null || die 5 "'$PYTHON' cannot import etherd"

# --- autobahntestsuite (once) -------------------------------------------------------------
if [ ! -f "$AB_MARKER" ]; then
    echo "conformance: installing autobahntestsuite==$AB_VERSION for $("$PY2" -V 2>&1) into ${AB_DIR#"$ROOT"/}"
    rm -rf "$AB_DIR" "$AB_DIR.partial"
    mkdir -p "$AB_DIR.partial"
    if ! "$PY2" -m pip install --disable-pip-version-check --no-input -q \
        --target "$AB_DIR.partial" "autobahntestsuite==$AB_VERSION" >"$HERE/.pip.log" 2>&1; then
        grep -v "is ignored: it is neither a file nor a directory" "$HERE/.pip.log" | tail -30 >&2
        rm -rf "$AB_DIR.partial"
        die 4 "pip install autobahntestsuite==$AB_VERSION failed (log: tests/conformance/.pip.log)"
    fi
    mv "$AB_DIR.partial" "$AB_DIR"
    touch "$AB_MARKER"
    rm -f "$HERE/.pip.log"
fi

# site.addsitedir, not PYTHONPATH: it processes the zope namespace .pth file.
WSTEST_PY='
import os, site, sys
site.addsitedir(os.environ["AB_DIR"])
sys.argv[0] = "wstest"
from autobahntestsuite.wstest import run
run()
'
AB_DIR="$AB_DIR" PYTHONWARNINGS=ignore "$PY2" -c 'import os, site; site.addsitedir(os.environ["AB_DIR"]); import autobahntestsuite.wstest' \
    || die 4 "autobahntestsuite in ${AB_DIR#"$ROOT"/} does not import; delete that folder to reinstall"

# --- etherd with the echo endpoint -------------------------------------------------------
WORK="$(mktemp -d)"
ETHERD_PID=""
cleanup() {
    if [ -n "$ETHERD_PID" ] && kill -0 "$ETHERD_PID" 2>/dev/null; then
        kill -TERM "$ETHERD_PID" 2>/dev/null || true
        for _ in $(seq 50); do
            kill -0 "$ETHERD_PID" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$ETHERD_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

# Port 0: the kernel picks a free port and etherd prints it in its banner (no race).
# max_message_bytes: 64 KiB (the default) is enough for every judged case; 7.1.6 sends a
# 256 KiB message and is informational, so 16 MiB lets it echo instead of closing 1009.
cat >"$WORK/etherd.toml" <<EOF
[server]
host = "127.0.0.1"
port = 0
data_dir = "$WORK/data"
shutdown_grace_s = 2.0
drain_window_s = 0.0

[ws]
echo_path = "/echo"
max_message_bytes = 16777216

[auth]
dev = true

[log]
level = "warning"
EOF

rm -rf "$REPORTS"
mkdir -p "$REPORTS"
SERVER_LOG="$REPORTS/etherd.log"
"$PYTHON" -m etherd serve --config "$WORK/etherd.toml" >"$SERVER_LOG" 2>&1 &
ETHERD_PID=$!

PORT=""
for _ in $(seq 150); do
    PORT="$(sed -n 's#^etherd listening on http://127\.0\.0\.1:\([0-9][0-9]*\).*#\1#p' "$SERVER_LOG" | head -1)"
    [ -n "$PORT" ] && break
    kill -0 "$ETHERD_PID" 2>/dev/null || break
    sleep 0.1
done
if [ -z "$PORT" ]; then
    tail -30 "$SERVER_LOG" >&2
    die 5 "etherd did not start (log above)"
fi
echo "conformance: etherd (pid $ETHERD_PID) echo endpoint ws://127.0.0.1:$PORT/echo"

# --- the suite ----------------------------------------------------------------------------
cat >"$WORK/fuzzingclient.json" <<EOF
{
  "outdir": "$REPORTS/servers",
  "servers": [{"agent": "etherd", "url": "ws://127.0.0.1:$PORT/echo"}],
  "cases": ["*"],
  "exclude-cases": ["9.*", "12.*", "13.*"],
  "exclude-agent-cases": {}
}
EOF

started=$(date +%s)
rc=0
(cd "$WORK" && AB_DIR="$AB_DIR" PYTHONWARNINGS=ignore timeout "$WSTEST_TIMEOUT_S" \
    "$PY2" -c "$WSTEST_PY" -m fuzzingclient -s fuzzingclient.json) >"$REPORTS/wstest.log" 2>&1 || rc=$?
elapsed=$(($(date +%s) - started))
echo "conformance: wstest finished in ${elapsed}s (exit $rc; log: tests/conformance/reports/wstest.log)"

if ! kill -0 "$ETHERD_PID" 2>/dev/null; then
    tail -30 "$SERVER_LOG" >&2
    die 5 "etherd died during the suite (log: tests/conformance/reports/etherd.log)"
fi
kill -TERM "$ETHERD_PID"
wait "$ETHERD_PID" || true
ETHERD_PID=""

if [ "$rc" -ne 0 ] || [ ! -f "$REPORTS/servers/index.json" ]; then
    tail -30 "$REPORTS/wstest.log" >&2
    die 6 "wstest failed (exit $rc) or wrote no reports/servers/index.json"
fi

exec "$PYTHON" "$HERE/summarize.py" --server-log "$SERVER_LOG" "$REPORTS/servers"
