#!/bin/sh
# The official redis image's contract: options alone, or a .conf file, are
# redis-server's; it runs as the redis user.
set -e
if [ "${1#-}" != "$1" ] || [ "${1%.conf}" != "$1" ]; then
    set -- redis-server "$@"
fi
if [ "$1" = redis-server ] && [ "$(id -u)" = 0 ]; then
    exec runuser -u redis -- "$@"
fi
exec "$@"
