#!/usr/bin/env bash
# `make test-docker`: the images built and run with a real Docker engine (docs/deploy.md,
# "Docker tests"), from a clean machine:
#
#   bash scripts/test-docker.sh          # all of tests/docker (-m docker)
#   bash scripts/test-docker.sh --ci     # CI's part (-m "docker and smoke"): build, compose up,
#                                        # one request through nginx, docker kill of a replica
#   DOCKER_GPU=1 bash scripts/test-docker.sh   # also builds the GPU image and checks its content
#
# 1. scripts/docker-engine.sh start: an engine (installs docker.io, debootstrap and
#    docker-compose and starts dockerd when root and missing; otherwise skips, saying why).
# 2. scripts/docker-build.sh cpu nginx [gpu]: the images (cached layers make a rebuild quick).
# 3. pytest on tests/docker; then the dockerd that step 1 started, if any, is stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
marker=docker
targets=(cpu nginx)
for arg in "$@"; do
  case $arg in
    --ci) marker="docker and smoke" ;;
    *) echo "test-docker.sh: unknown option $arg (expected --ci)" >&2; exit 2 ;;
  esac
done
[ -z "${DOCKER_GPU:-}" ] || targets+=(gpu)
status=0
bash scripts/docker-engine.sh start || status=$?
[ $status = 3 ] && exit 0  # skipped; the reason is printed
[ $status = 0 ] || exit $status
trap 'bash scripts/docker-engine.sh stop' EXIT
bash scripts/docker-build.sh "${targets[@]}"
OMP_NUM_THREADS=1 "$PY" -m pytest -q -m "$marker" tests/docker
