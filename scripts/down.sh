#!/usr/bin/env bash
# Stops what scripts/up.sh started: the services and our nats-server
# (SIGTERM, then SIGKILL after a deadline), found by their pid files in .run/.
# Postgres and Redis are shared system services and keep running.
#
#   scripts/down.sh            stop; keep .run (logs, JetStream store) and the databases
#   scripts/down.sh --purge    also remove .run and drop the databases
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
case "${1:-}" in -h | --help) sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//' && exit 0 ;; esac
exec cargo run --release --locked --quiet -p stack -- down "$@"
