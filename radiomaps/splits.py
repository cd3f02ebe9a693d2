"""Which maps belong to train / val / test: upstream RadioUNet's shuffled order, split by map.

Upstream shuffles the map indices 0..699 with `np.random.seed(42); np.random.shuffle` and reads
files `{index + 1}` (map 0 is never read). Positions in that order (ends inclusive):

- `upstream` (the RadioDiff seed's sets): train 0..600, val 501..600, test 600..699.
  Train and val overlap (100 maps) and train and test share one map.
- `disjoint` (our default): train 0..500, val 501..599, test 600..699.

With fewer maps (`data.num_maps: N`, e.g. a synthetic set) the same fractions of N are used.
"""
from __future__ import annotations

import numpy as np

from model.config import ConfigError

SPLITS = ("train", "val", "test")
UPSTREAM_MAPS = 700
# [start, stop) positions in the shuffled order for 700 maps; scaled for other counts.
_BOUNDS = {
    "disjoint": {"train": (0, 501), "val": (501, 600), "test": (600, 700)},
    "upstream": {"train": (0, 601), "val": (501, 601), "test": (600, 700)},
}


def shuffled_order(num_maps: int, seed: int = 42) -> np.ndarray:
    """Map indices 0..num_maps-1 in upstream's deterministic shuffled order."""
    order = np.arange(num_maps)
    np.random.RandomState(seed).shuffle(order)  # same stream as np.random.seed(seed); shuffle
    return order


def split_map_ids(split: str, mode: str = "disjoint", num_maps: int = UPSTREAM_MAPS,
                  seed: int = 42) -> list[int]:
    """File ids (`index + 1`) of the maps in `split`, in shuffled order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    if mode not in _BOUNDS:
        raise ConfigError(f"data.split must be one of {list(_BOUNDS)}, got {mode!r}")
    start, stop = (round(b * num_maps / UPSTREAM_MAPS) for b in _BOUNDS[mode][split])
    if stop <= start:
        raise ConfigError(f"data.num_maps={num_maps}: the {split!r} split would be empty; "
                          f"use at least 6 maps")
    return [int(i) + 1 for i in shuffled_order(num_maps, seed)[start:stop]]


def spanning_subset(map_ids: list[int], num_tx: int, size: int, seed: int = 42) -> list[int]:
    """`size` item indices (item i = transmitter i % num_tx of map i // num_tx) that visit
    every map once, in a seeded order, before any map repeats; a repeat takes another of the
    map's transmitters. The same (map_ids, num_tx, size, seed) always gives the same subset."""
    rng = np.random.default_rng([seed, 7])  # 7: a stream of its own, not the split shuffle's
    count = len(map_ids)
    first_tx = rng.integers(0, num_tx, count)
    picked: list[int] = []
    for rnd in range(-(-min(size, count * num_tx) // count)):
        for m in rng.permutation(count):
            picked.append(int(m) * num_tx + int((first_tx[m] + rnd) % num_tx))
    return picked[:size]
