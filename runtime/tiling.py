"""Tiled encode / decode for maps larger than a tile (diffusers' `enable_tiling` is the model).

The map is cut into overlapping tiles; each tile goes through the network alone, and the
tiles' outputs are blended where they overlap with weights that ramp linearly from the tile's
edge (so every output pixel is a convex mix, and a seam fades over the whole overlap rather
than jumping). GroupNorm statistics and the mid-block attention see one tile, not the map,
which is why neighbouring tiles disagree at all; bench/tiling.py measures how much.

    tiler = Tiler(tile=256, overlap=128, factor=4)
    z = tiler.encode(engine.encode_mean, x)      # x [N, 1, H, W] -> [N, C, H/4, W/4]
    y = tiler.decode(engine.decode, z)           # z [N, C, h, w] -> [N, 1, 4h, 4w]

A map no larger than one tile is passed through whole: tiled == untiled there.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

Net = Callable[[torch.Tensor], torch.Tensor]


def tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Tile origins covering [0, length): every `stride`, the last one flush with the end."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]


def seam_band(size: int, tile: int, overlap: int, band: int) -> "np.ndarray":
    """Bool [size, size]: pixels within `band` of an inner tile edge (where one tile's weight
    starts to fall), for measuring seams."""
    import numpy as np
    mask = np.zeros((size, size), dtype=bool)
    starts = tile_starts(size, tile, tile - overlap)
    for edge in sorted(set(starts[1:]) | {s + tile for s in starts[:-1]}):
        mask[:, max(edge - band, 0):edge + band] = True
        mask[max(edge - band, 0):edge + band, :] = True
    return mask


def _ramp(size: int, overlap: int, first: bool, last: bool) -> torch.Tensor:
    """1-D blend weight of one tile: rising over `overlap` at an inner edge, flat elsewhere."""
    w = torch.ones(size)
    if overlap > 0:
        rise = (torch.arange(overlap, dtype=torch.float32) + 0.5) / overlap
        if not first:
            w[:overlap] = torch.minimum(w[:overlap], rise)
        if not last:
            w[-overlap:] = torch.minimum(w[-overlap:], rise.flip(0))
    return w


@dataclass(frozen=True)
class Tiler:
    """Tile size and overlap in map pixels; `factor` is the network's downsampling factor."""
    tile: int = 256
    overlap: int = 128  # half a tile: see docs/ldm.md for what 64 costs in quality
    factor: int = 4

    def __post_init__(self):
        if self.tile % self.factor or self.overlap % self.factor:
            raise ValueError(f"tile ({self.tile}) and overlap ({self.overlap}) must be "
                             f"multiples of the downsampling factor {self.factor}")
        if not 0 <= self.overlap < self.tile:
            raise ValueError(f"overlap must be in [0, tile): got {self.overlap}, {self.tile}")

    def count(self, height: int, width: int) -> int:
        """How many tiles a height x width map is cut into."""
        stride = self.tile - self.overlap
        return len(tile_starts(height, self.tile, stride)) * len(tile_starts(width, self.tile,
                                                                             stride))

    def encode(self, net: Net, x: torch.Tensor) -> torch.Tensor:
        """`net` (maps -> latent moments or means, downsampling by `factor`) over tiles of x."""
        return self._run(net, x, self.tile, self.overlap, 1 / self.factor)

    def decode(self, net: Net, z: torch.Tensor) -> torch.Tensor:
        """`net` (latents -> maps, upsampling by `factor`) over latent tiles of z."""
        return self._run(net, z, self.tile // self.factor, self.overlap // self.factor,
                         self.factor)

    def _run(self, net: Net, x: torch.Tensor, tile: int, overlap: int,
             scale: float) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h <= tile and w <= tile:
            return net(x)
        rows = tile_starts(h, tile, tile - overlap)
        cols = tile_starts(w, tile, tile - overlap)
        out = weight = None
        o = round(overlap * scale)  # the overlap at the output's resolution
        for i, top in enumerate(rows):
            for j, left in enumerate(cols):
                y = net(x[..., top:top + tile, left:left + tile])
                if out is None:
                    out = y.new_zeros(*y.shape[:-2], round(h * scale), round(w * scale))
                    weight = y.new_zeros(round(h * scale), round(w * scale))
                th, tw = y.shape[-2:]
                wy = _ramp(th, o, i == 0, i == len(rows) - 1).to(y)
                wx = _ramp(tw, o, j == 0, j == len(cols) - 1).to(y)
                mask = wy[:, None] * wx[None, :]
                t, l = round(top * scale), round(left * scale)
                out[..., t:t + th, l:l + tw] += y * mask
                weight[t:t + th, l:l + tw] += mask
        return out / weight
