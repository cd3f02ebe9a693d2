"""The inference runtime: how the network in model/ is run fast on a given machine.

Modules: inference (`prepare_for_inference`: the device's default fast paths, precision and
layout, the fp16 overflow fallback), fast_layers (CPU drop-in layers: Winograd 3x3, matmul 1x1,
fused attention), malloc (glibc malloc tuning). Imports model/; server/ and bench/ import it;
model/ never imports it, and it imports none of train/, export/, server/ (docs/performance.md).
"""
