#!/usr/bin/env bash
# A private RabbitMQ node for the fault-injection suite (tests/faults, `make faults`).
#
# The suite pauses, restarts and cuts this node; it must never touch the shared broker. So the
# node has a name, ports, data, logs and config of its own (loopback only, no plugins, no
# management), and lives under one folder that `stop` removes.
#
# Usage: scripts/faults-broker.sh start|stop|status|pid
#   start   start the node and wait until it accepts AMQP (idempotent)
#   stop    stop it (SIGCONT first, in case a test left it paused) and remove its folder
#   status  exit 0 when it is running
#   pid     print the Erlang VM's process id (what a test sends SIGSTOP to)
#
# Environment: FAULTS_NODENAME (faults@localhost), FAULTS_AMQP_PORT (5682),
# FAULTS_DIST_PORT (25682), FAULTS_BASE (/tmp/coordinator-agent-faults).
set -euo pipefail

PROG="faults-broker"
# shellcheck source=scripts/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

NODE="${FAULTS_NODENAME:-faults@localhost}"
PORT="${FAULTS_AMQP_PORT:-5682}"
DIST_PORT="${FAULTS_DIST_PORT:-25682}"
BASE="${FAULTS_BASE:-/tmp/coordinator-agent-faults}"
PIDFILE="$BASE/node.pid"
WAIT_S=90

# rabbitmqctl and the server run as the rabbitmq user when we are root: the Erlang cookie is
# theirs, so `rabbitmqctl -n $NODE` reaches this node as it reaches the shared one.
as_rabbitmq() {
    if [ "$(id -u)" = 0 ] && id -u rabbitmq >/dev/null 2>&1; then
        su rabbitmq -s /bin/sh -c "$*"
    else
        sh -c "$*"
    fi
}

ctl() { rabbitmqctl -q -n "$NODE" "$@"; }

running() { ctl status >/dev/null 2>&1; }

vm_pid() {
    [ -s "$PIDFILE" ] && cat "$PIDFILE"
}

start() {
    have rabbitmq-server || die "rabbitmq-server is not installed" "run \`make services\` first"
    if running; then
        log "$NODE already running on 127.0.0.1:$PORT"
        return 0
    fi
    mkdir -p "$BASE/mnesia" "$BASE/log"
    cat >"$BASE/rabbitmq.conf" <<EOF
listeners.tcp.local = 127.0.0.1:$PORT
distribution.listener.interface = 127.0.0.1
distribution.listener.port_range.min = $DIST_PORT
distribution.listener.port_range.max = $DIST_PORT
# The suite floods this node on purpose; never block publishers on a small test machine.
disk_free_limit.absolute = 50MB
vm_memory_high_watermark.relative = 0.6
EOF
    echo "[]." >"$BASE/enabled_plugins"
    if [ "$(id -u)" = 0 ] && id -u rabbitmq >/dev/null 2>&1; then
        chown -R rabbitmq: "$BASE"
    fi
    log "starting $NODE on 127.0.0.1:$PORT (dist $DIST_PORT, data $BASE)"
    as_rabbitmq "cd '$BASE' && \
        RABBITMQ_NODENAME='$NODE' RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
        RABBITMQ_NODE_PORT='$PORT' RABBITMQ_DIST_PORT='$DIST_PORT' \
        RABBITMQ_MNESIA_BASE='$BASE/mnesia' RABBITMQ_LOG_BASE='$BASE/log' \
        RABBITMQ_CONFIG_FILE='$BASE/rabbitmq.conf' \
        RABBITMQ_ENABLED_PLUGINS_FILE='$BASE/enabled_plugins' \
        RABBITMQ_PID_FILE='$PIDFILE' ERL_EPMD_ADDRESS=127.0.0.1 \
        nohup /usr/lib/rabbitmq/bin/rabbitmq-server >'$BASE/log/startup.log' 2>&1 &"
    if ! timeout "$WAIT_S" rabbitmqctl -q -n "$NODE" wait --timeout "$WAIT_S" "$PIDFILE" \
            >/dev/null 2>&1; then
        die "$NODE did not start within ${WAIT_S}s" "see $BASE/log/startup.log"
    fi
    log "$NODE ready (vm pid $(vm_pid))"
}

stop() {
    local pid
    pid="$(vm_pid || true)"
    if [ -n "$pid" ]; then
        kill -CONT "$pid" 2>/dev/null || true # a paused VM cannot stop
    fi
    if running; then
        timeout 60 rabbitmqctl -q -n "$NODE" stop "$PIDFILE" >/dev/null 2>&1 || true
    fi
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -rf "$BASE"
    log "$NODE stopped"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) running ;;
    pid) vm_pid ;;
    *)
        echo "usage: $0 start|stop|status|pid" >&2
        exit 2
        ;;
esac
