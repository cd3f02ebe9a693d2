"""Where radio maps come from: datasets (RadioMapSeer on disk, or synthetic), their splits and
DataLoader, and the generators that write them (`python -m radiomaps`: synthetic maps, Sionna
ray tracing). Used by train/ and export/ alike.

    ds = build_dataset(cfg.data, "train")  # items: image, buildings, tx [1, H, W] in [-1, 1]; name
    loader = build_loader(ds, batch_size, shuffle=True, seed=42, num_workers=2, drop_last=True)
"""
from __future__ import annotations

from dataclasses import replace

from torch.utils.data import Dataset, Subset

from model.run_config import DataConfig

from .base import RadioMapDataset
from .loader import build_loader
from .radiomapseer import DataError, RadioMapSeer
from .splits import SPLITS, UPSTREAM_MAPS, spanning_subset, split_map_ids
from .synthetic import SyntheticRadioMaps

SYNTHETIC_MAPS = 64  # data.num_maps default for the synthetic source

__all__ = ["build_dataset", "build_loader", "validation_subset", "whole_maps", "DataError",
           "RadioMapDataset", "RadioMapSeer", "SyntheticRadioMaps"]


def validation_subset(dataset: Dataset, size: int, seed: int = 42) -> Dataset:
    """The fixed validation subset of a RadioMapDataset: `size` items spanning its maps (every
    map once before any repeats); another dataset is cut to its first `size` items."""
    if isinstance(dataset, RadioMapDataset):
        indices = spanning_subset(dataset.map_ids, dataset.num_tx, size, seed)
    else:
        indices = list(range(min(size, len(dataset))))
    return Subset(dataset, indices)


def build_dataset(cfg: DataConfig, split: str) -> RadioMapDataset:
    """The `split` ("train", "val" or "test") of the source `cfg` names."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    default_maps = SYNTHETIC_MAPS if cfg.name == "synthetic" else UPSTREAM_MAPS
    map_ids = split_map_ids(split, cfg.split, cfg.num_maps or default_maps, cfg.seed)
    train = split == "train"  # augmentation and crops for training; whole maps to judge by
    hflip, crop = cfg.hflip and train, cfg.crop_size if train else None
    if cfg.name == "synthetic":
        return SyntheticRadioMaps(map_ids, cfg.num_tx, cfg.image_size, hflip, cfg.seed, crop=crop)
    return RadioMapSeer(cfg.root, map_ids, cfg.num_tx, cfg.simulation, cfg.cars,
                        cfg.image_size, hflip, cfg.seed, crop=crop)


def whole_maps(cfg: DataConfig, split: str) -> RadioMapDataset:
    """The split's whole maps: no flips or crops, whatever the training config augments."""
    return build_dataset(replace(cfg, hflip=False, crop_size=None), split)
