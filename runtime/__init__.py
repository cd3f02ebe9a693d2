"""The inference runtime: how the network in model/ is run fast on a given machine.

Modules: inference (`prepare_for_inference`: the device's default fast paths, precision and
layout, the fp16 overflow fallback), fast_layers (CPU drop-in layers: Winograd 3x3, matmul 1x1,
fused attention), autotune (measuring the candidate paths), decision (the recorded, shared
per-machine decision every process serves with), machine (the facts a decision depends on),
tiling (overlapping blended tiles), malloc (glibc malloc tuning), openmp (OpenMP's wait
policy). Imports model/; server/, export/ and bench/ import it;
model/ never imports it, and it imports none of train/, export/, server/ (docs/performance.md).
"""
