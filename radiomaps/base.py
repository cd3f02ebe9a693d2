"""The sample layout every radio-map source shares: one item per (map, transmitter)."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from model.config import ConfigError
from model.io import to_model

Size = Union[int, list, str, None]


def resolve_size(image_size: Size) -> tuple[int, int] | None:
    """`data.image_size` as (H, W), or None for the files' native size."""
    if image_size is None or image_size == "native":
        return None
    if isinstance(image_size, int):
        return (image_size, image_size)
    height, width = image_size
    return (int(height), int(width))


def resize(maps: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
    """Bilinear (antialiased) resize of [C, H, W] maps in [0, 1]; None keeps the size."""
    if size is None or tuple(maps.shape[-2:]) == size:
        return maps
    out = F.interpolate(maps[None], size=size, mode="bilinear", antialias=True,
                        align_corners=False)[0]
    return out.clamp(0.0, 1.0)


class RadioMapDataset(Dataset, ABC):
    """Items `{"image", "buildings", "tx", "name"}` in [-1, 1]; subclasses say how to `load`.

    Item i is transmitter `i % num_tx` of map `map_ids[i // num_tx]` (upstream's order).
    With `hflip`, whether item i is flipped, and with `crop` ([H, W]) where its random crop
    lies, are functions of (seed, epoch, i) alone, so they do not depend on worker count or on
    where a resumed run restarted; the loader's sampler sets the epoch.
    With `with_native` set (evaluation), items of resized, uncropped maps also hold the
    unresized `native_image` and `native_buildings` (in [-1, 1], flipped with the item).
    """

    with_native = False

    def __init__(self, map_ids: list[int], num_tx: int, image_size: Size = "native",
                 hflip: bool = False, seed: int = 42, crop: tuple[int, int] | None = None):
        self.map_ids = list(map_ids)
        self.num_tx = num_tx
        self.size = resolve_size(image_size)
        self.hflip = hflip
        self.crop = tuple(crop) if crop else None
        self.seed = seed
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()  # seen by workers

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)

    def flipped(self, index: int) -> bool:
        """Whether item `index` is mirrored in the current epoch."""
        if not self.hflip:
            return False
        return bool(np.random.default_rng([self.seed, int(self._epoch), index]).random() < 0.5)

    def crop_origin(self, index: int, height: int, width: int) -> tuple[int, int]:
        """Top-left corner of item `index`'s crop in the current epoch (maps of height x width)."""
        ch, cw = self.crop
        if ch > height or cw > width:
            raise ConfigError(f"data.crop_size {list(self.crop)} is larger than the maps "
                              f"({height}x{width}); expected at most the image size")
        rng = np.random.default_rng([self.seed, int(self._epoch), index, 1])  # 1: not the flip's
        return int(rng.integers(0, height - ch + 1)), int(rng.integers(0, width - cw + 1))

    def __len__(self) -> int:
        return len(self.map_ids) * self.num_tx

    def locate(self, index: int) -> tuple[int, int]:
        """(map id, transmitter) of item `index`."""
        if not 0 <= index < len(self):
            raise IndexError(f"item {index} out of range for {len(self)} items")
        return self.map_ids[index // self.num_tx], index % self.num_tx

    @abstractmethod
    def load(self, map_id: int, tx: int) -> dict[str, np.ndarray]:
        """Maps in [0, 1] at native size: `image` (gain), `buildings`, `tx` (+ `cars`)."""

    def maps(self, index: int) -> dict[str, torch.Tensor]:
        """Item `index` as [1, H, W] tensors in [0, 1], resized, not yet flipped (plus the
        native image and buildings, see `with_native`)."""
        arrays = self.load(*self.locate(index))
        keys = list(arrays)
        native = torch.from_numpy(np.stack([arrays[k] for k in keys])).float()
        stacked = resize(native, self.size)
        maps = {k: stacked[i:i + 1] for i, k in enumerate(keys)}
        if self.with_native and self.crop is None and stacked.shape != native.shape:
            maps |= {f"native_{k}": native[keys.index(k)][None] for k in ("image", "buildings")}
        return maps

    def __getitem__(self, index: int) -> dict:
        maps = self.maps(index)
        if self.crop is not None:
            first = next(iter(maps.values()))
            top, left = self.crop_origin(index, *first.shape[-2:])
            maps = {k: v[..., top:top + self.crop[0], left:left + self.crop[1]]
                    for k, v in maps.items()}
        flip = self.flipped(index)
        item = {k: to_model(v.flip(-1) if flip else v) for k, v in maps.items()}
        map_id, tx = self.locate(index)
        item["name"] = f"{map_id}_{tx}"
        return item
