#!/bin/sh
# Make sure what the browser tests (tests/browser) and the client tests (tests/web) need is
# installed: Debian's chromium and chromium-driver, and Node.js. `make test` runs this before
# pytest. As root it installs what is missing with apt-get; otherwise it names the command.
set -eu

missing=""
[ -x /usr/bin/chromium ] || missing="$missing chromium"
[ -x /usr/bin/chromedriver ] || missing="$missing chromium-driver"
command -v node >/dev/null 2>&1 || missing="$missing nodejs"
[ -z "$missing" ] && exit 0

if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "== installing for the browser tests:$missing"
    apt-get update -qq
    # shellcheck disable=SC2086 # one word per package
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
    exit 0
fi

echo "the browser tests need:$missing" >&2
echo "install them with:  sudo apt-get install$missing" >&2
exit 1
