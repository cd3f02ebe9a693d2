"""`python -m train pack --ckpt RUN --out FILE`: a network-only checkpoint for serving and
bundling: the EMA weights (upstream's `ema` layout), the config, the step and the latent
statistics; no raw weights, critic, optimizer or RNG state (about a quarter of the size)."""
from __future__ import annotations

import argparse
from pathlib import Path

from model.autoencoder import check_network_size
from model.checkpoint import (EMA_PREFIX, LATENT_STATS_KEY, CheckpointError, check_finite,
                              model_config_of, read_checkpoint, resolve_checkpoint,
                              save_checkpoint)
from model.manifest import sha256_file

KEPT = ("step", "config", LATENT_STATS_KEY)


def pack(ckpt: str | Path, out: str | Path) -> Path:
    """Write the network-only file `out` from a trainer checkpoint (file or run directory)."""
    path = resolve_checkpoint(ckpt)
    state = read_checkpoint(path)
    ema = state.get("ema")
    weights = {k: v for k, v in ema.items() if k.startswith(EMA_PREFIX)
               and not k.startswith(EMA_PREFIX + "loss.")} if isinstance(ema, dict) else {}
    if not weights or not isinstance(state.get("config"), dict):
        raise CheckpointError(f"{path}: expected a trainer checkpoint with EMA weights and a "
                              "config (written by python -m train)")
    check_network_size(model_config_of(state, path, None))  # what a server would allocate
    check_finite(weights, path)
    payload = {"ema": weights, **{k: state[k] for k in KEPT if k in state},
               "packed_from": {"file": path.name, "sha256": sha256_file(path)}}
    return save_checkpoint(out, payload)


def command(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m train pack", allow_abbrev=False,
                                description="Write a network-only checkpoint (EMA weights, "
                                            "config, step, latent statistics).")
    p.add_argument("--ckpt", required=True, help="a model-N.pt file or a run directory")
    p.add_argument("--out", required=True, help="the file to write")
    args = p.parse_args(argv)
    out = pack(args.ckpt, args.out)
    print(f"wrote {out} ({out.stat().st_size / 2 ** 20:.1f} MiB)")
    return 0
