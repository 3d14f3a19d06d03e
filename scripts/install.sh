#!/usr/bin/env bash
# Install what nbdguard and its tests need on Debian: the NBD/QEMU tools, then a venv
# made from the system Python (so libnbd's Python module, python3-libnbd, is importable).
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
PACKAGES=(python3 python3-venv python3-libnbd qemu-utils libnbd-bin nbdkit nbd-client systemd
          nbd-server fio prometheus e2fsprogs python3-yaml openssl strace)
missing=()
for package in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$package")
done
if [ "${#missing[@]}" -gt 0 ]; then
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
fi
if [ ! -x .venv/bin/python ]; then
    /usr/bin/python3 -m venv --system-site-packages .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
echo "nbdguard installed: $(pwd)/.venv/bin/nbdguard"
