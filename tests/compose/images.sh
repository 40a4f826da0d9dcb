#!/usr/bin/env bash
# Makes sure a Docker engine answers (installing Debian's docker.io and
# docker-compose and starting dockerd when none does), then that every image
# docker-compose.yml and Dockerfile name is on it: present, or pulled, or -
# only where neither works - built as a stand-in (stand-ins/README.md).
# Prints the compose command to use (`docker compose` or `docker-compose`).
# Idempotent; used by tests/tests/compose.rs.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
# shellcheck source=scripts/lib.sh
source "$HERE/../../scripts/lib.sh"
exec 3>&1 1>&2 # progress on stderr; the answer on stdout

PULL_TIMEOUT="${PULL_TIMEOUT:-30}"
DOCKERD_LOG="${DOCKERD_LOG:-/var/log/saga-dockerd.log}"

engine_answers() { docker info >/dev/null 2>&1; }

ensure_engine() {
    local missing=()
    have docker || missing+=(docker.io)
    have dockerd || missing+=(docker.io)
    { docker compose version || have docker-compose; } >/dev/null 2>&1 || missing+=(docker-compose)
    have debootstrap || missing+=(debootstrap)
    if ((${#missing[@]})); then
        log "installing ${missing[*]}"
        as_root apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
    engine_answers && return 0
    log "starting dockerd (log: $DOCKERD_LOG)"
    # The engine outlives this script: in a session of its own (a test
    # runner that kills a timed-out test's process group leaves it be), and
    # holding none of this script's descriptors (a caller reading our
    # output until it closes would otherwise wait for the engine to end).
    as_root setsid dockerd </dev/null >"$DOCKERD_LOG" 2>&1 3>&- &
    if ! WAIT_TIMEOUT=90 wait_for engine_answers; then
        tail -n 30 "$DOCKERD_LOG" >&2 || true
        die "dockerd does not answer after 90 s (the log's last lines above: $DOCKERD_LOG)"
    fi
}

# The authorities this machine trusts beyond Debian's, for builds whose
# package traffic passes a proxy that presents its own.
extra_ca_certs() {
    cat /usr/local/share/ca-certificates/*.crt 2>/dev/null || true
}

present() { docker image inspect "$1" >/dev/null 2>&1; }

pulled() {
    timeout "$PULL_TIMEOUT" docker pull -q "$1" >/dev/null 2>&1
}

# debian:bookworm-slim and debian:bookworm: a minimal Debian 12 from debootstrap.
base() {
    local root
    root="$(mktemp -d)"
    log "building a Debian 12 base with debootstrap (a few minutes)"
    as_root debootstrap --variant=minbase bookworm "$root" http://deb.debian.org/debian >/dev/null
    # As in Debian's own images: no package starts a service, no apt caches.
    printf '#!/bin/sh\nexit 101\n' | as_root tee "$root/usr/sbin/policy-rc.d" >/dev/null
    as_root chmod +x "$root/usr/sbin/policy-rc.d"
    printf 'APT::Install-Recommends "false";\n' | as_root tee "$root/etc/apt/apt.conf.d/docker-norecommends" >/dev/null
    as_root rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    as_root tar -C "$root" -c . | docker import -c 'CMD ["bash"]' - debian:bookworm-slim >/dev/null
    docker tag debian:bookworm-slim debian:bookworm
    as_root rm -rf "$root"
}

# stand_in NAME DIR: builds stand-ins/DIR as NAME.
stand_in() {
    local name="$1" dir="$HERE/stand-ins/$2" context
    context="$dir"
    if [ "$2" = rust ]; then
        # The official image's toolchain, from this machine's rustup.
        local toolchain
        toolchain="$(rustc --print sysroot)"
        context="$(mktemp -d)"
        cp "$dir/Dockerfile" "$context/"
        mkdir "$context/toolchain"
        cp -a "$toolchain/bin" "$toolchain/lib" "$toolchain/libexec" "$toolchain/etc" "$context/toolchain/" 2>/dev/null || true
    fi
    log "building a stand-in for $name ($dir)"
    docker build -q --build-arg EXTRA_CA_CERTS="$(extra_ca_certs)" -t "$name" "$context" >/dev/null
    [ "$context" = "$dir" ] || rm -rf "$context"
}

# ensure NAME DIR: NAME present, pulled, or built from stand-ins/DIR.
ensure() {
    local name="$1" dir="$2"
    present "$name" && return 0
    pulled "$name" && return 0
    case "$dir" in
        base) base ;;
        *) stand_in "$name" "$dir" ;;
    esac
}

# Every image the compose files and the Dockerfile name, but the project's
# own (built from the Dockerfile) and nats-box (the `tools` profile).
named_images() {
    cd "$ROOT"
    {
        sed -n 's/^ *image: *//p' docker-compose.yml docker-compose.cluster.yml
        sed -n 's/^FROM \([^ ]*\).*/\1/p' Dockerfile
    } | grep -v -e '^saga-services:' -e '^natsio/nats-box:' -e '^chef$' -e '^planner$' -e '^builder$' | sort -u
}

ensure_engine
ensure debian:bookworm-slim base
ensure debian:bookworm base
for name in $(named_images); do
    case "$name" in
        debian:*) ensure "$name" base ;;
        postgres:*) ensure "$name" postgres ;;
        redis:*) ensure "$name" redis ;;
        nats:*) ensure "$name" nats ;;
        prom/prometheus:*) ensure "$name" prometheus ;;
        rust:*) ensure "$name" rust ;;
        *) present "$name" || pulled "$name" || die "no stand-in for $name: add one under $HERE/stand-ins" ;;
    esac
done

if docker compose version >/dev/null 2>&1; then
    echo "docker compose" >&3
else
    echo "docker-compose" >&3
fi
