"""Radio-map datasets (RadioMapSeer on disk, or synthetic) and their DataLoader.

    ds = build_dataset(cfg.data, "train")  # items: image, buildings, tx [1, H, W] in [-1, 1]; name
    loader = build_loader(ds, batch_size, shuffle=True, seed=42, num_workers=2, drop_last=True)
"""
from __future__ import annotations

from train.config import DataConfig

from .base import RadioMapDataset
from .loader import build_loader
from .radiomapseer import DataError, RadioMapSeer
from .splits import SPLITS, UPSTREAM_MAPS, split_map_ids
from .synthetic import SyntheticRadioMaps

SYNTHETIC_MAPS = 64  # data.num_maps default for the synthetic source

__all__ = ["build_dataset", "build_loader", "DataError", "RadioMapDataset", "RadioMapSeer",
           "SyntheticRadioMaps"]


def build_dataset(cfg: DataConfig, split: str) -> RadioMapDataset:
    """The `split` ("train", "val" or "test") of the source `cfg` names."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    default_maps = SYNTHETIC_MAPS if cfg.name == "synthetic" else UPSTREAM_MAPS
    map_ids = split_map_ids(split, cfg.split, cfg.num_maps or default_maps, cfg.seed)
    hflip = cfg.hflip and split == "train"
    if cfg.name == "synthetic":
        return SyntheticRadioMaps(map_ids, cfg.num_tx, cfg.image_size, hflip, cfg.seed)
    return RadioMapSeer(cfg.root, map_ids, cfg.num_tx, cfg.simulation, cfg.cars,
                        cfg.image_size, hflip, cfg.seed)
