"""The one way a checkpoint becomes a network: `load(path_or_name)` reads a file (this project's
checkpoint, an upstream RadioDiff `model-N.pt`, a run directory's latest, or a bundled name such
as `reference`), picks its network weights by one rule and builds the eval-mode AutoencoderKL,
returning it with what was loaded.

The rule (`choose_weights`): the EMA weights (upstream's `ema` layout, `ema_model.` stripped)
when asked for and present, else the raw `model` weights (else `state_dict`, else the dict
itself), as upstream's `init_from_ckpt`; the label says which were used. The config is the one
given, else the one the file stores; the latent scaling is the stored statistics when they were
computed on those same weights, else the config's scale_factor.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import yaml

from . import checkpoint
from .autoencoder import AutoencoderKL
from .checkpoint import (EMA_PREFIX, CheckpointError, check_finite, latent_stats, load_into,
                         read_checkpoint, resolve_checkpoint)
from .config import ConfigError, ModelConfig, from_dict, resolve_config_path

Config = ModelConfig | dict | str | Path | None  # a ModelConfig, its dict, a YAML, or the stored
LOSS_KEYS = "loss."  # the trainer's loss modules in `model`: never part of the network


@dataclass(frozen=True)
class CheckpointFile:
    """A checkpoint file, read once (torch.load, weights_only)."""
    path: Path
    source: str  # "bundled" (model/weights/), "project" (stores its config), "upstream" (not)
    sha256: str  # of the bytes that were loaded
    contents: dict

    @property
    def step(self) -> int | None:
        step = self.contents.get("step")
        return step if isinstance(step, int) and not isinstance(step, bool) else None


@dataclass(frozen=True)
class NetworkWeights(CheckpointFile):
    """The network weights the rule picked from a file, and what goes with them."""
    config: ModelConfig
    weights: str  # "ema" only when EMA weights were present and used, else "model" (the raw)
    state: dict[str, torch.Tensor]
    scaling: dict  # latent_scaling() of these weights


@dataclass(frozen=True)
class Loaded(NetworkWeights):
    """The network built from them: an eval-mode AutoencoderKL, strictly loaded."""
    model: AutoencoderKL


def read_file(path_or_name: str | Path) -> CheckpointFile:
    """Read a checkpoint file, the latest `model-N.pt` of a run directory, or a bundled name
    (a path that exists wins over the name); a torn, foreign or code-carrying file is a
    CheckpointError naming it."""
    path = resolve_checkpoint(path_or_name)
    digest = hashlib.sha256()
    contents = read_checkpoint(path, "cpu", digest)
    source = ("bundled" if path.resolve().parent == checkpoint.WEIGHTS_DIR else
              "project" if isinstance(contents.get("config"), dict) else "upstream")
    return CheckpointFile(path, source, digest.hexdigest(), contents)


def choose_weights(file: CheckpointFile, config: Config = None,
                   use_ema: bool = True) -> NetworkWeights:
    """The rule (module docstring), without building the network; non-finite weights are a
    CheckpointError."""
    cfg = _model_config(file, config)
    weights, state = _network_state(file.contents, use_ema)
    check_finite({k: v for k, v in state.items() if not str(k).startswith(LOSS_KEYS)}, file.path)
    return NetworkWeights(file.path, file.source, file.sha256, file.contents, cfg, weights,
                          state, latent_scaling(file.contents, cfg.scale_factor, weights))


def load(path_or_name: str | Path | CheckpointFile, config: Config = None, use_ema: bool = True,
         device: str | torch.device = "cpu") -> Loaded:
    """The eval-mode AutoencoderKL (on `device`) of a checkpoint (path, run directory, bundled
    name, or a file already read), and what was loaded: path, source, SHA-256, step, config,
    which weights ("ema" or "model"), and their latent scaling. Every network key must load."""
    file = (path_or_name if isinstance(path_or_name, CheckpointFile)
            else read_file(path_or_name))
    chosen = choose_weights(file, config, use_ema)
    model = AutoencoderKL.from_config(chosen.config)
    load_into(model, chosen.state, file.path)
    return Loaded(**{f.name: getattr(chosen, f.name) for f in fields(chosen)},
                  model=model.to(device).eval())


def latent_scaling(ckpt: dict, config_scale: float, weights: str | None = None) -> dict:
    """The latent scale to use and where it comes from: the stored statistics (when they were
    computed on `weights`, if given), else the config's fixed scale_factor (no mean/std)."""
    stats = latent_stats(ckpt)
    if stats is None or (weights is not None and stats.get("weights", weights) != weights):
        fixed = "RadioDiff's fixed 0.3" if config_scale == 0.3 else "model.scale_factor"
        return {"scale_factor": float(config_scale), "scale_factor_source": f"config ({fixed})",
                "latents_mean": None, "latents_std": None}
    return {"scale_factor": float(stats["scale_factor"]),
            "scale_factor_source": f"latent_stats ({stats.get('split')} split, "
                                   f"{stats.get('maps')} maps)",
            "latents_mean": [float(v) for v in stats["latents_mean"]],
            "latents_std": [float(v) for v in stats["latents_std"]]}


def _network_state(ckpt: dict, use_ema: bool) -> tuple[str, dict[str, torch.Tensor]]:
    """Which weights the rule takes, and them."""
    ema = ckpt.get("ema")
    if use_ema and isinstance(ema, dict):
        state = {k[len(EMA_PREFIX):]: v for k, v in ema.items()
                 if isinstance(k, str) and k.startswith(EMA_PREFIX)}
        if state:
            return "ema", state
    for key in ("model", "state_dict"):
        if isinstance(ckpt.get(key), dict):
            return "model", ckpt[key]
    return "model", ckpt


def _model_config(file: CheckpointFile, config: Config) -> ModelConfig:
    """The ModelConfig given (or its dict, or a YAML's `model`), else the one the file stores."""
    if isinstance(config, ModelConfig):
        return config
    if isinstance(config, (str, Path)):
        with open(resolve_config_path(config)) as f:
            config = (yaml.safe_load(f) or {}).get("model")
    if config is None:
        stored = file.contents.get("config")
        if not isinstance(stored, dict) or "model" not in stored:
            raise CheckpointError(f"{file.path}: the checkpoint stores no config (an upstream "
                                  "RadioDiff file?): pass the YAML it was trained with, e.g. "
                                  "config='first_radio.yaml'")
        config = stored["model"]
    try:
        return from_dict(ModelConfig, config, "model")
    except ConfigError as err:
        raise CheckpointError(f"{file.path}: bad model config: {err}") from None
