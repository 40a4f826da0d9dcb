#!/bin/sh
# The official nats image's contract: options alone are nats-server's.
set -e
if [ "${1#-}" != "$1" ]; then
    set -- nats-server "$@"
fi
exec "$@"
