#!/usr/bin/env bash
# The GPU measurements of bench/RESULTS.md in one run (about 5 minutes on an H200): training
# steps at batch 8, reconstruct at batch 32 for the default and the compiled / CUDA-graph paths,
# encode and decode at batch 1 and 64.
# Usage: bench/gpu.sh [OUT_DIR]  (from the repository root; python3, or $PYTHON, with CUDA torch)
set -uo pipefail
out=${1:-bench/measurements}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
py=${PYTHON:-python3}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
timeout 150 $py -m bench.train --steps 3 --warmup 1 --timeout 60 \
    --json "$out/train-gpu.json" 2>&1 | tee "$out/train-gpu.txt"
timeout 150 $py -m bench.model --ops reconstruct --batch 32 --repeats 5 --compile \
    --paths baseline,default,fp16,compile+fp16+channels_last+fused_attention,cuda_graphs+fp16+channels_last+fused_attention \
    --json "$out/model-gpu-b32-compile.json" 2>&1 | tee "$out/model-gpu-b32-compile.txt"
timeout 90 $py -m bench.model --ops encode,decode --batch 1,64 --repeats 5 \
    --paths baseline,default \
    --json "$out/model-gpu.json" 2>&1 | tee "$out/model-gpu.txt"
