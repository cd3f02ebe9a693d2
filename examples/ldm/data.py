"""LDM training pairs: latents from `python -m export latents` shards, read through the
project's LatentShards, with their condition maps; and how to hand the LDM's latents back to
the server's /decode."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from export.latent_shards import LatentShards
from model.io import from_model
from model.run_config import DataConfig
from radiomaps import build_dataset

from .conditions import condition_maps

SCALES = ("measured", "0.3", "per-channel")
UPSTREAM_SCALE = 0.3


def split_dataset(index: dict) -> Dataset:
    """The data split the shards were encoded from (whole maps, no flips)."""
    data = replace(DataConfig(**index["data"]), hflip=False, crop_size=None)
    return build_dataset(data, index["split"])


class LatentPairs(Dataset):
    """(scaled latent [C, h, w], condition [3, h, w], item) per map of a latents folder.

    scale: "measured" multiplies by the measured scale factor (1 / global std: what the
    server's scaled=true and RadioDiff do); "0.3" by upstream's fixed 0.3; "per-channel"
    standardises each channel with the stored mean and std. sample: a fresh posterior sample
    per map and epoch (as RadioDiff encodes) instead of the posterior mean."""

    def __init__(self, folder: str | Path, scale: str = "measured", sample: bool = True,
                 seed: int = 0, max_items: int | None = None):
        if scale not in SCALES:
            raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
        self.scale = scale
        self.shards = LatentShards(folder, sample=sample, scaled=scale != "0.3", seed=seed,
                                   per_channel=scale == "per-channel")
        self.raw = LatentShards(folder, verify=False)  # posterior means, unscaled
        self.dataset = split_dataset(self.shards.index)
        count = len(self.shards) if max_items is None else min(max_items, len(self.shards))
        self.items = list(range(count))
        h = self.shards.index["latent_shape"][1]
        self.factor = self.dataset[0]["image"].shape[-1] // h
        self.cond = torch.cat([self._condition(i) for i in self.items])

    def _condition(self, i: int) -> torch.Tensor:
        item = self.dataset[self.shards[i]["item"]]
        return condition_maps(from_model(item["buildings"])[None], from_model(item["tx"])[None],
                              self.factor)

    def set_epoch(self, epoch: int) -> None:
        self.shards.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        z = self.shards[self.items[i]]["latent"]
        if self.scale == "0.3":
            z = z * UPSTREAM_SCALE
        return z, self.cond[i], i

    def for_decode(self, z: torch.Tensor) -> tuple[np.ndarray, bool]:
        """(latents, scaled flag) for the server's /decode: "measured" latents go as they are
        with scaled=true; the others are brought back to the VAE's own scale first."""
        if self.scale == "measured":
            return z.numpy(), True
        raw = z / UPSTREAM_SCALE if self.scale == "0.3" else self.shards.unscale(z)
        return raw.numpy(), False

    def targets(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """Ground-truth maps and building masks [N, 1, H, W] in [0, 1], and map names."""
        items = [self.dataset[self.shards[self.items[r]]["item"]] for r in rows]
        maps = torch.stack([from_model(it["image"]) for it in items])
        buildings = torch.stack([from_model(it["buildings"]) for it in items]) > 0.5
        return maps, buildings, [it["name"] for it in items]

    def means_raw(self, rows: list[int]) -> np.ndarray:
        """The posterior means of `rows`, unscaled (the VAE's own reconstruction's latents)."""
        return torch.stack([self.raw[self.items[r]]["latent"] for r in rows]).numpy()
