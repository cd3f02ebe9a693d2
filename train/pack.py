"""`python -m train pack --ckpt RUN --out FILE`: a network-only checkpoint for serving and
bundling: the EMA weights (upstream's `ema` layout), the config, the step and the latent
statistics; no raw weights, critic, optimizer or RNG state (about a quarter of the size)."""
from __future__ import annotations

import argparse
from pathlib import Path

from model.autoencoder import check_network_size
from model.checkpoint import EMA_PREFIX, LATENT_STATS_KEY, CheckpointError, save_checkpoint
from model.loading import choose_weights, read_file

KEPT = ("step", "config", LATENT_STATS_KEY)


def pack(ckpt: str | Path, out: str | Path) -> Path:
    """Write the network-only file `out` from a trainer checkpoint (file or run directory)."""
    file = read_file(ckpt)
    chosen = None if file.source == "upstream" else choose_weights(file)  # the stored config
    if chosen is None or chosen.weights != "ema":
        raise CheckpointError(f"{file.path}: expected a trainer checkpoint with EMA weights and "
                              "a config (written by python -m train)")
    check_network_size(chosen.config)  # what a server would allocate
    weights = {EMA_PREFIX + k: v for k, v in chosen.state.items() if not k.startswith("loss.")}
    payload = {"ema": weights, **{k: file.contents[k] for k in KEPT if k in file.contents},
               "packed_from": {"file": file.path.name, "sha256": file.sha256}}
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
