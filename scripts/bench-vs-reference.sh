#!/usr/bin/env bash
# Measures this system against the minimal five-hop reference saga, back to
# back on this machine and on the settings both ship (the broker's
# `sync_interval: always`, Postgres's `synchronous_commit = on`), and prints
# one table with the ratios:
#
#   scripts/bench-vs-reference.sh                  one pair of runs
#   scripts/bench-vs-reference.sh --pairs 3        three pairs, alternated
#   scripts/bench-vs-reference.sh --orders 5000    sagas in our saturation run
#
# Each pair: our stack started afresh (scripts/down.sh --purge, up.sh
# --no-demo), then for both systems saturation (256 in flight) and one saga
# in flight, and for ours an open loop at half the reference's saturation
# rate. Per saga, for both: CPU (Postgres, nats-server, Redis and the
# services; the reference's process holds its driver too), Postgres
# statements sent (pg_stat_statements, top level, when it is loaded) and
# rows written (pg_stat_database). Run it on an otherwise idle machine.
#
# REFERENCE: the reference's folder (default ../shared/bench/minimal-saga).
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"

pairs=1 orders=3000
while [ $# -gt 0 ]; do
    case "$1" in
    --pairs) pairs=$2 && shift 2 ;;
    --orders) orders=$2 && shift 2 ;;
    -h | --help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//' && exit 0 ;;
    *) die "unknown argument $1 (--help lists them)" ;;
    esac
done
reference=${REFERENCE:-$ROOT/../shared/bench/minimal-saga}
[ -f "$reference/Cargo.toml" ] || die "no reference saga at $reference: set REFERENCE"

bootstrap
psql_at() { psql -h "$PG_HOST" -p "$PG_PORT" -U postgres -Atq "$@"; }
statements_loaded=$(psql_at -c "SHOW shared_preload_libraries" | grep -c pg_stat_statements || true)
if [ "$statements_loaded" = 0 ]; then
    warn "pg_stat_statements is not loaded: statements per saga are not counted" \
        "(shared_preload_libraries = 'pg_stat_statements', pg_stat_statements.track = all, and a restart)"
else
    psql_at -c "CREATE EXTENSION IF NOT EXISTS pg_stat_statements"
fi

log "building the reference and the load generator"
export REFERENCE_TARGET=${REFERENCE_TARGET:-$ROOT/target/reference}
(cd "$reference" && CARGO_TARGET_DIR=$REFERENCE_TARGET cargo build -q --release)
cargo build -q --release --locked -p saga-tests --bin loadgen -p stack
loadgen=$ROOT/target/release/loadgen
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# pg_costs LIKE: "<statements> <rows written>" so far by the databases
# whose names are LIKE the pattern; statements "?" without the extension.
pg_costs() {
    # Backends flush their counters within a second of going idle.
    sleep 1.5
    local rows statements="?"
    rows=$(psql_at -c "SELECT coalesce(sum(tup_inserted + tup_updated + tup_deleted), 0)
                       FROM pg_stat_database WHERE datname LIKE '$1'")
    if [ "$statements_loaded" != 0 ]; then
        statements=$(psql_at -c "SELECT coalesce(sum(s.calls), 0) FROM pg_stat_statements s
                                 JOIN pg_database d ON d.oid = s.dbid
                                 WHERE d.datname LIKE '$1' AND s.toplevel")
    fi
    echo "$statements $rows"
}

# per_saga BEFORE AFTER SAGAS: the difference per saga ("?" when unknown).
per_saga() {
    python3 -c 'import sys
b, a, n = sys.argv[1:]
print("?" if "?" in (b, a) or float(n) <= 0 else f"{(float(a) - float(b)) / float(n):.1f}")' "$@"
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# reference INFLIGHT SECONDS: runs the reference on a broker, Redis and a
# database of its own; prints its output, then "costs <statements> <rows>
# <sagas>" for its database.
reference() {
    local nport rport db npid rpid pg_pid out
    nport=$(free_port) rport=$(free_port) db=reference_bench_$$
    mkdir -p "$work/js"
    printf 'listen: 127.0.0.1:%s\njetstream { store_dir: "%s/js"\n sync_interval: always }\n' \
        "$nport" "$work" >"$work/nats.conf"
    "$NATS_BIN" -c "$work/nats.conf" >/dev/null 2>&1 &
    npid=$!
    redis-server --port "$rport" --bind 127.0.0.1 --save "" --appendonly no >/dev/null 2>&1 &
    rpid=$!
    wait_for bash -c "echo > /dev/tcp/127.0.0.1/$nport" && wait_for redis-cli -p "$rport" ping
    psql_at -c "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db"
    pg_pid=$(head -1 /var/run/postgresql/*.pid 2>/dev/null | head -1 || echo 0)
    local before
    before=$(pg_costs "$db")
    NATS_URL=127.0.0.1:$nport REDIS_URL=redis://127.0.0.1:$rport/ PGHOST=$PG_HOST PGPORT=$PG_PORT \
        PGUSER=postgres PGDATABASE=$db NATS_PID=$npid REDIS_PID=$rpid PG_PID=$pg_pid \
        INFLIGHT=$1 WARMUP_S=3 MEASURE_S=$2 "$REFERENCE_TARGET/release/sagabench" || true
    local after sagas
    after=$(pg_costs "$db")
    # Six state rows a saga (its start and five consumers): the sagas it
    # ran, those still in flight at the end counted by the share they did.
    sagas=$(psql_at -d "$db" -c "SELECT count(*) / 6.0 FROM saga_state")
    echo "costs $(per_saga "${before% *}" "${after% *}" "$sagas") $(per_saga "${before#* }" "${after#* }" "$sagas")"
    psql_at -c "DROP DATABASE $db"
    kill "$npid" "$rpid" 2>/dev/null || true
    wait "$npid" "$rpid" 2>/dev/null || true
    rm -rf "$work/js"
}

# ours ARGS...: one loadgen run against the running stack; prints its
# output, then "costs <statements> <rows>" per completed saga.
ours() {
    local before after out
    before=$(pg_costs 'saga\_%')
    out=$("$loadgen" --stack --fail-ratio 0 "$@")
    echo "$out"
    after=$(pg_costs 'saga\_%')
    local sagas
    sagas=$(sed -n 's/^completed: \([0-9]*\) of.*/\1/p' <<<"$out")
    echo "costs $(per_saga "${before% *}" "${after% *}" "$sagas") $(per_saga "${before#* }" "${after#* }" "$sagas")"
}

for pair in $(seq "$pairs"); do
    log "pair $pair of $pairs: our stack, started afresh"
    scripts/down.sh --purge >/dev/null
    scripts/up.sh --no-demo >/dev/null
    log "reference: saturation (256 in flight, 15 s)"
    reference 256 15 | tee "$work/ref-saturation-$pair"
    log "ours: saturation ($orders sagas, 256 in flight)"
    ours --orders "$orders" --concurrency 256 | tee "$work/ours-saturation-$pair"
    log "reference: one saga in flight (10 s)"
    reference 1 10 | tee "$work/ref-one-$pair"
    log "ours: one saga in flight (300 sagas)"
    ours --orders 300 --concurrency 1 | tee "$work/ours-one-$pair"
    rate=$(sed -n 's/.*completed in window: [0-9]* -> \([0-9]*\) sagas.*/\1/p' "$work/ref-saturation-$pair")
    rate=$((rate / 2))
    log "ours: open loop at $rate sagas/s (half the reference's saturation) for 20 s"
    ours --orders $((rate * 20)) --rate "$rate" --concurrency 4096 | tee "$work/ours-open-$pair"
done
scripts/down.sh >/dev/null

python3 "$ROOT/scripts/bench_table.py" "$work" "$pairs"
