#!/usr/bin/env bash
# Build the deployment images (docs/deploy.md, "Building the images"):
#
#   bash scripts/docker-build.sh cpu            # radiodiff-vae:cpu   (Dockerfile, VARIANT=cpu)
#   bash scripts/docker-build.sh gpu            # radiodiff-vae:gpu   (Dockerfile, VARIANT=gpu)
#   bash scripts/docker-build.sh nginx          # radiodiff-nginx     (deploy/nginx.Dockerfile)
#   bash scripts/docker-build.sh cpu nginx      # several, in order
#
# What it decides, so that the same command works on a laptop and on a closed network:
# - Bases: the Dockerfiles' defaults (python:3.11-slim-bookworm, nvidia/cuda:13.0.2-cudnn-
#   runtime-ubuntu24.04, debian:bookworm-slim) where Docker Hub is reachable; where it is not,
#   local stand-ins made from Debian's own archive with debootstrap (the mirror apt uses here):
#   radiodiff-local/debian:bookworm (minbase) and radiodiff-local/python:3.11-bookworm (+ Debian's
#   python3 3.11). RADIODIFF_LOCAL_BASE=1 or 0 forces the choice.
# - CPU torch: PyTorch's CPU index where it is reachable (the Dockerfile's default); else the CPU
#   wheel this machine's pip resolves (e.g. its find-links folder) is put in deploy/wheels/. The
#   build itself refuses a CUDA torch in the CPU image.
# - BuildKit: `docker buildx` where installed, else a Docker CLI older than 23 with
#   DOCKER_BUILDKIT=1 (newer CLIs need buildx for BuildKit). `--network host` where the engine
#   has no bridge network (dockerd --bridge=none).
# Environment: IMAGE (default radiodiff-vae), NGINX_IMAGE (default radiodiff-nginx),
# BUILD_FLAGS (extra `docker build` flags, e.g. --no-cache). Prints one line per image:
# `built NAME in S s, SIZE MB`.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
IMAGE=${IMAGE:-radiodiff-vae}
NGINX_IMAGE=${NGINX_IMAGE:-radiodiff-nginx}
LOCAL_DEBIAN=radiodiff-local/debian:bookworm
LOCAL_PYTHON=radiodiff-local/python:3.11-bookworm
fail() { printf 'docker-build: %s\n' "$*" >&2; exit 1; }
[ $# -gt 0 ] || set -- cpu
for target in "$@"; do
  case $target in cpu|gpu|nginx) ;; *) fail "unknown image $target (expected cpu, gpu, nginx)" ;; esac
done
command -v docker >/dev/null || fail "no docker CLI: apt-get install docker.io (or see docs/deploy.md)"
docker info >/dev/null 2>&1 || fail "the Docker engine does not answer (docker info): start dockerd"

dockerfile_arg() {  # the default of an ARG in a Dockerfile
  sed -n "s/^ARG $2=//p" "$1" | head -n1
}

# ---- BuildKit
BUILD=()
if docker buildx version >/dev/null 2>&1; then
  BUILD=(docker buildx build --load)
else
  for cli in $(type -ap docker); do
    version=$("$cli" version --format '{{.Client.Version}}' 2>/dev/null || true)
    if [ -n "$version" ] && [ "${version%%.*}" -lt 23 ]; then
      BUILD=(env DOCKER_BUILDKIT=1 "$cli" build)
      break
    fi
  done
fi
[ ${#BUILD[@]} -gt 0 ] || fail "no BuildKit builder: install the buildx plugin (docker-buildx)"
NETWORK=()
docker network inspect bridge >/dev/null 2>&1 || NETWORK=(--network host)
# The CA bundle pip trusts here (a network whose proxy re-signs TLS has its own CA): the
# builder's pip gets it as a build secret, never stored in the image.
SECRETS=()
pip_cert=${PIP_CERT:-$(python3 -m pip config list 2>/dev/null | sed -n "s/^[^=]*\.cert='\(.*\)'$/\1/p" | head -n1)}
[ -n "$pip_cert" ] && [ -s "$pip_cert" ] && SECRETS=(--secret "id=pip_cert,src=$pip_cert")

# ---- bases
registry_reachable() {  # Docker Hub's registry answers (401 without a token is an answer)
  python3 - <<'EOF' 2>/dev/null
import urllib.error, urllib.request
try:
    urllib.request.urlopen("https://registry-1.docker.io/v2/", timeout=5)
except urllib.error.HTTPError:
    pass
EOF
}

debian_mirror() {  # "MIRROR SECURITY_MIRROR" from apt's sources (deb822 or one-line format)
  python3 - /etc/apt/sources.list /etc/apt/sources.list.d/* <<'EOF'
import re, sys
main = security = None
for path in sys.argv[1:]:
    try:
        text = open(path).read()
    except OSError:
        continue
    entries = []
    for stanza in re.split(r"\n\s*\n", text):  # deb822: URIs / Suites fields
        fields = dict(re.findall(r"^(URIs|Suites):\s*(.+)$", stanza, re.M))
        if "URIs" in fields and "Suites" in fields:
            entries += [(u, s) for u in fields["URIs"].split() for s in fields["Suites"].split()]
    for line in text.splitlines():  # one-line: deb [options] URI SUITE COMPONENTS
        m = re.match(r"\s*deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)", line)
        if m:
            entries.append(m.groups())
    for uri, suite in entries:
        if suite == "bookworm" and main is None:
            main = uri
        elif suite == "bookworm-security" and security is None:
            security = uri
if main is None:
    sys.exit("no Debian bookworm mirror in apt's sources: set DEBIAN_MIRROR")
print(main, security or "")
EOF
}

make_local_bases() {
  if ! docker image inspect "$LOCAL_DEBIAN" >/dev/null 2>&1; then
    command -v debootstrap >/dev/null || fail "no registry and no debootstrap: apt-get install debootstrap"
    local mirrors mirror security rootfs start
    mirrors=$(debian_mirror) || fail "cannot find the Debian mirror"
    read -r mirror security <<<"$mirrors"
    mirror=${DEBIAN_MIRROR:-$mirror}
    rootfs=$(mktemp -d /tmp/radiodiff-rootfs.XXXXXX)
    start=$(date +%s)
    echo "local base: debootstrap --variant=minbase bookworm from $mirror"
    debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$rootfs.log" 2>&1 \
      || { tail -n 20 "$rootfs.log"; rm -rf "$rootfs"; fail "debootstrap failed"; }
    {
      echo "deb $mirror bookworm main"
      echo "deb $mirror bookworm-updates main"
      [ -z "$security" ] || echo "deb $security bookworm-security main"
    } >"$rootfs/etc/apt/sources.list"
    # as Docker's official Debian images: apt keeps no package lists or caches in layers
    cat >"$rootfs/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | docker import - "$LOCAL_DEBIAN" >/dev/null
    rm -rf "$rootfs" "$rootfs.log"
    echo "built $LOCAL_DEBIAN in $(($(date +%s) - start)) s (debootstrap + import)"
  fi
  if ! docker image inspect "$LOCAL_PYTHON" >/dev/null 2>&1; then
    # a stand-in for python:3.11-slim-bookworm: Debian's own Python 3.11, venv and CA roots
    "${BUILD[@]}" "${NETWORK[@]}" -t "$LOCAL_PYTHON" - <<EOF
FROM $LOCAL_DEBIAN
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*
EOF
  fi
}

BASE_ARGS=() NGINX_BASE_ARGS=()
use_local=${RADIODIFF_LOCAL_BASE:-}
if [ -z "$use_local" ]; then
  if registry_reachable; then use_local=0; else use_local=1; fi
fi
if [ "$use_local" = 1 ]; then
  echo "bases: no image registry reachable here: local stand-ins built from Debian's archive"
  make_local_bases
  BASE_ARGS=(--build-arg "CPU_BASE=$LOCAL_PYTHON" --build-arg "GPU_BASE=$LOCAL_PYTHON")
  NGINX_BASE_ARGS=(--build-arg "BASE=$LOCAL_DEBIAN")
fi

# ---- the CPU torch
TORCH_ARGS=()
cpu_torch() {  # sets TORCH_ARGS
  local index torch out wheel platforms=()
  index=$(dockerfile_arg Dockerfile TORCH_CPU_INDEX)
  torch="torch==$(dockerfile_arg Dockerfile TORCH_VERSION)"
  rm -f deploy/wheels/*.whl
  if TORCH_CPU_INDEX=$index bash scripts/install.sh --dry-run --torch-only | tail -n1 \
      | grep -q -- "--extra-index-url"; then
    echo "torch (CPU image): the CPU build from $index"
    TORCH_ARGS=()
    return
  fi
  # The image's Python is 3.11 (python:3.11-slim, or Debian bookworm's), its glibc 2.36.
  for n in $(seq 17 36); do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
  out=$(python3 -m pip download -q --no-deps --only-binary=:all: --implementation cp \
        --python-version 3.11 "${platforms[@]}" -d deploy/wheels "$torch" 2>&1) \
    || fail "cannot get a $torch wheel for the CPU image: $out"
  wheel=$(basename deploy/wheels/torch-*.whl)
  case $wheel in
    *+cpu*) echo "torch (CPU image): $index is not reachable; the CPU wheel pip resolves" \
                 "here, $wheel, goes in deploy/wheels/" ;;
    *) rm -f deploy/wheels/*.whl
       fail "$index is not reachable and pip resolves $wheel here, not a CPU build: put" \
            "a torch CPU wheel (cp311, manylinux x86_64) in a pip find-links folder" ;;
  esac
  TORCH_ARGS=(--build-arg TORCH_CPU_INDEX=)
}

build() {  # NAME DOCKERFILE CONTEXT ARGS...; CONTEXT "-": the Dockerfile alone, no context
  local name=$1 file=$2 context=$3 start size
  shift 3
  start=$(date +%s)
  if [ "$context" = - ]; then
    # shellcheck disable=SC2086  # BUILD_FLAGS is a list of flags
    "${BUILD[@]}" "${NETWORK[@]}" ${BUILD_FLAGS:-} -t "$name" "$@" - <"$file" \
      || fail "docker build of $name failed"
  else
    # shellcheck disable=SC2086
    "${BUILD[@]}" "${NETWORK[@]}" ${BUILD_FLAGS:-} -f "$file" -t "$name" "$@" "$context" \
      || fail "docker build of $name failed"
  fi
  size=$(docker image inspect -f '{{.Size}}' "$name")
  echo "built $name in $(($(date +%s) - start)) s, $((size / 1000000)) MB"
}

for target in "$@"; do
  case $target in
    cpu) cpu_torch
         build "$IMAGE:cpu" Dockerfile . "${BASE_ARGS[@]}" "${TORCH_ARGS[@]}" "${SECRETS[@]}" \
           --build-arg VARIANT=cpu ;;
    gpu) rm -f deploy/wheels/*.whl  # the GPU image's torch comes from the package index
         build "$IMAGE:gpu" Dockerfile . "${BASE_ARGS[@]}" "${SECRETS[@]}" \
           --build-arg VARIANT=gpu ;;
    nginx) build "$NGINX_IMAGE" deploy/nginx.Dockerfile - "${NGINX_BASE_ARGS[@]}" ;;
  esac
done
