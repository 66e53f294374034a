#!/usr/bin/env bash
# Make sure the services the test-suite needs are running on loopback:
#   - RabbitMQ on 127.0.0.1:${RABBITMQ_PORT:-5672}
#   - Consul dev agent on 127.0.0.1:8500 (or wherever CONSUL_HTTP_ADDR points)
# Installs what is missing (Debian, run as root, no Docker needed).
# Idempotent: when everything is already up it only probes and exits.
#
# Usage: scripts/services.sh [rabbitmq|consul|all]     (default: all)
set -euo pipefail

PROG="services"
TARGET="${1:-all}"

RABBIT_HOST=127.0.0.1
RABBIT_PORT="${RABBITMQ_PORT:-5672}"
RABBIT_WAIT=60

CONSUL_DEFAULT_ADDR="127.0.0.1:8500"
CONSUL_WAIT=30
CONSUL_SUITE=bullseye # Debian 11 packages consul (1.8.7); bookworm has none.
CACHE_DIR="${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/coordinator-agent/consul"
CONSUL_CACHED_BIN="$CACHE_DIR/consul"
CONSUL_PIDFILE="$CACHE_DIR/consul.pid"
CONSUL_LOG="$CACHE_DIR/consul.log"
DEBIAN_KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg

# shellcheck source=scripts/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
    echo "usage: $0 [rabbitmq|consul|all]" >&2
    exit 2
}

# ---------------------------------------------------------------- helpers --

# tcp_open HOST PORT: true if a TCP connection can be established.
tcp_open() {
    # shellcheck disable=SC2016  # expanded by the inner bash
    timeout 2 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$1" "$2" 2>/dev/null
}

# http_get URL: print the body, fail on connection/HTTP errors.
http_get() {
    if have curl; then
        curl -fsS --max-time 3 "$1" 2>/dev/null
    else
        python3 - "$1" 2>/dev/null <<'PY'
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=3) as r:
    sys.stdout.write(r.read().decode())
PY
    fi
}

# consul_url ADDR: normalise "host:port" / "http://host:port[/]" to a base URL.
consul_url() {
    local addr="${1%/}"
    case "$addr" in
        http://* | https://*) printf '%s\n' "$addr" ;;
        *://*) return 1 ;; # unix:// etc. not supported for the probe
        *) printf 'http://%s\n' "$addr" ;;
    esac
}

# consul_leader BASE_URL: print the leader ("ip:port") if there is one.
consul_leader() {
    local body
    body="$(http_get "$1/v1/status/leader")" || return 1
    body="$(printf '%s' "$body" | tr -d '[:space:]"')"
    [ -n "$body" ] || return 1
    printf '%s\n' "$body"
}

mask_url() { printf '%s\n' "$1" | sed -E 's#(://[^:/@]*):[^@/]*@#\1:***@#'; }

apt_env() { DEBIAN_FRONTEND=noninteractive "$@"; }

# --------------------------------------------------------------- rabbitmq --

rabbit_ready() {
    tcp_open "$RABBIT_HOST" "$RABBIT_PORT" || return 1
    timeout 30 rabbitmqctl -q await_startup >/dev/null 2>&1 ||
        timeout 15 rabbitmqctl -q status >/dev/null 2>&1
}

ensure_rabbitmq() {
    local shown="amqp://$RABBIT_HOST:$RABBIT_PORT"
    if [ -n "${COORDINATOR_BROKER_URL:-}" ]; then
        shown="$shown (COORDINATOR_BROKER_URL=$(mask_url "$COORDINATOR_BROKER_URL"))"
    fi
    if tcp_open "$RABBIT_HOST" "$RABBIT_PORT"; then
        log "rabbitmq: OK, listening on $shown"
        return 0
    fi

    if ! have rabbitmq-server; then
        have apt-get || die "rabbitmq: rabbitmq-server missing and apt-get not found" \
            "install RabbitMQ manually and start it on $RABBIT_HOST:$RABBIT_PORT"
        [ "$(id -u)" = 0 ] || die "rabbitmq: rabbitmq-server missing; installing needs root" \
            "run: sudo apt-get install -y rabbitmq-server  (or re-run this script as root)"
        log "rabbitmq: installing rabbitmq-server with apt-get (this takes a minute)"
        local out
        out="$(mktemp)"
        if ! { apt_env apt-get update -q && apt_env apt-get install -y -q rabbitmq-server; } >"$out" 2>&1; then
            tail -n 15 "$out" >&2
            rm -f "$out"
            die "rabbitmq: apt-get install rabbitmq-server failed (output above)" \
                "check the apt sources / network, then run: apt-get install -y rabbitmq-server"
        fi
        rm -f "$out"
        # The package's postinst may already have started it.
        if tcp_open "$RABBIT_HOST" "$RABBIT_PORT"; then
            log "rabbitmq: OK, listening on $shown"
            return 0
        fi
    fi

    if timeout 15 rabbitmqctl -q ping >/dev/null 2>&1; then
        log "rabbitmq: node is running but $RABBIT_HOST:$RABBIT_PORT is not open yet; waiting"
    else
        log "rabbitmq: starting rabbitmq-server -detached"
        # RABBITMQ_NODE_PORT makes a non-default RABBITMQ_PORT effective.
        RABBITMQ_NODE_PORT="$RABBIT_PORT" rabbitmq-server -detached >/dev/null 2>&1 ||
            die "rabbitmq: 'rabbitmq-server -detached' failed" \
                "see /var/log/rabbitmq/ (startup_err, rabbit@*.log); try: rabbitmq-server -detached"
    fi

    local deadline=$((SECONDS + RABBIT_WAIT))
    while [ "$SECONDS" -lt "$deadline" ]; do
        if rabbit_ready; then
            log "rabbitmq: OK, started and listening on $shown"
            return 0
        fi
        sleep 1
    done
    die "rabbitmq: not answering on $RABBIT_HOST:$RABBIT_PORT after ${RABBIT_WAIT}s" \
        "see /var/log/rabbitmq/ and 'rabbitmqctl status'"
}

# ----------------------------------------------------------------- consul --

# Print candidate Debian archive URIs from the machine's apt sources, best
# first (never the -security archive). Nothing is hard-coded.
debian_mirror_uris() {
    local files=()
    local f
    for f in /etc/apt/sources.list.d/*.sources; do [ -f "$f" ] && files+=("$f"); done
    {
        if [ "${#files[@]}" -gt 0 ]; then
            # deb822 stanzas
            awk '
                function flush() {
                    if (uris != "" && types ~ /(^| )deb( |$)/ && tolower(enabled) != "no")
                        print uris "\t" suites
                    uris = ""; suites = ""; types = ""; enabled = ""; field = ""
                }
                FNR == 1 { flush() }
                /^[ \t]*#/ { next }
                /^[ \t]*$/ { flush(); next }
                /^[ \t]/ {                       # folded continuation line
                    if (field == "uris") uris = uris " " $0
                    else if (field == "suites") suites = suites " " $0
                    next
                }
                {
                    key = tolower($0); sub(/:.*/, "", key)
                    val = $0; sub(/^[^:]*:[ \t]*/, "", val)
                    field = key
                    if (key == "uris") uris = val
                    else if (key == "suites") suites = val
                    else if (key == "types") types = val
                    else if (key == "enabled") enabled = val
                }
                END { flush() }
            ' "${files[@]}" | while IFS=$'\t' read -r uris suites; do
                for f in $uris; do printf '%s\t%s\n' "$f" "$suites"; done
            done
        fi
        # one-line style: deb [opts] URI suite components...
        for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
            [ -f "$f" ] || continue
            sed -E -n 's/^[[:space:]]*deb[[:space:]]+(\[[^]]*\][[:space:]]+)?([^[:space:]]+)[[:space:]]+([^[:space:]]+).*/\2\t\3/p' "$f"
        done
    } | awk -F'\t' '
        { uri = $1; sub(/\/+$/, "", uri) }
        uri !~ /^(https?|ftp|file):/ { next }
        uri ~ /security/ || $2 ~ /security|\/updates/ { next }
        $2 !~ /(^|[ \t])(buster|bullseye|bookworm|trixie|forky|duke|sid|oldoldstable|oldstable|stable|testing|unstable)(-updates|-backports|-proposed-updates)?([ \t]|$)/ { next }
        seen[uri]++ { next }
        { print ((uri ~ /\/debian$/) ? 0 : 1) "\t" NR "\t" uri }
    ' | sort -n -k1,1 -k2,2 | cut -f3
}

# Fetch the consul binary from Debian bullseye into the cache folder, using a
# private apt configuration so the system's apt state is left untouched.
install_consul_from_debian() {
    if ! have apt-get || ! have dpkg-deb; then
        die "consul: cannot install: apt-get/dpkg-deb not found" \
            "put a consul binary on PATH or at $CONSUL_CACHED_BIN"
    fi
    if [ ! -s "$DEBIAN_KEYRING" ]; then
        if [ "$(id -u)" = 0 ]; then
            log "consul: $DEBIAN_KEYRING missing; installing debian-archive-keyring"
            apt_env apt-get install -y -q debian-archive-keyring >/dev/null 2>&1 || true
        fi
        [ -s "$DEBIAN_KEYRING" ] ||
            die "consul: $DEBIAN_KEYRING not found, cannot verify the $CONSUL_SUITE archive" \
                "run: apt-get install -y debian-archive-keyring  (then re-run this script)"
    fi

    local uris
    uris="$(debian_mirror_uris)"
    [ -n "$uris" ] ||
        die "consul: no Debian archive mirror found in /etc/apt/sources.list{,.d/*.list,.d/*.sources}" \
            "add your Debian mirror to the apt sources, or put a consul binary at $CONSUL_CACHED_BIN"

    local tmp
    tmp="$(mktemp -d "${TMPDIR:-/tmp}/consul-apt.XXXXXX")"
    # shellcheck disable=SC2064  # expand $tmp now
    trap "rm -rf '$tmp'" EXIT
    mkdir -p "$tmp/lists/partial" "$tmp/cache/archives/partial" "$tmp/deb"
    local apt_opts=(
        -q
        -o "Dir::Etc::SourceList=$tmp/sources.list"
        -o "Dir::Etc::SourceParts=/dev/null"
        -o "Dir::State::Lists=$tmp/lists"
        -o "Dir::Cache=$tmp/cache"
        -o "Dir::Cache::archives=$tmp/cache/archives"
        -o "APT::Sandbox::User=root"
        -o "Acquire::Languages=none"
    )

    local uri ok=""
    while IFS= read -r uri; do
        [ -n "$uri" ] || continue
        log "consul: downloading Debian $CONSUL_SUITE package 'consul' from $uri"
        printf 'deb [signed-by=%s] %s %s main\n' "$DEBIAN_KEYRING" "$uri" "$CONSUL_SUITE" >"$tmp/sources.list"
        rm -f "$tmp"/deb/*.deb
        if apt-get "${apt_opts[@]}" update >"$tmp/apt.log" 2>&1 &&
            ! grep -qE '^(W|E): .*(GPG|NO_PUBKEY|not signed|Failed to fetch)' "$tmp/apt.log" &&
            (cd "$tmp/deb" && apt-get "${apt_opts[@]}" download consul) >>"$tmp/apt.log" 2>&1; then
            ok=1
            break
        fi
        tail -n 8 "$tmp/apt.log" | sed "s/^/$PROG:   apt: /" >&2
        if grep -qE 'NO_PUBKEY|not signed|GPG error' "$tmp/apt.log"; then
            warn "signature check of $CONSUL_SUITE failed with $DEBIAN_KEYRING; try: apt-get install -y debian-archive-keyring"
        fi
    done <<<"$uris"
    [ -n "$ok" ] ||
        die "consul: could not download the 'consul' package from Debian $CONSUL_SUITE (apt output above)" \
            "check that the mirror serves '$CONSUL_SUITE', or put a consul binary at $CONSUL_CACHED_BIN"

    local deb
    deb="$(find "$tmp/deb" -maxdepth 1 -name 'consul_*.deb' | head -n 1)"
    [ -n "$deb" ] || die "consul: apt-get download produced no consul_*.deb"
    dpkg-deb -x "$deb" "$tmp/x"
    [ -x "$tmp/x/usr/bin/consul" ] || die "consul: $deb does not contain usr/bin/consul"
    mkdir -p "$CACHE_DIR"
    install -m 0755 "$tmp/x/usr/bin/consul" "$CONSUL_CACHED_BIN.new"
    mv -f "$CONSUL_CACHED_BIN.new" "$CONSUL_CACHED_BIN"
    rm -rf "$tmp"
    trap - EXIT
    log "consul: installed $("$CONSUL_CACHED_BIN" version | head -n 1) from $(basename "$deb") -> $CONSUL_CACHED_BIN"
}

# Print the pid of a consul agent this script started earlier, if still alive.
our_consul_pid() {
    local pid
    [ -s "$CONSUL_PIDFILE" ] || return 1
    pid="$(tr -dc '0-9' <"$CONSUL_PIDFILE")"
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = consul ] || return 1
    printf '%s\n' "$pid"
}

wait_consul_leader() { # BASE_URL SECONDS [PID]: fail early if PID dies
    local deadline=$((SECONDS + $2)) leader
    while [ "$SECONDS" -lt "$deadline" ]; do
        if leader="$(consul_leader "$1")"; then
            printf '%s\n' "$leader"
            return 0
        fi
        if [ -n "${3:-}" ] && ! kill -0 "$3" 2>/dev/null; then
            return 1
        fi
        sleep 0.5
    done
    return 1
}

ensure_consul() {
    local url leader
    if [ -n "${CONSUL_HTTP_ADDR:-}" ]; then
        if url="$(consul_url "$CONSUL_HTTP_ADDR")" && leader="$(consul_leader "$url")"; then
            log "consul: OK at $url (CONSUL_HTTP_ADDR, leader $leader)"
            return 0
        fi
        log "consul: nothing answering at CONSUL_HTTP_ADDR=$CONSUL_HTTP_ADDR; using $CONSUL_DEFAULT_ADDR"
    fi
    url="http://$CONSUL_DEFAULT_ADDR"
    if leader="$(consul_leader "$url")"; then
        log "consul: OK at $url (leader $leader)"
        return 0
    fi

    mkdir -p "$CACHE_DIR"
    # Serialise concurrent runs (install/start) of this script.
    if have flock; then
        exec 9>"$CACHE_DIR/.lock"
        flock -w 120 9 || die "consul: timed out waiting for lock $CACHE_DIR/.lock"
        if leader="$(consul_leader "$url")"; then
            log "consul: OK at $url (leader $leader)"
            return 0
        fi
    fi

    local pid
    if pid="$(our_consul_pid)"; then
        log "consul: agent started earlier (pid $pid) is alive; waiting for a leader"
        if leader="$(wait_consul_leader "$url" "$CONSUL_WAIT")"; then
            log "consul: OK at $url (pid $pid, leader $leader)"
            return 0
        fi
        die "consul: agent pid $pid (from $CONSUL_PIDFILE) has no leader after ${CONSUL_WAIT}s" \
            "see $CONSUL_LOG; to restart: kill $pid && $0 consul"
    fi

    local bin=""
    if have consul; then
        bin="$(command -v consul)"
    elif [ -x "$CONSUL_CACHED_BIN" ] && "$CONSUL_CACHED_BIN" version >/dev/null 2>&1; then
        bin="$CONSUL_CACHED_BIN"
    else
        install_consul_from_debian
        bin="$CONSUL_CACHED_BIN"
    fi
    # Convenience: make `consul` usable from the shell when we are root.
    if ! have consul && [ "$bin" = "$CONSUL_CACHED_BIN" ] && [ "$(id -u)" = 0 ] &&
        [ -d /usr/local/bin ] && [ ! -e /usr/local/bin/consul ]; then
        ln -s "$CONSUL_CACHED_BIN" /usr/local/bin/consul && log "consul: linked /usr/local/bin/consul -> $CONSUL_CACHED_BIN"
    fi

    if tcp_open 127.0.0.1 "${CONSUL_DEFAULT_ADDR##*:}"; then
        warn "port ${CONSUL_DEFAULT_ADDR##*:} is open but does not answer /v1/status/leader; starting anyway"
    fi
    # session_ttl_min 1s: the leadership lease (coordinator_agent/ha/lease.py) uses a TTL of a few
    # seconds, below Consul's default minimum of 10 s.
    log "consul: starting dev agent ($bin agent -dev -client 127.0.0.1 -bind 127.0.0.1), log $CONSUL_LOG"
    rm -f "$CONSUL_PIDFILE"
    {
        printf '\n==== %s: %s starting consul dev agent\n' "$(date -u +%FT%TZ)" "$PROG"
    } >>"$CONSUL_LOG"
    setsid nohup "$bin" agent -dev -client 127.0.0.1 -bind 127.0.0.1 \
        -hcl 'session_ttl_min = "1s"' -pid-file "$CONSUL_PIDFILE" </dev/null >>"$CONSUL_LOG" 2>&1 9>&- &
    local started=$!
    if leader="$(wait_consul_leader "$url" "$CONSUL_WAIT" "$started")"; then
        [ -s "$CONSUL_PIDFILE" ] || echo "$started" >"$CONSUL_PIDFILE"
        log "consul: OK at $url (pid $(cat "$CONSUL_PIDFILE"), leader $leader)"
        log "consul: for clients: export CONSUL_HTTP_ADDR=$CONSUL_DEFAULT_ADDR"
        return 0
    fi
    # Show only this run's part of the log.
    awk '/^==== /{n=0} {l[n++]=$0} END{for(i=(n>15?n-15:0);i<n;i++) print l[i]}' "$CONSUL_LOG" |
        sed "s/^/$PROG:   log: /" >&2
    die "consul: dev agent did not come up with a leader at $url (log tail above)" \
        "see $CONSUL_LOG; is port 8500/8300/8301/8600 already in use? (ss -ltnp)"
}

# ------------------------------------------------------------------- main --

case "$TARGET" in
    all)
        ensure_rabbitmq
        ensure_consul
        ;;
    rabbitmq) ensure_rabbitmq ;;
    consul) ensure_consul ;;
    -h | --help) usage ;;
    *) usage ;;
esac
