#!/usr/bin/env bash
# `make test-diffusers`: the diffusers parity tests in their own venv WITHOUT torchvision.
# diffusers imports torchvision whenever it is installed, and the only torchvision 0.28 wheel
# for Linux x86_64 on PyPI is a CUDA build that cannot import beside the CPU torch, so in the
# main environment (which lpips gives torchvision) the parity test can only skip. Here the
# project is installed without its dependencies, and those it needs except torchvision and
# lpips (which the tested code never imports) are installed from pyproject.toml's own lists.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
VENV=${VENV:-.venv-diffusers}
"$PY" -m venv "$VENV"
VPY="$VENV/bin/python"
PY="$VPY" bash scripts/install.sh --torch-only
mapfile -t deps < <("$VPY" - <<'PYEOF'
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
extras = project["optional-dependencies"]
deps = [d for d in project["dependencies"] if not d.startswith(("torch", "lpips"))]
print("\n".join(deps + extras["cpu"] + extras["diffusers"] + ["pytest>=8"]))
PYEOF
)
"$VPY" -m pip install -q "${deps[@]}"
"$VPY" -m pip install -q --no-deps -e .
if "$VPY" -c 'import torchvision' 2>/dev/null; then
  echo "test-diffusers: torchvision got into $VENV; this environment must not have it" >&2; exit 1
fi
RADIODIFF_DIFFUSERS_REQUIRED=1 "$VPY" -m pytest -q tests/test_diffusers_format.py
