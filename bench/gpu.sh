#!/usr/bin/env bash
# The GPU measurements of bench/RESULTS.md in one run (about 10 minutes on an H200): reconstruct
# at batch 32 for every eager path and for the compiled / CUDA-graph paths, encode and decode at
# batch 1 and 64, and training steps at batch 8 (TF32, bf16, bf16 + gradient checkpointing,
# then the strict fp32 baseline). Each part has its own time limit, so one that hangs does not
# take the rest; each limit covers the worst case of its --timeout per child.
# Usage: bench/gpu.sh [OUT_DIR]  (from the repository root; python3, or $PYTHON, with CUDA torch)
set -uo pipefail
out=${1:-bench/measurements}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
py=${PYTHON:-python3}
eager=baseline,auto,channels_last,fused_attention,bf16,fp16
eager+=,bf16+channels_last+fused_attention,fp16+channels_last+fused_attention
compiled=baseline,auto,cuda_graphs+bf16+channels_last
compiled+=,compile+fp16+channels_last+fused_attention
compiled+=,cuda_graphs+fp16+channels_last+fused_attention

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
timeout 200 $py -m bench.model --ops reconstruct --batch 32 --repeats 5 --paths "$eager" \
    --json "$out/model-gpu-b32.json" 2>&1 | tee "$out/model-gpu-b32.txt"
timeout 200 $py -m bench.model --ops reconstruct --batch 32 --repeats 5 --compile \
    --paths "$compiled" \
    --json "$out/model-gpu-b32-compile.json" 2>&1 | tee "$out/model-gpu-b32-compile.txt"
timeout 90 $py -m bench.model --ops encode,decode --batch 1,64 --repeats 5 \
    --paths baseline,auto,bf16+channels_last+fused_attention \
    --json "$out/model-gpu.json" 2>&1 | tee "$out/model-gpu.txt"
timeout 380 $py -m bench.train --phases 1,2 --precisions tf32,bf16,bf16+checkpointing \
    --steps 3 --warmup 1 --timeout 60 \
    --json "$out/train-gpu.json" 2>&1 | tee "$out/train-gpu.txt"
timeout 200 $py -m bench.train --phases 2 --precisions fp32 --steps 2 --warmup 1 --timeout 180 \
    --json "$out/train-gpu-fp32.json" 2>&1 | tee "$out/train-gpu-fp32.txt"
