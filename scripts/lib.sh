#!/usr/bin/env bash
# Shared helpers for the native scripts (up.sh, down.sh, test.sh).
# Source it; it defines variables and functions and starts nothing by itself:
#
#   source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
#
# Everything of ours that runs (nats-server, the four services) keeps its pid
# file and log under $RUN_DIR. Postgres and Redis are treated as shared system
# services: started if nothing answers, never stopped.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
# Pid files, logs and the JetStream store of the stack up.sh starts.
RUN_DIR="${RUN_DIR:-$ROOT/.run}"
VENV="$ROOT/.venv"
REQUIREMENTS="$ROOT/scripts/requirements-dev.txt"

# One database per service (kept in step with docker-compose.yml by scripts/check-compose.py).
DATABASES="saga_order saga_payment saga_inventory saga_shipping"
SERVICES="order payment inventory shipping"

NATS_VERSION="2.15.1"
NATS_BIN="$VENV/bin/nats-server"
NATS_CONF="$ROOT/nats/nats-server.conf"

PG_HOST="127.0.0.1"
PG_PORT="${PG_PORT:-5432}"
REDIS_HOST="127.0.0.1"
REDIS_PORT="${REDIS_PORT:-6379}"

# Seconds wait_for gives a condition before giving up.
WAIT_TIMEOUT="${WAIT_TIMEOUT:-60}"

# ---------------------------------------------------------------------------
# Small helpers

log() { printf '==> %s\n' "$*"; }
warn() { printf 'warning: %s\n' "$*" >&2; }
die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

have() { command -v "$1" >/dev/null 2>&1; }

# wait_for CMD [ARGS...]: runs CMD (quietly) until it succeeds or
# $WAIT_TIMEOUT seconds have passed; returns 1 on timeout.
wait_for() {
    local deadline=$((SECONDS + WAIT_TIMEOUT))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            return 1
        fi
        sleep 0.2
    done
}

# port_in_use PORT: true if something accepts TCP connections on 127.0.0.1:PORT.
port_in_use() {
    timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null
}

# as_root CMD...: runs CMD as root (via sudo when we are not root and sudo exists).
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif have sudo; then
        sudo "$@"
    else
        die "need root for: $* (and sudo is not installed)"
    fi
}

# as_postgres CMD...: runs CMD as the postgres OS user (peer auth on the local socket).
as_postgres() {
    if [ "$(id -un)" = postgres ]; then
        "$@"
    elif [ "$(id -u)" -eq 0 ]; then
        su postgres -s /bin/sh -c "$(printf '%q ' "$@")"
    elif have sudo; then
        sudo -u postgres "$@"
    else
        die "need root or sudo to run as the postgres user: $*"
    fi
}

# psql_admin ARGS...: psql as the postgres role over TCP.
psql_admin() {
    psql -X -q -v ON_ERROR_STOP=1 -h "$PG_HOST" -p "$PG_PORT" -U postgres "$@"
}

# json_field FIELD: prints FIELD of the JSON object on stdin (empty if null or absent).
json_field() {
    if have jq; then
        jq -r --arg f "$1" '.[$f] // empty'
    else
        python3 -c '
import json, sys
try:
    v = json.load(sys.stdin).get(sys.argv[1])
except (ValueError, AttributeError):
    v = None
print("" if v is None else v)' "$1"
    fi
}

# http_json METHOD URL [BODY [HEADER]]: sends a JSON request to one of the
# services and prints the response body; fails (with the status and body)
# unless it is 2xx.
http_json() {
    local method="$1" url="$2" out code body
    out="$(mktemp)"
    local args=(-sS -o "$out" -w '%{http_code}' -X "$method" --max-time 10)
    if [ $# -ge 3 ]; then
        args+=(-H 'Content-Type: application/json' --data "$3")
    fi
    if [ $# -ge 4 ]; then
        args+=(-H "$4")
    fi
    if ! code="$(curl "${args[@]}" "$url")"; then
        rm -f "$out"
        printf 'error: %s %s: no response\n' "$method" "$url" >&2
        return 1
    fi
    body="$(cat "$out")"
    rm -f "$out"
    case "$code" in
    2??) printf '%s\n' "$body" ;;
    *)
        printf 'error: %s %s: HTTP %s %s\n' "$method" "$url" "$code" "$body" >&2
        return 1
        ;;
    esac
}

# json_pretty: pretty-prints the JSON on stdin.
json_pretty() {
    python3 -m json.tool
}

# ---------------------------------------------------------------------------
# Pid files: $RUN_DIR/<name>.pid, each checked against the process's command
# line before it is trusted, so a stale file never makes us signal a stranger.

pid_file() { printf '%s/%s.pid\n' "$RUN_DIR" "$1"; }

# running_pid NAME EXE: prints the pid from NAME's pid file if that process is
# alive and was started as EXE; returns 1 otherwise.
running_pid() {
    local file pid argv0
    file="$(pid_file "$1")"
    [ -f "$file" ] || return 1
    pid="$(cat "$file" 2>/dev/null || true)"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    [ -r "/proc/$pid/cmdline" ] || return 1
    argv0="$(tr '\0' '\n' <"/proc/$pid/cmdline" | head -n1)"
    [ "$argv0" = "$2" ] || return 1
    printf '%s\n' "$pid"
}

# alive PID: true while PID runs (a zombie that is only waiting to be reaped counts as gone).
alive() {
    local state
    kill -0 "$1" 2>/dev/null || return 1
    state="$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)"
    [ -n "$state" ] && [ "$state" != Z ]
}

# stop_pids TIMEOUT NAME=EXE...: sends SIGTERM to each named process that
# running_pid vouches for, all at once; waits up to TIMEOUT seconds for them to
# exit, then sends SIGKILL to the rest. Removes the pid files.
stop_pids() {
    local timeout="$1" spec name pid i deadline
    shift
    local names=() pids=()
    for spec in "$@"; do
        name="${spec%%=*}"
        if pid="$(running_pid "$name" "${spec#*=}")"; then
            log "stopping $name (pid $pid)"
            kill -TERM "$pid" 2>/dev/null || true
            names+=("$name")
            pids+=("$pid")
        else
            rm -f "$(pid_file "$name")"
        fi
    done
    deadline=$((SECONDS + timeout))
    for i in "${!pids[@]}"; do
        pid="${pids[$i]}"
        while alive "$pid"; do
            if ((SECONDS >= deadline)); then
                warn "${names[$i]} (pid $pid) still running after ${timeout}s; sending SIGKILL"
                kill -KILL "$pid" 2>/dev/null || true
                WAIT_TIMEOUT=5 wait_for eval "! alive $pid" || true
                break
            fi
            sleep 0.1
        done
        rm -f "$(pid_file "${names[$i]}")"
    done
}

# stop_pid NAME EXE [TIMEOUT]: stop_pids for one process (default timeout 20s).
stop_pid() { stop_pids "${3:-20}" "$1=$2"; }

# ---------------------------------------------------------------------------
# System packages, Python tooling, Postgres, Redis

# ensure_packages: installs the Debian packages the native stack needs, if missing.
ensure_packages() {
    local missing=()
    if ! have psql || ! have pg_ctlcluster || ! have pg_isready ||
        ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
        missing+=(postgresql)
    fi
    have redis-server && have redis-cli || missing+=(redis-server)
    have curl || missing+=(curl)
    if ! have python3; then
        missing+=(python3 python3-venv)
    elif [ "$(command -v python3)" = /usr/bin/python3 ] && have dpkg-query &&
        ! dpkg-query -W -f='${Status}' python3-venv 2>/dev/null | grep -q 'ok installed'; then
        # Debian's python3 cannot create a venv without python3-venv (a
        # python3 from elsewhere, pyenv or a source build, has ensurepip built in).
        missing+=(python3-venv)
    fi
    [ ${#missing[@]} -eq 0 ] && return 0
    have apt-get || die "missing ${missing[*]} and this is not a Debian-like system; install them by hand"
    log "installing Debian packages: ${missing[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
}

# ensure_venv: $VENV with the pinned tools of scripts/requirements-dev.txt
# (nats-server $NATS_VERSION, the compose checker's libraries).
ensure_venv() {
    local stamp="$VENV/.requirements.sha256" want have_sum=""
    if [ ! -x "$VENV/bin/python" ]; then
        log "creating $VENV"
        python3 -m venv "$VENV"
    fi
    want="$(sha256sum "$REQUIREMENTS" | cut -d' ' -f1)"
    [ -f "$stamp" ] && have_sum="$(cat "$stamp")"
    if ! "$NATS_BIN" --version 2>/dev/null | grep -q "v$NATS_VERSION" || [ "$want" != "$have_sum" ]; then
        log "installing scripts/requirements-dev.txt into .venv"
        "$VENV/bin/python" -m pip install -q -r "$REQUIREMENTS"
        "$NATS_BIN" --version 2>/dev/null | grep -q "v$NATS_VERSION" ||
            die "$NATS_BIN is not nats-server v$NATS_VERSION after installing the requirements"
        printf '%s\n' "$want" >"$stamp"
    fi
}

# pg_answers: true if a Postgres server accepts connections on $PG_HOST:$PG_PORT.
pg_answers() { pg_isready -q -h "$PG_HOST" -p "$PG_PORT"; }

# ensure_postgres: a Postgres on $PG_HOST:$PG_PORT that lets the postgres role
# in over TCP without a password.
ensure_postgres() {
    local version="" cluster="" err hba
    if ! pg_answers; then
        # The cluster configured for $PG_PORT (after a fresh install: the only one, "main").
        read -r version cluster < <(pg_lsclusters -h 2>/dev/null |
            awk -v port="$PG_PORT" '$3 == port { print $1, $2; exit }') || true
        if [ -z "$version" ]; then
            # shellcheck disable=SC2012 # version directories: plain names
            version="$(ls /etc/postgresql 2>/dev/null | head -n1)"
            cluster=main
        fi
        [ -n "$version" ] || die "no Postgres cluster in /etc/postgresql (is the postgresql package installed?)"
        log "starting Postgres $version cluster '$cluster'"
        as_root pg_ctlcluster --skip-systemctl-redirect "$version" "$cluster" start ||
            warn "pg_ctlcluster $version $cluster start failed; waiting in case it is starting anyway"
        WAIT_TIMEOUT=60 wait_for pg_answers ||
            die "Postgres does not answer on $PG_HOST:$PG_PORT (see /var/log/postgresql/)"
    fi
    if err="$(psql_admin -tAc 'select 1' 2>&1 >/dev/null)"; then
        return 0
    fi
    case "$err" in
    *password* | *"no pg_hba.conf entry"*) ;;
    *) die "cannot connect to Postgres as postgres@$PG_HOST:$PG_PORT: $err" ;;
    esac
    hba="$(as_postgres psql -X -p "$PG_PORT" -tAc 'show hba_file')" || die "cannot read hba_file through the local socket: $err"
    log "allowing passwordless TCP connections from localhost in $hba"
    # Rewritten in place (not replaced) so the file keeps its owner and mode.
    # shellcheck disable=SC2016 # expanded by the inner sh
    as_root sh -c 'new="$(printf "%s\n%s\n" "host all all 127.0.0.1/32 trust" "host all all ::1/128 trust"; cat "$1")" &&
        printf "%s\n" "$new" >"$1"' sh "$hba"
    as_postgres psql -X -q -p "$PG_PORT" -tAc 'select pg_reload_conf()' >/dev/null
    WAIT_TIMEOUT=10 wait_for psql_admin -tAc 'select 1' ||
        die "still cannot connect as postgres@$PG_HOST:$PG_PORT after editing $hba"
}

redis_answers() { [ "$(redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ]; }

# ensure_redis: a Redis on $REDIS_HOST:$REDIS_PORT (started without persistence if none answers).
ensure_redis() {
    redis_answers && return 0
    log "starting redis-server on $REDIS_HOST:$REDIS_PORT"
    redis-server --daemonize yes --bind "$REDIS_HOST" --port "$REDIS_PORT" --save "" --appendonly no >/dev/null
    WAIT_TIMEOUT=30 wait_for redis_answers || die "Redis does not answer on $REDIS_HOST:$REDIS_PORT"
}

# create_databases: creates each of $DATABASES that does not exist yet.
create_databases() {
    local db
    for db in $DATABASES; do
        if [ "$(psql_admin -d postgres -tAc "select 1 from pg_database where datname = '$db'")" != 1 ]; then
            log "creating database $db"
            # Another up.sh may create it at the same moment: fine if it exists now.
            psql_admin -d postgres -c "CREATE DATABASE \"$db\"" 2>/dev/null ||
                [ "$(psql_admin -d postgres -tAc "select 1 from pg_database where datname = '$db'")" = 1 ] ||
                die "cannot create database $db"
        fi
    done
}

# drop_databases: drops each of $DATABASES (closing its connections).
drop_databases() {
    local db
    for db in $DATABASES; do
        psql_admin -d postgres -c "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)"
    done
}

# ---------------------------------------------------------------------------
# Our nats-server and the four services

# nats_pid: pid of our running nats-server, if any.
nats_pid() { running_pid nats "$NATS_BIN"; }

# start_nats PORT MONITOR_PORT: starts our nats-server with JetStream stored in
# $RUN_DIR/jetstream and waits until JetStream is up. Records the ports in
# $RUN_DIR/nats.ports.
#
# nats-server refuses -sd when the config file sets store_dir too ("Duplicate
# 'store_dir' configuration"), so it runs on a copy of nats/nats-server.conf
# with only store_dir changed; port and monitor port come from the command line.
start_nats() {
    local port="$1" monitor="$2" pid conf="$RUN_DIR/nats-server.conf"
    mkdir -p "$RUN_DIR/jetstream"
    sed "s|^\([[:space:]]*store_dir[[:space:]]*[:=]\).*\$|\1 \"$RUN_DIR/jetstream\"|" "$NATS_CONF" >"$conf"
    grep -q "store_dir.*\"$RUN_DIR/jetstream\"" "$conf" ||
        die "cannot set store_dir in $conf (no store_dir line in $NATS_CONF?)"
    nohup "$NATS_BIN" -c "$conf" -a 127.0.0.1 -p "$port" -m "$monitor" \
        >>"$RUN_DIR/nats.log" 2>&1 </dev/null &
    pid=$!
    echo "$pid" >"$(pid_file nats)"
    printf 'NATS_PORT=%s\nNATS_MONITOR_PORT=%s\n' "$port" "$monitor" >"$RUN_DIR/nats.ports"
    if ! WAIT_TIMEOUT=30 wait_for curl -fsS "http://127.0.0.1:$monitor/healthz?js-enabled-only=true"; then
        kill -0 "$pid" 2>/dev/null || die "nats-server exited; last lines of $RUN_DIR/nats.log:
$(tail -n 20 "$RUN_DIR/nats.log")"
        die "nats-server (pid $pid) is not healthy after 30s; see $RUN_DIR/nats.log"
    fi
}

stop_nats() { stop_pid nats "$NATS_BIN" 20; }

# cargo_target_dir: where cargo puts this workspace's build output, asked of
# cargo itself, so CARGO_TARGET_DIR and a build.target-dir setting are honoured.
cargo_target_dir() {
    if [ -z "${SAGA_TARGET_DIR:-}" ]; then
        if ! have cargo && [ -x "$HOME/.cargo/bin/cargo" ]; then
            PATH="$HOME/.cargo/bin:$PATH"
        fi
        have cargo || die "cargo not found: install Rust (rustup) first"
        SAGA_TARGET_DIR="$(cd "$ROOT" && cargo metadata --no-deps --format-version 1 |
            python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')" ||
            die "cannot ask cargo where it builds (cargo metadata failed)"
    fi
    printf '%s\n' "$SAGA_TARGET_DIR"
}

# built_bin NAME: where cargo builds the release binary of service NAME.
built_bin() { printf '%s/release/%s\n' "$(cargo_target_dir)" "$1"; }

# service_bin NAME: the binary the running NAME was started from (recorded in
# $RUN_DIR/NAME.exe by start_service), else where cargo builds it. Pid files
# are checked against it, so a stop finds exactly what a start started, even
# if CARGO_TARGET_DIR changed in between.
service_bin() {
    local recorded="$RUN_DIR/$1.exe"
    if [ -s "$recorded" ]; then
        cat "$recorded"
    else
        built_bin "$1"
    fi
}

# service_port NAME: the HTTP port of a service ($ORDER_PORT etc., default 8081-8084).
service_port() {
    case "$1" in
    order) echo "${ORDER_PORT:-8081}" ;;
    payment) echo "${PAYMENT_PORT:-8082}" ;;
    inventory) echo "${INVENTORY_PORT:-8083}" ;;
    shipping) echo "${SHIPPING_PORT:-8084}" ;;
    *) die "unknown service $1" ;;
    esac
}

service_url() { printf 'http://127.0.0.1:%s\n' "$(service_port "$1")"; }

# start_service NAME NATS_URL: starts cargo's release build of NAME in the
# background (log $RUN_DIR/NAME.log, pid $RUN_DIR/NAME.pid, binary recorded in
# $RUN_DIR/NAME.exe); does not wait for it.
start_service() {
    local name="$1" nats_url="$2" port exe
    port="$(service_port "$name")"
    exe="$(built_bin "$name")"
    [ -x "$exe" ] || die "$exe not found: build it with cargo build --release -p $name"
    if port_in_use "$port"; then
        die "port $port (for $name) is already in use by another process; set ${name^^}_PORT to use another"
    fi
    env NATS_URL="$nats_url" \
        DATABASE_URL="postgres://postgres@$PG_HOST:$PG_PORT/saga_$name" \
        REDIS_URL="redis://$REDIS_HOST:$REDIS_PORT" \
        HTTP_ADDR="127.0.0.1:$port" \
        SUBJECT_PREFIX="${SUBJECT_PREFIX:-saga}" \
        LOG_FORMAT=json \
        RUST_LOG="${RUST_LOG:-info}" \
        nohup "$exe" >>"$RUN_DIR/$name.log" 2>&1 </dev/null &
    echo "$!" >"$(pid_file "$name")"
    printf '%s\n' "$exe" >"$RUN_DIR/$name.exe"
}

# wait_service_ready NAME [TIMEOUT]: waits for NAME's /health/ready.
wait_service_ready() {
    local name="$1" timeout="${2:-90}" pid
    pid="$(cat "$(pid_file "$name")")"
    local deadline=$((SECONDS + timeout))
    while true; do
        # Liveness first: a ready answer on the port counts only while our
        # process is the one that could have given it.
        if ! kill -0 "$pid" 2>/dev/null; then
            die "$name exited during start-up; last lines of $RUN_DIR/$name.log:
$(tail -n 20 "$RUN_DIR/$name.log")"
        fi
        curl -fsS -o /dev/null "$(service_url "$name")/health/ready" 2>/dev/null && break
        if ((SECONDS >= deadline)); then
            die "$name (pid $pid) not ready after ${timeout}s; see $RUN_DIR/$name.log"
        fi
        sleep 0.2
    done
}

stop_service() {
    stop_pid "$1" "$(service_bin "$1")" 30
    rm -f "$RUN_DIR/$1.exe"
}

# stop_services: stops whichever of the four services we started, in parallel.
stop_services() {
    local s specs=()
    for s in $SERVICES; do
        specs+=("$s=$(service_bin "$s")")
    done
    stop_pids 30 "${specs[@]}"
    for s in $SERVICES; do
        rm -f "$RUN_DIR/$s.exe"
    done
}
