#!/usr/bin/env bash
# Writes .env for docker compose: every secret the compose files read, fresh
# and random, readable by you only (0600). Refuses to overwrite an .env.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[ ! -e .env ] || { echo "error: .env exists; remove it first to make new secrets" >&2 && exit 1; }
secret() { od -An -tx1 -N"$1" /dev/urandom | tr -d ' \n'; }
umask 077
{
    echo "# Written by scripts/compose-env.sh on $(date -u +%FT%TZ). Keep it out of git (it is ignored)."
    echo "COMPOSE_PROJECT_NAME=saga"
    echo "ADMIN_TOKEN=$(secret 32)"
    for name in POSTGRES_PASSWORD REDIS_PASSWORD \
        NATS_PASSWORD_{ORDER,PAYMENT,INVENTORY,SHIPPING,OPERATOR,PROVISIONER,ROUTE} \
        DATABASE_PASSWORD_{ORDER,PAYMENT,INVENTORY,SHIPPING,AUDITOR}; do
        echo "$name=$(secret 24)"
    done
} >.env.new
mv .env.new .env
echo "wrote .env (mode 0600): docker compose up -d --build"
