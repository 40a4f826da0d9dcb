#!/usr/bin/env bash
# Measures the local stack on the settings it ships with (nats-server.conf
# fsyncs every write, Postgres commits synchronously): saturation with 256
# sagas in flight, one saga in flight, and an open loop at 80% of the
# saturation rate; with each service's memory idle and at its peak.
# Starts the stack if it is not up (and stops it again afterwards).
# Usage: scripts/bench.sh   (BENCH_ORDERS=3000, BENCH_SECONDS=20)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"
case "${1:-}" in -h | --help) sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//' && exit 0 ;; esac

orders=${BENCH_ORDERS:-3000}
seconds=${BENCH_SECONDS:-20}
started=0
if ! bash scripts/up.sh status >/dev/null 2>&1; then
    bash scripts/up.sh --no-demo
    started=1
fi
stop() { if [ "$started" = 1 ]; then bash scripts/down.sh; fi; }
trap stop EXIT
source "${RUN_DIR:-$ROOT/.run}/stack.env"

log "building loadgen (cargo build --release -p saga-tests --bin loadgen)"
cargo build --release --locked --quiet -p saga-tests --bin loadgen
loadgen() { "$ROOT/target/release/loadgen" --stack --fail-ratio 0 "$@"; }

log "saturation: $orders sagas, 256 in flight"
out=$(loadgen --orders "$orders" --concurrency 256 | tee /dev/stderr)
rate=$(sed -n 's/^throughput: \([0-9]*\) sagas.*/\1/p' <<<"$out")
[ -n "$rate" ] && [ "$rate" -gt 0 ] || die "no throughput in loadgen's output"

log "one saga in flight: 300 sagas"
loadgen --orders 300 --concurrency 1

open=$((rate * 8 / 10))
log "open loop at 80% of saturation: $open sagas/s for $seconds s"
loadgen --orders $((open * seconds)) --rate "$open" --concurrency 4096
