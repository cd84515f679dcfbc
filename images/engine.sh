# Sourced by images/*.sh: pick a docker client that can build with BuildKit, start dockerd if none runs.
# BuildKit is needed for `RUN --mount=type=secret` (the CA bundle never lands in a layer).
# A docker client >= 23 builds with BuildKit only through the buildx plugin; without it, an older
# client with BuildKit built in (Debian's docker.io 20.10, /usr/bin/docker) does the same job.
pick_client() {
  if [ -n "${DOCKER:-}" ]; then return; fi
  local c
  for c in docker /usr/bin/docker; do
    command -v "$c" >/dev/null 2>&1 || continue
    if "$c" buildx version >/dev/null 2>&1; then DOCKER=$c; return; fi
    case "$("$c" version -f '{{.Client.Version}}' 2>/dev/null)" in
      1[89].*|20.*) DOCKER=$c; return ;;
    esac
  done
  DOCKER=docker
}

ensure_daemon() {
  pick_client
  if ! command -v "$DOCKER" >/dev/null 2>&1; then
    echo "images: no docker client (apt-get install docker.io)" >&2; exit 1
  fi
  if $DOCKER info >/dev/null 2>&1; then return; fi
  command -v dockerd >/dev/null 2>&1 || { echo "images: no docker daemon running and no dockerd to start (apt-get install docker.io)" >&2; exit 1; }
  [ "$(id -u)" = 0 ] || { echo "images: no docker daemon running; start one (dockerd needs root)" >&2; exit 1; }
  echo "images: no docker daemon running; starting one at low priority: nice -n 19 dockerd (log /tmp/dockerd.log)"
  nice -n 19 dockerd > /tmp/dockerd.log 2>&1 &
  for _ in $(seq 60); do $DOCKER info >/dev/null 2>&1 && return; sleep 1; done
  echo "images: dockerd did not come up in 60 s; see /tmp/dockerd.log" >&2; tail -5 /tmp/dockerd.log >&2; exit 1
}
export DOCKER_BUILDKIT=1
