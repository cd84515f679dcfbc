#!/usr/bin/env bash
# Build the images (`make images`): images/build.sh [trainer] [gate] [mlflow]   (default: all three)
# Environment: IMAGE_REGISTRY, IMAGE_TAG (as components/images.py), BASE_IMAGE (default the
# official python:3.11.9-slim-bookworm; when it is neither present nor pullable, the debootstrap
# base from `make base-image` is used and the build says so), TORCH_VERSION (default: the lock's),
# TORCH_INDEX_URL (an extra index for torch, e.g. a CPU-only one; default none).
# pip inside the build reaches the index the host's pip uses: its CA bundle (PIP_CERT or pip's
# `cert` setting) goes in as the BuildKit secret pip_cert (never a layer) and its index URL
# (PIP_INDEX_URL or pip's `index-url`, if any) as a build argument of the build stage only.
# Builds run with the host network (no traffic beyond what pip on the host does).
set -euo pipefail
cd "$(dirname "$0")/.."
. images/engine.sh
ensure_daemon

REGISTRY=${IMAGE_REGISTRY:-ghcr.io/backdoor-gate}
TAG=${IMAGE_TAG:-$(sed -n 's/^__version__ = "\(.*\)"/\1/p' detector/__init__.py)}
OFFICIAL_BASE=python:3.11.9-slim-bookworm
LOCAL_BASE=backdoor-gate/debian-python:3.11-bookworm
TORCH_VERSION=${TORCH_VERSION:-$(sed -n 's/^torch==//p' requirements.lock)}
names=("$@"); [ ${#names[@]} -gt 0 ] || names=(trainer gate mlflow)

if [ -z "${BASE_IMAGE:-}" ]; then
  if $DOCKER image inspect "$OFFICIAL_BASE" >/dev/null 2>&1 \
     || timeout 60 $DOCKER pull -q "$OFFICIAL_BASE" >/dev/null 2>&1; then
    BASE_IMAGE=$OFFICIAL_BASE
  elif $DOCKER image inspect "$LOCAL_BASE" >/dev/null 2>&1; then
    BASE_IMAGE=$LOCAL_BASE
    echo "images: $OFFICIAL_BASE cannot be pulled here; using the debootstrap base $LOCAL_BASE"
  else
    echo "images: no base image: $OFFICIAL_BASE cannot be pulled (no registry reachable?) and" >&2
    echo "  $LOCAL_BASE does not exist. Build it first: make base-image (debootstrap, ~2 min)," >&2
    echo "  or name another Debian 12 + Python 3.11 image with BASE_IMAGE=..." >&2
    exit 1
  fi
elif ! $DOCKER image inspect "$BASE_IMAGE" >/dev/null 2>&1 && ! timeout 60 $DOCKER pull -q "$BASE_IMAGE" >/dev/null 2>&1; then
  echo "images: BASE_IMAGE=$BASE_IMAGE is neither present nor pullable" >&2; exit 1
fi

cert=${PIP_CERT:-$(python3 -m pip config get global.cert 2>/dev/null || true)}
index=${PIP_INDEX_URL:-$(python3 -m pip config get global.index-url 2>/dev/null || true)}
args=(--network host --build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "VERSION=$TAG"
      --build-arg "TORCH_VERSION=$TORCH_VERSION" --build-arg "TORCH_INDEX_URL=${TORCH_INDEX_URL:-}")
if [ -n "$cert" ] && [ -f "$cert" ]; then args+=(--secret "id=pip_cert,src=$cert"); fi
case "$index" in http://*|https://*) args+=(--build-arg "PIP_INDEX_URL=$index") ;; esac

for name in "${names[@]}"; do
  [ -f "images/$name.Dockerfile" ] || { echo "images: no images/$name.Dockerfile" >&2; exit 1; }
  image=$REGISTRY/$name:$TAG
  echo "images: building $image from images/$name.Dockerfile on $BASE_IMAGE (log: /tmp/backdoor-gate-build-$name.log)"
  old=$($DOCKER image inspect -f '{{.Id}}' "$image" 2>/dev/null || true)
  start=$(date +%s)
  if ! $DOCKER build --progress plain -f "images/$name.Dockerfile" "${args[@]}" -t "$image" . \
       > "/tmp/backdoor-gate-build-$name.log" 2>&1; then
    tail -30 "/tmp/backdoor-gate-build-$name.log" >&2; echo "images: $name failed" >&2; exit 1
  fi
  size=$($DOCKER image inspect -f '{{.Size}}' "$image" | awk '{printf "%.2f GB", $1/1e9}')
  echo "images: $image built in $(( $(date +%s) - start )) s, $size"
  # the image this tag replaced is GBs of disk: remove it unless something still uses it
  if [ -n "$old" ] && [ "$old" != "$($DOCKER image inspect -f '{{.Id}}' "$image")" ]; then
    $DOCKER image rm "$old" >/dev/null 2>&1 || true
  fi
done
