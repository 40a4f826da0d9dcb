#!/usr/bin/env bash
# Stops what scripts/up.sh started: the four services and our nats-server
# (SIGTERM, then SIGKILL after a deadline), found by their pid files in .run/.
# Postgres and Redis are shared system services and keep running.
#
#   scripts/down.sh            stop; keep .run (logs, JetStream store) and the databases
#   scripts/down.sh --purge    also remove .run and drop the four databases
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

purge=0
for arg in "$@"; do
    case "$arg" in
    --purge) purge=1 ;;
    -h | --help)
        sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    *) die "unknown argument: $arg (expected --purge)" ;;
    esac
done

stop_services
stop_nats

if [ "$purge" = 1 ]; then
    log "removing $RUN_DIR"
    rm -rf "$RUN_DIR"
    if pg_answers; then
        log "dropping databases: $DATABASES"
        drop_databases
    else
        warn "Postgres does not answer on $PG_HOST:$PG_PORT; databases not dropped"
    fi
fi
log "stopped"
