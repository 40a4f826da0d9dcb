#!/usr/bin/env bash
# Starts the whole saga stack natively and runs a demo:
#
#   scripts/up.sh               install what is missing, build, start, demo
#   scripts/up.sh --no-demo     the same without the demo
#   scripts/up.sh status|demo   any other `stack` subcommand (--help lists them)
#
# Installs what is missing (Debian packages, .venv with nats-server 2.15.1),
# makes sure Postgres and Redis answer on localhost, then builds and runs the
# `stack` command (cargo run --release -p stack), which creates the
# databases, starts our nats-server and the services (pid files and logs in
# .run/), waits until each is ready, and places one order that is confirmed
# and one that is compensated. Safe to run again: running services are
# restarted. `cargo run -p stack -- --help` lists its environment variables.
# Stop with scripts/down.sh.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"

case "${1:-}" in
-h | --help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//' && exit 0 ;;
"" | -*) set -- up "$@" ;;
esac
bootstrap
log "building the stack command (cargo build --release -p stack)"
exec cargo run --release --locked --quiet -p stack -- "$@"
