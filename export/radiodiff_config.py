"""`python -m export radiodiff-config --ckpt X [--out FILE]`: the first-stage block of upstream
RadioDiff's `configs/radio_train.yaml` for a checkpoint of this project.

RadioDiff's latent diffusion model builds its AutoencoderKL from `model.first_stage` and loads
`first_stage.ckpt_path` with `init_from_ckpt` (denoising_diffusion_pytorch/encoder_decoder.py):
the `ema` weights with `ema_model.` stripped when present, else `model`, then
`load_state_dict(strict=False)`. So a ddconfig copied wrong loads without an error and leaves
network tensors at their random initialisation. This command writes the block from the
checkpoint's own config, replays that loading rule on the network the block describes before
writing anything, and refuses when any network key would stay unloaded. It also writes
- a `lossconfig` upstream's `LPIPSWithDiscriminator(**lossconfig)` accepts (this project's
  `learn_logvar` and `allow_random_lpips` are not upstream keys: its constructor refuses them);
- the measured latent scale (1 / std of posterior samples, `python -m train latent-stats`)
  in place of upstream's fixed 0.3, with `scale_by_std: True, default_scale: True` so upstream
  uses it as given (upstream multiplies; it has no per-channel mean);
- `image_size` and the UNet's `input_size` / `cond_feature_size` that follow from the map size
  and the VAE's downsampling factor (upstream's [80, 80] assumes 320 / 4).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import yaml

from model.checkpoint import EMA_PREFIX, CheckpointError
from model.config import ConfigError, to_dict
from model.loading import Loaded
from model.run_config import NATIVE_SIZE, load_run
from radiomaps.base import resolve_size

UPSTREAM_LOSS_KEYS = ("disc_start", "logvar_init", "kl_weight", "pixelloss_weight",
                      "disc_num_layers", "disc_in_channels", "disc_factor", "disc_weight",
                      "perceptual_weight", "use_actnorm", "disc_conditional", "disc_loss")


class RadioDiffConfigError(ValueError):
    """The block would not load the checkpoint completely in upstream's LDM."""


def upstream_state_dict(ckpt: dict) -> dict[str, torch.Tensor]:
    """What upstream's `init_from_ckpt(path, use_ema=True)` hands to load_state_dict: replayed
    here to check the block against upstream's code (this project loads by model/loading.py)."""
    if "ema" in ckpt:
        return {k[len(EMA_PREFIX):]: v for k, v in ckpt["ema"].items()
                if k.startswith(EMA_PREFIX)}
    for key in ("model", "state_dict"):
        if key in ckpt:
            return ckpt[key]
    return ckpt


def unloaded_keys(network: torch.nn.Module, ckpt: dict) -> list[str]:
    """Network keys upstream's strict=False load would leave at their initial values: missing
    from the file, or (where load_state_dict would raise) of another shape."""
    state = upstream_state_dict(ckpt)
    return [k for k, v in network.state_dict().items()
            if k not in state or tuple(state[k].shape) != tuple(v.shape)]


def first_stage_block(loaded: Loaded, map_size: tuple[int, int], factor: int) -> dict:
    """The `model:` keys of radio_train.yaml that depend on the VAE."""
    model_cfg, scaling = loaded.config, loaded.scaling
    loss = to_dict(model_cfg.lossconfig)
    latent = [map_size[0] // factor, map_size[1] // factor]
    return {"model": {
        "image_size": list(map_size),
        "scale_factor": round(float(scaling["scale_factor"]), 6),
        "scale_by_std": True,
        "default_scale": True,
        "first_stage": {
            "embed_dim": model_cfg.embed_dim,
            "lossconfig": {k: loss[k] for k in UPSTREAM_LOSS_KEYS},
            "ddconfig": to_dict(model_cfg.ddconfig),
            "ckpt_path": str(loaded.path.resolve()),
        },
        "unet": {"input_size": latent, "cond_feature_size": list(latent)},
    }}


def _map_size(image_size) -> tuple[int, int]:
    size = resolve_size(image_size)
    return size if size is not None else (NATIVE_SIZE, NATIVE_SIZE)


def build(ckpt: str | Path, cfg: str | Path | None = None,
          overrides: tuple[str, ...] = ()) -> tuple[str, dict]:
    """The YAML text of the block and the block itself, after the loading-rule check."""
    loaded = load_run(ckpt, cfg, overrides)
    network = loaded.model  # the keys and shapes upstream builds from the block's ddconfig
    missing = unloaded_keys(network, loaded.contents)
    if missing:
        raise RadioDiffConfigError(
            f"{loaded.path}: upstream's init_from_ckpt (strict=False) would leave {len(missing)} "
            f"of {len(network.state_dict())} network tensors random, e.g. {missing[:3]}: the "
            "config does not describe this checkpoint")
    factor = network.downsample_factor
    block = first_stage_block(loaded, _map_size(loaded.run.data.image_size), factor)
    source = loaded.scaling["scale_factor_source"]
    header = (f"# RadioDiff configs/radio_train.yaml, the keys under `model:` that depend on the "
              f"first stage\n# from {loaded.path} ({loaded.weights} weights; upstream loads "
              f"`ema` with ema_model. stripped)\n# scale_factor: {source}"
              f" (upstream's fixed 0.3 assumes another VAE)\n# unet sizes: map "
              f"{block['model']['image_size']} / factor {factor}; every network tensor loads "
              f"under upstream's strict=False rule (checked)\n")
    return header + yaml.safe_dump(block, sort_keys=False), block


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m export radiodiff-config", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--ckpt", required=True, help="a model-N.pt, a run directory or a bundled "
                                                 "name (reference)")
    p.add_argument("--cfg", help="the run config (required for upstream files, which store none)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--out", help="write the block here (default: print it)")
    args = p.parse_args(argv)
    try:
        text, _ = build(args.ckpt, args.cfg, tuple(args.overrides))
    except (CheckpointError, ConfigError, RadioDiffConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")
    else:
        print(text, end="")
    return 0
