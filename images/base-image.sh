#!/usr/bin/env bash
# Build a Debian 12 (bookworm) + Python 3.11 base image with debootstrap, for machines that
# cannot pull python:3.11.9-slim-bookworm from a registry. `make base-image` runs this; the
# result is then used by `make images` (images/build.sh) when the official base is missing.
#   usage: images/base-image.sh [IMAGE_NAME]        (root, a running docker daemon)
# The Debian mirror is the one apt on this host uses (or DEBIAN_MIRROR if set).
set -euo pipefail
NAME=${1:-backdoor-gate/debian-python:3.11-bookworm}
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=images/engine.sh
. "$here/engine.sh"
ensure_daemon

if [ -z "${DEBIAN_MIRROR:-}" ]; then
  DEBIAN_MIRROR=$(grep -hE '^(URIs:|deb )' /etc/apt/sources.list /etc/apt/sources.list.d/* 2>/dev/null \
    | grep -v -- '-security' | sed -E 's/^URIs:[[:space:]]*//; s/^deb[[:space:]]+(\[[^]]*\][[:space:]]+)?//' \
    | awk '{print $1}' | head -n1 || true)
fi
[ -n "$DEBIAN_MIRROR" ] || { echo "base-image: no Debian mirror found in apt's sources; set DEBIAN_MIRROR" >&2; exit 1; }
command -v debootstrap >/dev/null || { echo "base-image: debootstrap missing (apt-get install debootstrap)" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "base-image: debootstrap needs root" >&2; exit 1; }

rootfs=$(mktemp -d /tmp/backdoor-gate-rootfs.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT
echo "base-image: debootstrap bookworm from $DEBIAN_MIRROR (about 2 min)"
start=$(date +%s)
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" "$DEBIAN_MIRROR" \
  > /tmp/backdoor-gate-debootstrap.log 2>&1 || { tail -20 /tmp/backdoor-gate-debootstrap.log; exit 1; }
# No apt lists, caches or docs in the base: they are not needed at run time.
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/* "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/*
tar -C "$rootfs" -c . | $DOCKER import \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["python3"]' \
  --message "debootstrap bookworm minbase + python3 from $DEBIAN_MIRROR" - "$NAME" >/dev/null
echo "base-image: $NAME built in $(( $(date +%s) - start )) s ($($DOCKER image inspect -f '{{.Size}}' "$NAME" | awk '{printf "%.0f MB", $1/1e6}'))"
