#!/usr/bin/env bash
# Install nbdguard as a systemd service on Debian 12, from a clone, as root:
#   /opt/nbdguard            a venv holding nbdguard (never pip into Debian's Python: PEP 668)
#   user and group nbdguard  the service's (members of the group may use the Unix socket)
#   /etc/systemd/system/     nbdguard.service and nbdguard.socket
#   /etc/nbdguard/nbdguard.toml     from deploy/systemd/nbdguard.toml, kept if it exists
#   /var/lib/nbdguard/scratch.raw   a sparse 1 GiB image, made with a new config only
# then checks the config as the service user would. Run it again to upgrade. Afterwards:
#   systemctl enable --now nbdguard.socket nbdguard.service
# With DESTDIR=DIR only the files are staged under DIR (no packages, user, venv, ownership or
# systemctl): the tests verify the units against that tree.
set -euo pipefail
cd "$(dirname "$0")/.."
PREFIX=/opt/nbdguard
UNITS=/etc/systemd/system
DESTDIR="${DESTDIR:-}"
SCRATCH_SIZE=1G

stage_only() { [ -n "$DESTDIR" ]; }

install_system_parts() {
    if [ "$(id -u)" -ne 0 ]; then
        echo "install-system.sh: run it as root (sudo $0)" >&2
        exit 1
    fi
    missing=()
    for package in python3 python3-venv; do
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$package")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${missing[@]}" >/dev/null
    fi
    getent passwd nbdguard >/dev/null || useradd --system --user-group \
        --home-dir /var/lib/nbdguard --no-create-home --shell /usr/sbin/nologin nbdguard
    [ -x "$PREFIX/bin/python" ] || /usr/bin/python3 -m venv "$PREFIX"
    "$PREFIX/bin/python" -m pip install -q --upgrade pip
    "$PREFIX/bin/python" -m pip install -q --upgrade .
}

install_files() {
    local root="$DESTDIR" config="$DESTDIR/etc/nbdguard/nbdguard.toml"
    install -D -m 0644 README.md "$root$PREFIX/share/doc/nbdguard/README.md"
    install -d -m 0755 "$root$UNITS"
    install -m 0644 deploy/systemd/nbdguard.service deploy/systemd/nbdguard.socket "$root$UNITS"
    install -d -m 0750 "$root/etc/nbdguard" "$root/var/lib/nbdguard"
    if [ ! -e "$config" ]; then
        install -m 0640 deploy/systemd/nbdguard.toml "$config"
        if [ ! -e "$root/var/lib/nbdguard/scratch.raw" ]; then
            install -m 0600 /dev/null "$root/var/lib/nbdguard/scratch.raw"
            truncate -s "$SCRATCH_SIZE" "$root/var/lib/nbdguard/scratch.raw"
        fi
    fi
    if ! stage_only; then
        chgrp nbdguard /etc/nbdguard "$config"
        chown nbdguard:nbdguard /var/lib/nbdguard
        [ ! -e /var/lib/nbdguard/scratch.raw ] || chown nbdguard:nbdguard /var/lib/nbdguard/scratch.raw
    fi
}

stage_only || install_system_parts
install_files
stage_only && exit 0
if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
runuser -u nbdguard -- "$PREFIX/bin/nbdguard" check-config /etc/nbdguard/nbdguard.toml
echo "nbdguard installed in $PREFIX; start it with:"
echo "  systemctl enable --now nbdguard.socket nbdguard.service"
