#!/usr/bin/env bash
# Command-line tools the test-suite needs besides Python packages, from Debian's archive:
#   promtool   (package `prometheus`) - checks the alerting rules and the Prometheus config
#   chromium   (package `chromium`)   - a headless browser for UI tests
# Idempotent: a tool already on PATH is left alone and nothing is downloaded. Installing needs
# root (apt-get); the output of apt goes to a log that is shown only when something fails.
#
# Usage: scripts/tools.sh [promtool|chromium|all]     (default: all)
set -euo pipefail

PROG="tools"
TARGET="${1:-all}"

# shellcheck source=scripts/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
    echo "usage: $0 [promtool|chromium|all]" >&2
    exit 2
}

APT_LOG=""
cleanup() {
    [ -z "$APT_LOG" ] || rm -f "$APT_LOG"
    if [ -n "${POLICY_RC_ADDED:-}" ]; then rm -f /usr/sbin/policy-rc.d; fi
}
trap cleanup EXIT

# apt_install BINARY PACKAGE: install PACKAGE from the Debian archive so that BINARY is on PATH.
apt_install() {
    local binary="$1" package="$2"
    if ! have apt-get; then
        die "$binary: not found, and apt-get is not available to install Debian package '$package'" \
            "install '$package' with your package manager so that '$binary' is on PATH"
    fi
    if [ "$(id -u)" != 0 ]; then
        die "$binary: not found; installing Debian package '$package' needs root" \
            "run as root: apt-get install -y --no-install-recommends $package"
    fi
    APT_LOG="$(mktemp "${TMPDIR:-/tmp}/tools-apt.XXXXXX")"
    export DEBIAN_FRONTEND=noninteractive
    # A package that ships a daemon (prometheus does) must not start it here: without a
    # policy-rc.d, deny service starts for the duration of the install.
    if [ ! -e /usr/sbin/policy-rc.d ] && [ -d /usr/sbin ]; then
        printf '#!/bin/sh\n# added by %s for one apt-get install; removed afterwards\nexit 101\n' \
            "$0" >/usr/sbin/policy-rc.d
        chmod 0755 /usr/sbin/policy-rc.d
        POLICY_RC_ADDED=1
    fi
    # Refresh the package lists only when apt does not know the package yet.
    if ! apt-cache show "$package" >/dev/null 2>&1; then
        log "$binary: updating the apt package lists"
        if ! apt-get -q update >>"$APT_LOG" 2>&1; then
            tail -n 15 "$APT_LOG" | sed "s/^/$PROG:   apt: /" >&2
            die "$binary: 'apt-get update' failed (output above)" \
                "check the apt sources in /etc/apt/ and the network, then re-run $0 $TARGET"
        fi
    fi
    log "$binary: installing Debian package '$package' (apt-get, no recommends)"
    if ! apt-get install -y -q --no-install-recommends "$package" >>"$APT_LOG" 2>&1; then
        tail -n 15 "$APT_LOG" | sed "s/^/$PROG:   apt: /" >&2
        die "$binary: 'apt-get install $package' failed (output above)" \
            "try by hand: apt-get update && apt-get install -y --no-install-recommends $package"
    fi
    if [ -n "${POLICY_RC_ADDED:-}" ]; then
        rm -f /usr/sbin/policy-rc.d
        POLICY_RC_ADDED=""
    fi
    hash -r
    have "$binary" || die "$binary: Debian package '$package' installed, but '$binary' is not on PATH"
}

ensure_promtool() {
    if ! have promtool; then
        apt_install promtool prometheus
    fi
    log "promtool: OK ($(command -v promtool), $(promtool --version 2>&1 | head -n 1))"
}

ensure_chromium() {
    if ! have chromium; then
        apt_install chromium chromium
    fi
    log "chromium: OK ($(command -v chromium), $(chromium --version 2>/dev/null | head -n 1))"
}

case "$TARGET" in
    all)
        ensure_promtool
        ensure_chromium
        ;;
    promtool) ensure_promtool ;;
    chromium) ensure_chromium ;;
    *) usage ;;
esac
