#!/bin/sh
# The image's entrypoint: check that this container's uid can use the mounted images (a bind
# mount keeps the host's owners), say how to fix it if not, then run nbdguard with the
# arguments given; with none, `serve --config "$NBDGUARD_CONFIG"` (the health check reads
# that file too).
set -eu
images="${NBDGUARD_IMAGES:-/var/lib/nbdguard}"
me="$(id -u):$(id -g)"

fail() {
    printf 'nbdguard-entrypoint: %s\n' "$@" >&2
    printf 'nbdguard-entrypoint: %s\n' \
        "fix: run the container as the images' owner (compose: NBDGUARD_UID=\$(id -u) NBDGUARD_GID=\$(id -g) docker compose up)" \
        "  or give them to uid $me (sudo chown -R $me ./images)" >&2
    exit 1
}

if [ ! -d "$images" ]; then
    printf 'nbdguard-entrypoint: %s is not a directory: mount the images there (compose: ./images)\n' \
        "$images" >&2
    exit 1
fi
if [ ! -r "$images" ] || [ ! -x "$images" ]; then
    fail "$images (owner $(stat -c %u:%g "$images"), mode $(stat -c %a "$images")) cannot be read by uid $me"
fi
unreadable="$(find "$images" \( ! -readable -o -type d ! -executable \) -print 2>/dev/null | head -n 5)"
if [ -n "$unreadable" ]; then
    fail "uid $me cannot read:" "$unreadable"
fi
unwritable="$(find "$images" -type f ! -writable -print 2>/dev/null | head -n 5)"
if [ -n "$unwritable" ]; then
    printf 'nbdguard-entrypoint: warning: uid %s cannot write these (serve them with read_only = true, or chown them):\n%s\n' \
        "$me" "$unwritable" >&2
fi
if [ "$#" -eq 0 ]; then
    set -- serve --config "${NBDGUARD_CONFIG:-/etc/nbdguard/nbdguard.toml}"
fi
exec nbdguard "$@"
