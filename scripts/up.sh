#!/usr/bin/env bash
# Starts the whole saga stack natively and runs a demo:
#
#   scripts/up.sh              build (cargo build --release) and start
#   scripts/up.sh --no-build   start what is already built
#
# Installs what is missing (Debian packages, .venv with nats-server), makes sure
# Postgres and Redis answer on localhost, creates the databases, starts our own
# nats-server (JetStream store in .run/jetstream), builds and starts the four
# services, then places one order that is confirmed and one that is cancelled
# and compensated. Safe to run again: running services are restarted.
#
# The binaries are started from wherever cargo builds them (CARGO_TARGET_DIR
# and build.target-dir are honoured: cargo metadata says where). If start-up
# fails, whatever this run started is stopped again and the log to read is
# named; nothing is left half-started.
#
# Environment:
#   NATS_PORT, NATS_MONITOR_PORT   nats-server ports (default 4222/8222, or
#                                  4333/8333 when 4222 is taken by another server)
#   ORDER_PORT, PAYMENT_PORT, INVENTORY_PORT, SHIPPING_PORT
#                                  HTTP ports (default 8081-8084)
#   RUST_LOG                       service log filter (default info)
#   DEMO_TIMEOUT                   seconds an order may take to settle (default 30)
#   RUN_DIR                        pid files, logs and JetStream store (default .run)
#
# Stop with scripts/down.sh.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"

DEMO_TIMEOUT="${DEMO_TIMEOUT:-30}"
REQUESTED_NATS_PORT="${NATS_PORT:-}"
REQUESTED_NATS_MONITOR_PORT="${NATS_MONITOR_PORT:-}"

# nats_version_on PORT: the version a NATS server on PORT announces in its INFO line.
nats_version_on() {
    timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1 && head -n1 <&3" 2>/dev/null |
        grep -o '"version":"[^"]*"' | head -n1 | cut -d'"' -f4 || true
}

# choose_nats_ports: sets NATS_PORT and NATS_MONITOR_PORT for a new nats-server.
choose_nats_ports() {
    if [ -n "$REQUESTED_NATS_PORT" ]; then
        NATS_PORT="$REQUESTED_NATS_PORT"
        NATS_MONITOR_PORT="${REQUESTED_NATS_MONITOR_PORT:-8222}"
    elif ! port_in_use 4222 && ! port_in_use "${REQUESTED_NATS_MONITOR_PORT:-8222}"; then
        NATS_PORT=4222
        NATS_MONITOR_PORT="${REQUESTED_NATS_MONITOR_PORT:-8222}"
    else
        local other
        if port_in_use 4222; then
            other="$(nats_version_on 4222)"
            if [ -n "$other" ]; then
                log "port 4222 is taken by another nats-server (v$other; this stack needs v$NATS_VERSION): using port 4333, monitor 8333"
            else
                log "port 4222 is taken by another process: using port 4333, monitor 8333 for nats-server"
            fi
        else
            log "monitor port 8222 is taken by another process: using port 4333, monitor 8333 for nats-server"
        fi
        NATS_PORT=4333
        NATS_MONITOR_PORT="${REQUESTED_NATS_MONITOR_PORT:-8333}"
    fi
    port_in_use "$NATS_PORT" && die "port $NATS_PORT is in use; set NATS_PORT to a free port"
    port_in_use "$NATS_MONITOR_PORT" && die "port $NATS_MONITOR_PORT is in use; set NATS_MONITOR_PORT to a free port"
    return 0
}

# ensure_nats: our nats-server, reused when it is already running on the wanted port.
ensure_nats() {
    local pid running_port="" running_monitor=""
    if pid="$(nats_pid)"; then
        if [ -f "$RUN_DIR/nats.ports" ]; then
            running_port="$(sed -n 's/^NATS_PORT=//p' "$RUN_DIR/nats.ports")"
            running_monitor="$(sed -n 's/^NATS_MONITOR_PORT=//p' "$RUN_DIR/nats.ports")"
        fi
        if [ -n "$running_port" ] &&
            { [ -z "$REQUESTED_NATS_PORT" ] || [ "$REQUESTED_NATS_PORT" = "$running_port" ]; } &&
            { [ -z "$REQUESTED_NATS_MONITOR_PORT" ] || [ "$REQUESTED_NATS_MONITOR_PORT" = "$running_monitor" ]; } &&
            curl -fsS -o /dev/null "http://127.0.0.1:$running_monitor/healthz?js-enabled-only=true" 2>/dev/null; then
            NATS_PORT="$running_port"
            NATS_MONITOR_PORT="$running_monitor"
            log "our nats-server v$NATS_VERSION is already running (pid $pid, port $NATS_PORT)"
            return 0
        fi
        stop_nats
    fi
    choose_nats_ports
    log "starting nats-server v$NATS_VERSION on 127.0.0.1:$NATS_PORT (monitor $NATS_MONITOR_PORT, store $RUN_DIR/jetstream)"
    STARTED+=(nats)
    start_nats "$NATS_PORT" "$NATS_MONITOR_PORT"
}

build_services() {
    log "building the services (cargo build --release, into $SAGA_TARGET_DIR)"
    local args=() s
    for s in $SERVICES; do
        args+=(-p "$s")
    done
    (cd "$ROOT" && cargo build --release "${args[@]}")
}

# check_binaries: every service binary is where it will be started from.
check_binaries() {
    local s exe missing=()
    for s in $SERVICES; do
        exe="$(built_bin "$s")"
        [ -x "$exe" ] || missing+=("$exe")
    done
    [ ${#missing[@]} -eq 0 ] ||
        die "not built: ${missing[*]} (run without --no-build, or cargo build --release)"
}

# What this run started, in order; stopped again if start-up fails.
STARTED=()
UP_OK=0

# undo_failed_start: the EXIT trap. After a failed start-up it stops what this
# run started (services, then the broker) and says which log to read.
undo_failed_start() {
    local rc=$? i name
    [ "$UP_OK" = 1 ] && return "$rc"
    [ ${#STARTED[@]} -eq 0 ] && return "$rc"
    warn "start-up failed; stopping what this run started: ${STARTED[*]}"
    for ((i = ${#STARTED[@]} - 1; i >= 0; i--)); do
        name="${STARTED[$i]}"
        if [ "$name" = nats ]; then
            stop_nats || true
        else
            stop_service "$name" || true
        fi
    done
    warn "nothing of this run is left running; the logs are in $RUN_DIR/"
    return "$rc"
}

start_services() {
    local s
    for s in $SERVICES; do
        STARTED+=("$s")
        start_service "$s" "nats://127.0.0.1:$NATS_PORT"
    done
    for s in $SERVICES; do
        wait_service_ready "$s" 90
        log "$s ready on $(service_url "$s") (pid $(cat "$(pid_file "$s")"))"
    done
    {
        echo "# Written by scripts/up.sh: source it to reach the running stack."
        echo "export NATS_URL=nats://127.0.0.1:$NATS_PORT"
        echo "export NATS_MONITOR_URL=http://127.0.0.1:$NATS_MONITOR_PORT"
        for s in $SERVICES; do
            echo "export ${s^^}_URL=$(service_url "$s")"
        done
    } >"$RUN_DIR/stack.env"
}

# settle ORDER_ID: polls the order until it leaves PENDING; prints its JSON.
settle() {
    local id="$1" json status deadline=$((SECONDS + DEMO_TIMEOUT))
    while :; do
        json="$(http_json GET "$(service_url order)/orders/$id")"
        status="$(json_field status <<<"$json")"
        if [ "$status" != PENDING ]; then
            printf '%s\n' "$json"
            return 0
        fi
        if ((SECONDS >= deadline)); then
            printf '%s\n' "$json"
            return 1
        fi
        sleep 0.3
    done
}

place_demo_order() {
    local country="$1"
    http_json POST "$(service_url order)/orders" "$(
        cat <<EOF
{"customerId": "demo-alice",
 "lines": [{"productId": "demo-widget", "quantity": 2, "unitPrice": 1250}],
 "shippingAddress": {"name": "Alice Demo", "street": "1 Main St", "city": "Springfield",
                     "postalCode": "62701", "country": "$country"}}
EOF
    )" | json_field orderId
}

demo() {
    local ok=0 id json status total reason balance deadline
    echo
    log "demo: customer demo-alice gets a balance of 10000, product demo-widget a stock of 100"
    # If-Match: * resets them on every run (an existing one is overwritten only on purpose).
    http_json PUT "$(service_url payment)/accounts/demo-alice" '{"balance": 10000}' 'If-Match: *' >/dev/null || return 1
    http_json PUT "$(service_url inventory)/stock/demo-widget" '{"available": 100}' 'If-Match: *' >/dev/null || return 1

    log "demo: order 2 x demo-widget at 1250, shipped to the US"
    id="$(place_demo_order US)"
    [ -n "$id" ] || die "POST /orders returned no orderId"
    if json="$(settle "$id")"; then :; fi
    printf '%s\n' "$json" | json_pretty || true
    status="$(json_field status <<<"$json")"
    total="$(json_field total <<<"$json")"
    echo "demo order $id: $status (total $total)"
    if [ "$status" != CONFIRMED ]; then
        if [ "$status" = PENDING ]; then
            warn "expected CONFIRMED, still PENDING after ${DEMO_TIMEOUT}s"
        else
            warn "expected CONFIRMED, got ${status:-no status} (failureReason: $(json_field failureReason <<<"$json"))"
        fi
        ok=1
    fi

    log "demo: the same order shipped to country ZZ, where no carrier delivers"
    id="$(place_demo_order ZZ)"
    [ -n "$id" ] || die "POST /orders returned no orderId"
    if json="$(settle "$id")"; then :; fi
    status="$(json_field status <<<"$json")"
    reason="$(json_field failureReason <<<"$json")"
    echo "demo order $id: $status (failureReason: ${reason:-none})"
    if [ "$status" != CANCELLED ]; then
        if [ "$status" = PENDING ]; then
            warn "expected CANCELLED, still PENDING after ${DEMO_TIMEOUT}s"
        else
            warn "expected CANCELLED, got ${status:-no status}"
        fi
        ok=1
    else
        # The payment taken before shipping refused is refunded by compensation.
        deadline=$((SECONDS + 10))
        while :; do
            balance="$(http_json GET "$(service_url payment)/accounts/demo-alice" | json_field balance)"
            if [ "$balance" = 7500 ] || ((SECONDS >= deadline)); then
                break
            fi
            sleep 0.3
        done
        echo "demo-alice balance: $balance (10000 - 2500 for the confirmed order; the cancelled order's payment was refunded)"
    fi
    return "$ok"
}

usage() {
    local s
    cat <<EOF

The stack is running:
EOF
    for s in $SERVICES; do
        printf '  %-10s %s\n' "$s" "$(service_url "$s")"
    done
    cat <<EOF
  nats       nats://127.0.0.1:$NATS_PORT (monitoring http://127.0.0.1:$NATS_MONITOR_PORT)

For the nats CLI:
  export NATS_URL=nats://127.0.0.1:$NATS_PORT
  nats sub 'saga.>'
(all of the above: source $RUN_DIR/stack.env)

Logs: $RUN_DIR/{nats,order,payment,inventory,shipping}.log
Stop: scripts/down.sh   (--purge also removes .run and drops the databases)
EOF
}

main() {
    local started=$SECONDS build=1 arg
    for arg in "$@"; do
        case "$arg" in
        --no-build) build=0 ;;
        -h | --help)
            sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *) die "unknown argument: $arg (expected --no-build)" ;;
        esac
    done
    ensure_packages
    SAGA_TARGET_DIR="$(cargo_target_dir)"
    export SAGA_TARGET_DIR
    if [ "$build" = 1 ]; then
        build_services
    fi
    check_binaries
    ensure_venv
    ensure_postgres
    ensure_redis
    create_databases
    mkdir -p "$RUN_DIR"
    trap undo_failed_start EXIT
    # Restart: the old services go before their nats-server might.
    stop_services
    ensure_nats
    start_services
    UP_OK=1
    log "stack up in $((SECONDS - started))s"

    if ! demo; then
        echo
        warn "the demo did not end as expected; the stack is left running, see $RUN_DIR/*.log"
        usage
        exit 1
    fi
    usage
}

main "$@"
