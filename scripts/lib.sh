#!/usr/bin/env bash
# The bootstrap of up.sh and test.sh, sourced: `bootstrap` installs missing
# Debian packages and the pinned tools (.venv), and starts Postgres and Redis
# (shared system services) if nothing answers; never stops them. Everything
# else (databases, our nats-server, the services) is the `stack` command's.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
VENV="$ROOT/.venv"
REQUIREMENTS="$ROOT/scripts/requirements-dev.txt"

NATS_VERSION="2.15.1"
NATS_BIN="$VENV/bin/nats-server"
PROMTOOL_BIN="$VENV/prometheus/usr/bin/promtool"

PG_HOST="127.0.0.1"
PG_PORT="${PG_PORT:-5432}"
REDIS_HOST="127.0.0.1"
REDIS_PORT="${REDIS_PORT:-6379}"
WAIT_TIMEOUT="${WAIT_TIMEOUT:-60}" # seconds wait_for gives a condition

log() { printf '==> %s\n' "$*"; }
warn() { printf 'warning: %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2 && exit 1; }

have() { command -v "$1" >/dev/null 2>&1; }

# wait_for CMD [ARGS...]: runs CMD (quietly) until it succeeds or
# $WAIT_TIMEOUT seconds have passed; returns 1 on timeout.
wait_for() {
    local deadline=$((SECONDS + WAIT_TIMEOUT))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
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
psql_admin() { psql -X -q -v ON_ERROR_STOP=1 -h "$PG_HOST" -p "$PG_PORT" -U postgres "$@"; }

# ensure_packages [CMD[:PACKAGE]...]: the Debian packages the stack needs, and CMD's, if missing.
ensure_packages() {
    local missing=()
    if ! have psql || ! have pg_ctlcluster || ! have pg_isready ||
        ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
        missing+=(postgresql)
    fi
    have redis-server && have redis-cli || missing+=(redis-server)
    have curl || missing+=(curl)
    # An extra is a command that its package names, or COMMAND:PACKAGE.
    for extra in "$@"; do have "${extra%%:*}" || missing+=("${extra#*:}"); done
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

# ensure_promtool: Debian's promtool, unpacked into .venv (no daemon started).
ensure_promtool() {
    [ -x "$PROMTOOL_BIN" ] && return 0
    log "unpacking promtool (Debian's prometheus package) into .venv"
    (cd "$(mktemp -d)" && { apt-get download -qq prometheus 2>/dev/null || { as_root apt-get update -qq && apt-get download -qq prometheus; }; } &&
        dpkg-deb -x prometheus_*.deb "$VENV/prometheus" && rm -r "$PWD") || die "cannot unpack Debian's prometheus package"
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
    redis-server --daemonize yes --bind "$REDIS_HOST" --port "$REDIS_PORT" --save "" --appendonly no --maxmemory 256mb --maxmemory-policy volatile-lru >/dev/null
    WAIT_TIMEOUT=30 wait_for redis_answers || die "Redis does not answer on $REDIS_HOST:$REDIS_PORT"
}

# bootstrap [PACKAGE...]: everything `stack` needs from the machine, and more packages.
bootstrap() {
    have cargo || die "cargo not found: install Rust (https://rustup.rs) first"
    ensure_packages "$@"
    ensure_venv
    ensure_promtool
    ensure_postgres
    ensure_redis
    export NATS_SERVER_BIN="$NATS_BIN" PROMTOOL_BIN
}
