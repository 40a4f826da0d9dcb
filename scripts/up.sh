#!/usr/bin/env bash
# Starts the whole saga stack natively and runs a demo:
#
#   scripts/up.sh               install what is missing, build, start, demo
#   scripts/up.sh --no-demo     the same without the demo
#   scripts/up.sh --cluster     the broker as a 3-node nats cluster (--replicas N: N per service)
#   scripts/up.sh status|demo   any other `stack` subcommand (--help lists them)
#
# Installs what is missing (Debian packages, .venv), then runs `stack`: databases,
# broker, services (pids, logs in .run/), a demo. Safe to rerun; stop: scripts/down.sh.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"

case "${1:-}" in
-h | --help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//' && exit 0 ;;
"" | -*) set -- up "$@" ;;
esac
bootstrap
log "building the stack command (cargo build --release -p stack)"
exec cargo run --release --locked --quiet -p stack -- "$@"
