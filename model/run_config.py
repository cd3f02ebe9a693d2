"""The run config: upstream `first_radio.yaml` keys (`model`, `data`, `trainer`) as dataclasses,
which every checkpoint of this project stores; and a checkpoint with the run config it is used
with (`load_run`: eval, latent statistics, latent shards, the RadioDiff config block)."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal, Sequence, Union

import torch
import yaml

from .checkpoint import CheckpointError
from .config import ConfigError, ModelConfig, from_dict, resolve_config_path, to_dict
from .loading import Loaded, load, read_file


@dataclass
class DataConfig:
    """Where the radio maps come from (upstream `data`)."""
    name: Literal["radio", "synthetic"] = "radio"  # radio = RadioMapSeer on disk
    root: Union[str, None] = None
    simulation: Literal["DPM", "IRT2", "IRT4"] = "DPM"
    cars: bool = False
    num_tx: int = 80
    num_maps: Union[int, None] = None  # None: the whole dataset (synthetic: 64 maps)
    split: Literal["disjoint", "upstream"] = "disjoint"
    image_size: Union[int, list[int], Literal["native"]] = field(default_factory=lambda: [320, 320])
    hflip: bool = False
    # [H, W]: train on random crops of this size (after image_size); val / eval see whole maps
    crop_size: Union[list[int], None] = None
    seed: int = 42
    num_workers: int = 2
    batch_size: Union[int, None] = None  # upstream puts batch_size here; trainer.batch_size wins

    def validate(self, path: str) -> None:
        if self.name == "radio" and not self.root:
            raise ConfigError(f"{path}.root: the RadioMapSeer folder is required when "
                              f"{path}.name is 'radio' (or set {path}.name: synthetic)")
        if self.num_tx < 1 or (self.num_maps is not None and self.num_maps < 1):
            raise ConfigError(f"{path}.num_tx / {path}.num_maps: expected positive integers")
        if self.num_workers < 0:
            raise ConfigError(f"{path}.num_workers: expected >= 0")
        size = self.image_size
        if isinstance(size, list) and (len(size) != 2 or min(size) < 1):
            raise ConfigError(f"{path}.image_size: expected [H, W], an int, or 'native'")
        crop = self.crop_size
        if crop is not None and (len(crop) != 2 or min(crop) < 1):
            raise ConfigError(f"{path}.crop_size: expected [H, W] of positive ints or null")
        if crop is not None and isinstance(size, (int, list)):
            height, width = (size, size) if isinstance(size, int) else size
            if crop[0] > height or crop[1] > width:
                raise ConfigError(f"{path}.crop_size {crop}: larger than {path}.image_size "
                                  f"{size}")


@dataclass
class TrainerConfig:
    """Optimisation, logging and checkpointing (upstream `trainer`)."""
    gradient_accumulate_every: int = 1
    lr: float = 5e-6
    min_lr: float = 5e-7
    warmup_steps: int = 0
    train_num_steps: int = 150000
    save_and_sample_every: int = 5000
    log_freq: int = 100
    results_folder: str = "results/first_radio"
    resume_milestone: Union[int, None] = None
    amp: bool = False  # bfloat16 autocast (no gradient scaler)
    # float16 mixed precision (autocast + gradient scaler) whatever `amp` says, as upstream's
    # accelerate mixed_precision='fp16'; CUDA only: refused at start-up on a CPU device
    fp16: bool = False
    # recompute block activations in backward (less memory); auto: on when a step would not
    # fit the GPU's free memory by estimate (train/memory.py), off on a CPU
    gradient_checkpointing: Union[bool, Literal["auto"]] = "auto"
    batch_size: Union[int, None] = None
    ema_decay: float = 0.995
    ema_update_every: int = 10
    ema_update_after_step: int = 100
    # ema-pytorch's warm-up: decay = 1 - (1 + t / inv_gamma) ** -power, capped at ema_decay
    ema_power: float = 2 / 3  # 0: a fixed ema_decay from the first update
    ema_inv_gamma: float = 1.0
    grad_clip: Union[float, None] = None
    val_size: int = 64  # validation maps: a fixed seeded subset spanning the val split's maps
    num_samples: int = 8
    seed: int = 42
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def validate(self, path: str) -> None:
        for name in ("gradient_accumulate_every", "train_num_steps", "save_and_sample_every",
                     "log_freq", "ema_update_every", "val_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{path}.{name}: expected a positive integer")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"{path}.lr / {path}.min_lr: expected 0 <= min_lr <= lr, lr > 0")
        if not 0.0 <= self.ema_decay < 1.0 or self.ema_power < 0 or self.ema_inv_gamma <= 0:
            raise ConfigError(f"{path}.ema_decay / ema_power / ema_inv_gamma: expected "
                              "0 <= ema_decay < 1, ema_power >= 0, ema_inv_gamma > 0")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"{path}.batch_size: expected a positive integer")


NATIVE_SIZE = 256  # RadioMapSeer's and the synthetic source's maps: data.image_size 'native'


def check_network_size(key: str, size: Union[int, list[int], str, None],
                       ch_mult: list[int]) -> None:
    """The network halves a map len(ch_mult) - 1 times and doubles it back, so it takes sizes
    that are multiples of 2 ** (len(ch_mult) - 1) and no others (63 -> 31 -> 62 != 63)."""
    if size is None:
        return
    hw = [NATIVE_SIZE] * 2 if size == "native" else [size] * 2 if isinstance(size, int) else size
    factor = 2 ** (len(ch_mult) - 1)
    if any(side % factor for side in hw):
        down = [side // factor * factor or factor for side in hw]
        raise ConfigError(f"{key} {size}: the network (model.ddconfig.ch_mult {ch_mult}, "
                          f"downsampling factor {factor}) takes only sizes that are multiples "
                          f"of {factor}; e.g. {down} or {[d + factor for d in down]}")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    def validate(self, path: str) -> None:
        a, b = self.data.batch_size, self.trainer.batch_size
        if a is not None and b is not None and a != b:
            raise ConfigError(f"data.batch_size ({a}) and trainer.batch_size ({b}) disagree; "
                              "set one")
        for key, size in (("image_size", self.data.image_size), ("crop_size", self.data.crop_size)):
            check_network_size(f"data.{key}", size, self.model.ddconfig.ch_mult)

    @property
    def train_size(self) -> tuple[int, int]:
        """(H, W) of the maps a training step sees: the crop, else data.image_size."""
        size = self.data.crop_size or self.data.image_size
        size = NATIVE_SIZE if size == "native" else size
        return (size, size) if isinstance(size, int) else (size[0], size[1])

    @property
    def batch_size(self) -> int:
        """Per-process batch size: trainer.batch_size, else upstream's data.batch_size, else 8."""
        return self.trainer.batch_size or self.data.batch_size or 8


def apply_override(raw: dict, override: str) -> None:
    """Apply one `a.b.c=value` override (value parsed as YAML) to a raw config dict."""
    key, sep, value = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r}: expected KEY.PATH=VALUE, "
                          "e.g. trainer.batch_size=4")
    node = raw
    parts = key.strip().split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {'.'.join(parts[:i + 1])} is not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(value)


def load_config(cfg: str | Path | dict, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML config (path, or bundled name) or a dict, apply overrides, validate."""
    if isinstance(cfg, dict):
        raw = copy.deepcopy(cfg)
    else:
        path = resolve_config_path(cfg)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
    for override in overrides:
        apply_override(raw, override)
    return from_dict(RunConfig, raw)


def dump_config(cfg: RunConfig) -> dict:
    return to_dict(cfg)


@dataclass(frozen=True)
class LoadedRun(Loaded):
    """A loaded checkpoint (its network on `device`, eval mode) and the run config it is used
    with."""
    run: RunConfig
    device: torch.device


def load_run(ckpt: str | Path, cfg: str | Path | None = None, overrides: Sequence[str] = (),
             use_ema: bool = True) -> LoadedRun:
    """Read a checkpoint (file, run directory or bundled name) and build its network from the
    run config `cfg` if given, else the one the checkpoint stores, with `overrides` applied."""
    file = read_file(ckpt)
    stored = file.contents.get("config")
    if cfg is None and not isinstance(stored, dict):
        raise CheckpointError(f"{file.path}: the checkpoint stores no config (an upstream file?): "
                              "pass --cfg first_radio.yaml (or the YAML it was trained with)")
    run = load_config(cfg if cfg is not None else stored, list(overrides))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loaded = load(file, run.model, use_ema, device)
    return LoadedRun(**{f.name: getattr(loaded, f.name) for f in fields(loaded)}, run=run,
                     device=device)
