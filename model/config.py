"""Config dataclasses for the network and the loss, and a strict dict -> dataclass parser.

Key names and nesting follow upstream RadioDiff's `first_radio.yaml` (`model.embed_dim`,
`model.ddconfig.*`, `model.lossconfig.*`).
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union


class ConfigError(ValueError):
    """A config key is unknown, missing, or holds a value of the wrong kind."""


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check `value` against the annotation `tp`, converting where YAML is loose."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, path)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    if origin is typing.Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{path}: expected one of {list(typing.get_args(tp))}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{path}: expected null, got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        (item_tp, *_rest) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "5e-6" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{path}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path}: expected a string, got {value!r}")
    raise TypeError(f"unsupported config annotation {tp!r} at {path}")


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass `cls` from `data`, naming the key path of any unknown or bad entry."""
    where = path or "config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        prefix = f"{path}." if path else ""
        close = difflib.get_close_matches(str(unknown[0]), fields, n=1)
        hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
        raise ConfigError(f"unknown key {prefix}{unknown[0]!s}{hint}; allowed under {where}: "
                          f"{', '.join(sorted(fields))}")
    values = {}
    for name, f in fields.items():
        key_path = f"{path}.{name}" if path else name
        if name in data:
            values[name] = _coerce(data[name], hints[name], key_path)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key {key_path}")
    obj = cls(**values)
    check = getattr(obj, "validate", None)
    if check is not None:
        check(path)
    return obj


def to_dict(obj: Any) -> dict:
    """A plain dict (YAML/JSON-safe) from a config dataclass."""
    return dataclasses.asdict(obj)


# Documented bounds on what a config may ask for, checked before anything is allocated
# (docs/training.md, "Bounds"): 4x RadioMapSeer's side, and 10x first_radio's 55 M parameters.
MAX_RESOLUTION = 1024
MAX_PARAMETERS = 600_000_000


@dataclass
class DDConfig:
    """Encoder/decoder geometry (upstream `ddconfig`)."""
    double_z: bool = True
    z_channels: int = 3
    resolution: Union[int, list[int]] = field(default_factory=lambda: [320, 320])
    in_channels: int = 1
    out_ch: int = 1
    ch: int = 128
    ch_mult: list[int] = field(default_factory=lambda: [1, 2, 4])
    num_res_blocks: int = 2
    attn_resolutions: list[int] = field(default_factory=list)
    dropout: float = 0.0

    def validate(self, path: str) -> None:
        res = self.size
        if len(res) != 2 or min(res) < 1:
            raise ConfigError(f"{path}.resolution: expected an int or [H, W] of positive ints, "
                              f"got {self.resolution!r}")
        if max(res) > MAX_RESOLUTION:  # the warm-up and a training batch run at this size
            raise ConfigError(f"{path}.resolution: at most {MAX_RESOLUTION} per side (got "
                              f"{self.resolution!r}); larger maps are served as tiles")
        if not self.double_z:
            raise ConfigError(f"{path}.double_z: must be true for a KL autoencoder")
        for name in ("z_channels", "in_channels", "out_ch", "ch", "num_res_blocks"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{path}.{name}: expected a positive integer")
        if not self.ch_mult or min(self.ch_mult) < 1:
            raise ConfigError(f"{path}.ch_mult: expected a non-empty list of positive ints")
        widths = {self.ch * m for m in self.ch_mult}
        if any(w % 32 for w in widths):
            raise ConfigError(f"{path}.ch: ch * ch_mult must be multiples of 32 (GroupNorm(32)); "
                              f"got widths {sorted(widths)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{path}.dropout: expected 0 <= dropout < 1")

    @property
    def size(self) -> tuple[int, int]:
        """The configured (H, W)."""
        if isinstance(self.resolution, int):
            return (self.resolution, self.resolution)
        return tuple(self.resolution)  # type: ignore[return-value]

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass
class LossConfig:
    """LPIPSWithDiscriminator settings (upstream `lossconfig`)."""
    disc_start: int = 50001
    logvar_init: float = 0.0
    kl_weight: float = 1e-6
    pixelloss_weight: float = 1.0
    disc_num_layers: int = 3
    disc_in_channels: int = 1
    disc_factor: float = 1.0
    disc_weight: float = 0.5
    perceptual_weight: float = 1.0
    use_actnorm: bool = False
    disc_conditional: bool = False
    disc_loss: typing.Literal["hinge", "vanilla"] = "hinge"
    learn_logvar: bool = False
    # Offline machines without the VGG16 weights: train against a random LPIPS backbone.
    allow_random_lpips: bool = False

    def validate(self, path: str) -> None:
        for name in ("kl_weight", "disc_weight", "perceptual_weight", "pixelloss_weight",
                     "disc_factor"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{path}.{name}: expected a value >= 0")
        if self.disc_conditional:
            raise ConfigError(f"{path}.disc_conditional: conditional discriminators are not "
                              "supported (upstream never uses one); set it to false")


@dataclass
class ModelConfig:
    """The autoencoder (upstream `model`)."""
    embed_dim: int = 3
    ddconfig: DDConfig = field(default_factory=DDConfig)
    lossconfig: LossConfig = field(default_factory=LossConfig)
    ckpt_path: Union[str, None] = None
    ignore_keys: list[str] = field(default_factory=list)
    # Latent diffusion's fixed latent scale (RadioDiff's LDM uses 0.3).
    scale_factor: float = 0.3

    def validate(self, path: str) -> None:
        if self.embed_dim < 1:
            raise ConfigError(f"{path}.embed_dim: expected a positive integer")


# A source checkout keeps the configs at the top level; an installed wheel under model/configs.
_SOURCE_CONFIGS = Path(__file__).resolve().parent.parent / "configs"
CONFIG_DIR = _SOURCE_CONFIGS if _SOURCE_CONFIGS.is_dir() else Path(__file__).resolve().parent / "configs"


def resolve_config_path(name: str | os.PathLike[str]) -> Path:
    """A config path as given if it exists, else the bundled `configs/NAME`."""
    path = Path(name)
    if path.is_file():
        return path
    bundled = CONFIG_DIR / path.name
    if path.parent == Path(".") and bundled.is_file():
        return bundled
    known = ", ".join(sorted(p.name for p in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"config {str(name)!r} not found as a path nor among the bundled configs "
                      f"({known})")
