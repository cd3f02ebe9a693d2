#!/usr/bin/env bash
# `make install`: torch, then the project with EXTRAS. On a CPU machine torch (and torchvision,
# which lpips pulls) come as CPU builds from the PyTorch CPU index when that index is
# reachable; otherwise from pip's configured index, saying what that means. `--gpu`: pip's
# default resolution (the CUDA build on Linux x86_64). `--torch-only`: torch alone.
# `--dry-run`: print the pip commands only.
# Environment: PY (python, default python3), TORCH (requirement, default torch==2.13.0),
# EXTRAS (default cpu,dev), TORCH_CPU_INDEX (default https://download.pytorch.org/whl/cpu).
set -euo pipefail
PY=${PY:-python3}
TORCH=${TORCH:-torch==2.13.0}
EXTRAS=${EXTRAS:-cpu,dev}
CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
gpu=0 dry=0 torch_only=0
for arg in "$@"; do
  case $arg in
    --gpu) gpu=1 ;;
    --dry-run) dry=1 ;;
    --torch-only) torch_only=1 ;;
    *) echo "install.sh: unknown option $arg (expected --gpu, --torch-only, --dry-run)" >&2; exit 2 ;;
  esac
done
reachable() {  # the index answers within 5 s (a closed network fails at once or times out)
  "$PY" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1].rstrip("/") + "/torch/", timeout=5)' "$1" 2>/dev/null
}
index=()
if [ $gpu = 1 ]; then
  echo "torch: $TORCH as pip resolves it (the CUDA build on Linux x86_64)"
elif reachable "$CPU_INDEX"; then
  # --extra-index-url: torch's dependencies still come from the usual index; the CPU index's
  # 2.13.0+cpu outranks PyPI's 2.13.0 (a local version label sorts higher)
  index=(--extra-index-url "$CPU_INDEX")
  echo "torch: the CPU build, from $CPU_INDEX"
else
  echo "torch: the PyTorch CPU index ($CPU_INDEX) is not reachable from here, so pip takes" \
       "$TORCH from its configured index and wheel folders. A local CPU wheel (pip's" \
       "find-links) is used when present; from PyPI alone on Linux x86_64 it is the CUDA" \
       "build (about 2.5 GB more, 16 nvidia packages), which runs on CPU too."
fi
torch_cmd=("$PY" -m pip install -q "$TORCH" "${index[@]}")
project_cmd=("$PY" -m pip install -q -e ".[$EXTRAS]" "${index[@]}")
[ $torch_only = 1 ] && project_cmd=(true)
if [ $dry = 1 ]; then printf '%s\n' "${torch_cmd[*]}" "${project_cmd[*]}"; exit 0; fi
"${torch_cmd[@]}"
"${project_cmd[@]}"
"$PY" -c 'import torch; print(f"torch {torch.__version__}:", "CUDA build" if torch.version.cuda else "CPU build")'
