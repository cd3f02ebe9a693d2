"""The inference runtime: how the network in model/ is run fast on a given machine, and how
the project's processes are set up.

Modules: inference (`prepare_for_inference`: the fast paths a caller names, precision and
layout, the fp16 overflow fallback), fast_layers (CPU drop-in layers: Winograd 3x3, matmul 1x1),
autotune (measuring the candidate paths), decision (`choose`: the one
entry that picks a path, recorded and shared per machine, which every process serves with),
machine (the facts a decision depends on),
tiling (overlapping blended tiles), malloc (glibc malloc tuning), openmp (OpenMP's wait
policy), distributed (torch.distributed set-up), progress (progress and the shared log-line
format), arguments (argparse types the commands share). Imports model/ only; every layer above
uses it (tests/test_layering.py, docs/performance.md).
"""
