#!/usr/bin/env bash
# The kumazone lab with Docker Compose (lab/docker-compose.yml), Compose v2
# (`docker compose`) or Debian's Compose v1 (`docker-compose`), whichever is there.
#
#   lab/docker/lab-docker.sh up            wheels, image, containers; until both zones are synced
#   lab/docker/lab-docker.sh down          containers, network, volumes, dangling lab images
#   lab/docker/lab-docker.sh wait-synced [SECONDS]
#   lab/docker/lab-docker.sh status        every control plane side by side
#   lab/docker/lab-docker.sh compose ARGS  the lab's compose command (project, file) with ARGS
#
# The image is built once, by `docker build` (not by Compose), from a context that
# holds only lab/Dockerfile, the wheels and the lab's two helper scripts: no
# checkout, virtualenv or key reaches the daemon, with BuildKit or the classic
# builder.  The wheels (kumazone's, built from a copy of the sources, and its
# dependencies') are made on the host; the image installs from them only.  The
# dependencies' wheels are cached under LAB_CACHE/wheels, so a second run needs no
# network; with a base image that has Python 3.11, venv, dig and dnsmasq (make it
# with lab/docker/base-image.sh) and LAB_BUILD_NETWORK=none, neither does the build.
#
# Environment: BIN (the virtualenv's bin, for pip; default .venv/bin), LAB_STATE
# (default lab/state; the build context goes to LAB_STATE/docker), LAB_BASE_IMAGE
# (default python:3.11-slim-bookworm), LAB_IMAGE (kumazone-lab:latest), LAB_PROJECT
# (the Compose project, kumazone-lab), LAB_BUILD_NETWORK (default: Docker's),
# LAB_CACHE (/var/cache/kumazone-lab), COMPOSE (the compose command, found if unset).
set -Eeuo pipefail

HERE=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
LAB=$(dirname -- "$HERE")
REPO=$(dirname -- "$LAB")
BIN=$(realpath -m -- "${BIN:-.venv/bin}")
STATE=$(realpath -m -- "${LAB_STATE:-lab/state}")
BASE_IMAGE=${LAB_BASE_IMAGE:-python:3.11-slim-bookworm}
IMAGE=${LAB_IMAGE:-kumazone-lab:latest}
PROJECT=${LAB_PROJECT:-kumazone-lab}
BUILD_NETWORK=${LAB_BUILD_NETWORK:-}
CACHE=${LAB_CACHE:-/var/cache/kumazone-lab}
LABEL=org.kumazone.lab
export LAB_IMAGE=$IMAGE

say() { printf 'lab: %s\n' "$*"; }
die() {
  printf 'lab: error: %s\n' "$*" >&2
  exit 1
}

find_compose() {
  if [[ -n ${COMPOSE:-} ]]; then
    echo "$COMPOSE"
  elif docker compose version >/dev/null 2>&1; then
    echo "docker compose"
  elif command -v docker-compose >/dev/null 2>&1; then
    echo docker-compose
  else
    return 1
  fi
}

need_docker() {
  command -v docker >/dev/null || die "docker not found: install Docker (Debian: apt-get install docker.io)"
  docker info >/dev/null 2>&1 || die "no Docker engine answers (is dockerd running? docker info says: $(docker info 2>&1 | tail -n 1))"
  COMPOSE_COMMAND=$(find_compose) ||
    die "neither 'docker compose' (v2) nor 'docker-compose' (v1; Debian: apt-get install docker-compose) found"
}

# The lab's compose command: the project name is given here, not in the file
# (Compose v1 refuses a top-level name:).
compose() {
  # shellcheck disable=SC2086  # COMPOSE_COMMAND is "docker compose" or "docker-compose"
  $COMPOSE_COMMAND -p "$PROJECT" -f "$LAB/docker-compose.yml" "$@"
}

build_wheels() {
  local out=$1 source=$STATE/docker/src wheels=$CACHE/wheels log=$STATE/docker/pip.log
  [[ -x $BIN/python ]] || die "$BIN/python not found (make builds .venv; or give BIN=...)"
  rm -rf "$source" "$out"
  mkdir -p "$source" "$out" "$wheels"
  # The sources alone, as a wheel needs them: no virtualenv, no state, no keys.
  # setup.py builds the hot path's C loop into the wheel (a build in place, *.so, is left out).
  tar -C "$REPO" --exclude=__pycache__ --exclude='*.pyc' --exclude=dropin.cache --exclude='*.so' \
    -cf - setup.cfg setup.py pyproject.toml README.md kumazone twisted | tar -C "$source" -xf -
  local offline=("$BIN/python" -m pip wheel -q --no-index --find-links "$wheels" --wheel-dir "$out" "$source")
  if ! "${offline[@]}" >"$log" 2>&1; then
    say "fetching the wheels of kumazone's dependencies into $wheels (once; then offline)"
    "$BIN/python" -m pip download -q --only-binary=:all: --dest "$wheels" "setuptools>=68" wheel >>"$log" 2>&1 ||
      { tail -n 20 "$log" >&2; die "pip download failed (log: $log)"; }
    "$BIN/python" -m pip wheel -q --find-links "$wheels" --wheel-dir "$wheels" "$source" >>"$log" 2>&1 ||
      { tail -n 20 "$log" >&2; die "pip wheel failed (log: $log)"; }
    rm -f "$wheels"/kumazone-*.whl
    "${offline[@]}" >>"$log" 2>&1 || { tail -n 20 "$log" >&2; die "pip wheel failed (log: $log)"; }
  fi
  rm -rf "$source"
  say "wheels: $(find "$out" -name '*.whl' | wc -l) in $out (kumazone's and its dependencies')"
}

build_image() {
  local context=$STATE/docker/context
  build_wheels "$context/wheels"
  cp "$LAB/Dockerfile" "$LAB/labctl.py" "$HERE/labwait.py" "$context/"
  local network=()
  [[ -n $BUILD_NETWORK ]] && network=(--network="$BUILD_NETWORK")
  say "building $IMAGE from $BASE_IMAGE (context: $context, $(du -sh "$context" | cut -f1))"
  if ! DOCKER_BUILDKIT=0 docker build -q "${network[@]}" --build-arg BASE_IMAGE="$BASE_IMAGE" \
    --label "$LABEL=1" -t "$IMAGE" "$context" >"$STATE/docker/build.log" 2>&1; then
    tail -n 30 "$STATE/docker/build.log" >&2
    die "docker build failed (log: $STATE/docker/build.log)"
  fi
  prune_images
}

# An image rebuilt under the same tag leaves the old one dangling: remove the lab's.
prune_images() {
  docker image prune -f --filter "label=$LABEL=1" >/dev/null
}

wait_synced() {
  local timeout=${1:-60}
  compose exec -T zone-1 python3 /opt/kumazone-lab/labwait.py --timeout "$timeout"
}

up() {
  need_docker
  mkdir -p "$STATE/docker"
  if [[ -n $(compose ps -q 2>/dev/null) ]]; then
    die "the Docker lab (project $PROJECT) is up already: make lab-docker-down first"
  fi
  build_image
  say "starting the lab ($COMPOSE_COMMAND, project $PROJECT)"
  if ! compose up -d >"$STATE/docker/up.log" 2>&1; then
    cat "$STATE/docker/up.log" >&2
    compose logs --tail=20 >&2 || true
    compose down --volumes --remove-orphans >/dev/null 2>&1 || true
    die "$COMPOSE_COMMAND up failed"
  fi
  if ! wait_synced 60; then
    compose logs --tail=20 global zone-1 zone-2 >&2 || true
    die "the zones did not sync with the global (the lab is left up: make lab-docker-down)"
  fi
  say "up. Try: $COMPOSE_COMMAND -p $PROJECT -f lab/docker-compose.yml exec client-1 dig web.mesh"
}

down() {
  need_docker
  compose down --volumes --remove-orphans --timeout 10 2>&1 | sed 's/^/lab: /'
  prune_images
  say "down"
}

case ${1:-} in
up) up ;;
down) down ;;
wait-synced)
  need_docker
  wait_synced "${2:-60}"
  ;;
status)
  need_docker
  compose exec -T zone-1 python3 /opt/kumazone-lab/labwait.py --status
  ;;
compose)
  need_docker
  shift
  compose "$@"
  ;;
*)
  sed -n '2,30p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
  exit 2
  ;;
esac
