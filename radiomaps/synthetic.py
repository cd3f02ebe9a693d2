"""Synthetic radio maps from a small physical model, so everything runs with no download.

A city is a (possibly rotated) grid of blocks separated by streets; each block holds a
rectangular building, split by alleys, cut to an L, or built around a courtyard, or stays open.
A transmitter stands in a street. The path gain is RadioMapSeer's: 1 m pixels at 5.9 GHz,
log-distance loss from the transmitter plus a fixed loss per building wall on the straight
path, softened at shadow edges (a stand-in for diffraction), clipped to [-147, -47] dB and
scaled to [0, 1] (gray 0..255 in the PNGs), 0 inside buildings. Walls are counted on rays cast
from the transmitter (polar grid), so one map costs O(H*W) numpy work.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from model.io import GAIN_MAX_DB, GAIN_MIN_DB, write_png
from model.run_config import NATIVE_SIZE

from .base import RadioMapDataset, Size

SPEED_OF_LIGHT = 299_792_458.0


@dataclass(frozen=True)
class Propagation:
    """The channel model's constants."""
    frequency_hz: float = 5.9e9
    metres_per_pixel: float = 1.0
    exponent: float = 2.0  # log-distance exponent up to the breakpoint (2 = free space)
    far_exponent: float = 4.0  # past the two-ray breakpoint 4 * h_tx * h_rx / wavelength
    antenna_height_m: float = 1.5  # transmitter and receiver (assumed)
    wall_loss_db: float = 10.0  # per wall crossed; a building costs two
    max_walls: int = 6  # past this much concrete the signal arrives around, not through
    diffraction_px: int = 8  # reach of the shadow-edge softening
    rays: int = 2048  # angular resolution of the wall count


def _lattice(rng: np.random.Generator, half: float) -> tuple[np.ndarray, np.ndarray]:
    """Block starts and lengths along one axis of the street grid, covering [-half, half]."""
    starts, lengths = [], []
    pos = -half - rng.uniform(0, 40)
    while pos < half:
        pos += rng.uniform(6, 20)  # street
        length = rng.uniform(20, 60)
        starts.append(pos)
        lengths.append(length)
        pos += length
    return np.array(starts), np.array(lengths)


def _locate(coord: np.ndarray, starts: np.ndarray, lengths: np.ndarray):
    """Block index, position inside the block, and whether the point is in a block at all."""
    idx = np.clip(np.searchsorted(starts, coord, side="right") - 1, 0, len(starts) - 1)
    local = coord - starts[idx]
    return idx, local, (local >= 0) & (local < lengths[idx])


def random_city(rng: np.random.Generator, size: int = NATIVE_SIZE) -> np.ndarray:
    """A bool [size, size] building mask: a random street grid with varied buildings."""
    theta = rng.uniform(-np.pi / 4, np.pi / 4) if rng.random() < 0.7 else 0.0
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) - (size - 1) / 2.0
    u = np.cos(theta) * x + np.sin(theta) * y
    v = -np.sin(theta) * x + np.cos(theta) * y
    half = size * 0.75
    (su, lu_len), (sv, lv_len) = _lattice(rng, half), _lattice(rng, half)
    iu, lu, in_u = _locate(u, su, lu_len)
    iv, lv, in_v = _locate(v, sv, lv_len)
    block = iu * len(sv) + iv
    n = len(su) * len(sv)

    def per_block(values: np.ndarray) -> np.ndarray:
        """One random value per block, looked up at every pixel."""
        return values[block]

    bu, bv = lu_len[iu], lv_len[iv]  # block extents per pixel
    margin = per_block(rng.uniform(0, 6, n))
    solid = in_u & in_v & per_block(rng.random(n) > 0.15)
    solid &= (lu >= margin) & (lu < bu - margin) & (lv >= margin) & (lv < bv - margin)

    # alleys: split the block into k pieces along one axis
    split_u = per_block(rng.random(n) < 0.5)
    piece_count, gap = per_block(rng.integers(1, 4, n)), per_block(rng.uniform(3, 7, n))
    along = np.where(split_u, lu, lv) - margin
    extent = np.where(split_u, bu, bv) - 2 * margin
    piece = extent / piece_count
    alley = (np.mod(along, piece) > piece - gap) & (along < extent - piece)
    solid &= ~(alley & per_block(rng.random(n) < 0.5))

    # L-shapes: cut one corner
    fu, fv = per_block(rng.uniform(0.35, 0.65, n)), per_block(rng.uniform(0.35, 0.65, n))
    flip_u, flip_v = per_block(rng.random(n) < 0.5), per_block(rng.random(n) < 0.5)
    corner = (np.where(flip_u, bu - lu, lu) > fu * bu) & (np.where(flip_v, bv - lv, lv) > fv * bv)
    solid &= ~(corner & per_block(rng.random(n) < 0.3))

    # courtyards in big blocks
    wall = per_block(rng.uniform(7, 12, n))
    inner = (lu > margin + wall) & (lu < bu - margin - wall)
    inner &= (lv > margin + wall) & (lv < bv - margin - wall)
    courtyard = per_block(rng.random(n) < 0.25) & (bu > 40) & (bv > 40)
    return solid & ~(inner & courtyard)


def place_transmitter(rng: np.random.Generator, buildings: np.ndarray) -> tuple[int, int]:
    """A uniformly random (row, col) outside the buildings."""
    free = np.flatnonzero(~buildings)
    if free.size == 0:
        raise ValueError("the city has no free pixel for a transmitter")
    row, col = np.unravel_index(rng.choice(free), buildings.shape)
    return int(row), int(col)


def _box_blur(x: np.ndarray, radius: int) -> np.ndarray:
    """Mean over a (2r+1)^2 window, edges replicated; separable cumulative sums."""
    if radius < 1:
        return x
    k = 2 * radius + 1
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (radius + 1, radius)
        c = np.cumsum(np.pad(x, pad, mode="edge"), axis=axis)
        n = x.shape[axis]
        x = (np.take(c, range(k, k + n), axis=axis) - np.take(c, range(0, n), axis=axis)) / k
    return x


def wall_crossings(buildings: np.ndarray, tx: tuple[int, int], rays: int = 2048) -> np.ndarray:
    """Per pixel, how many building walls the straight path from `tx` crosses (int [H, W])."""
    h, w = buildings.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    dy, dx = yy - tx[0], xx - tx[1]
    dist = np.hypot(dy, dx)
    angles = np.arange(rays, dtype=np.float32) * np.float32(2 * np.pi / rays)
    radii = np.arange(int(np.ceil(dist.max())) + 1, dtype=np.float32)
    # sample every ray at every radius; a 1-pixel free border stands for "off the map"
    sy = np.clip(np.rint(tx[0] + 1 + np.outer(np.sin(angles), radii)), 0, h + 1).astype(np.intp)
    sx = np.clip(np.rint(tx[1] + 1 + np.outer(np.cos(angles), radii)), 0, w + 1).astype(np.intp)
    on_ray = np.pad(buildings, 1).ravel()[sy * (w + 2) + sx]
    crossings = np.zeros(on_ray.shape, dtype=np.int32)
    np.cumsum(on_ray[:, 1:] != on_ray[:, :-1], axis=1, out=crossings[:, 1:])
    ray = np.rint(np.arctan2(dy, dx) * (rays / (2 * np.pi))).astype(np.intp) % rays
    walls = crossings[ray, np.rint(dist).astype(np.intp)]
    # an outdoor pixel sees whole buildings; an odd count is a ray grazing a corner
    return np.where(buildings, walls, walls - walls % 2)


def distance_loss_db(dist_m: np.ndarray, prop: Propagation = Propagation()) -> np.ndarray:
    """Dual-slope log-distance loss: free space from 1 m, a steeper slope past the breakpoint."""
    wavelength = SPEED_OF_LIGHT / prop.frequency_hz
    ref_db = 20 * np.log10(4 * np.pi / wavelength)  # free-space loss at 1 m
    breakpoint_m = 4 * prop.antenna_height_m ** 2 / wavelength
    near = 10 * prop.exponent * np.log10(np.minimum(dist_m, breakpoint_m))
    far = 10 * prop.far_exponent * np.log10(np.maximum(dist_m / breakpoint_m, 1.0))
    return ref_db + near + far


def path_gain_db(buildings: np.ndarray, tx: tuple[int, int],
                 prop: Propagation = Propagation()) -> np.ndarray:
    """Path gain in dB at every pixel (not clipped; meaningless inside buildings)."""
    h, w = buildings.shape
    yy, xx = np.mgrid[0:h, 0:w]
    dist_m = np.maximum(np.hypot(yy - tx[0], xx - tx[1]), 1.0) * prop.metres_per_pixel
    distance_db = distance_loss_db(dist_m, prop)
    walls = wall_crossings(buildings, tx, prop.rays)
    walls = np.minimum(walls + (walls % 2), prop.max_walls)  # indoors counts as shadow
    wall_db = walls * prop.wall_loss_db
    # diffraction lights shadow edges from the lit side; it never darkens line of sight
    soft = _box_blur(_box_blur(wall_db, prop.diffraction_px), prop.diffraction_px)
    wall_db = np.minimum(wall_db, soft)
    return -(distance_db + wall_db)


def path_gain(buildings: np.ndarray, tx: tuple[int, int],
              prop: Propagation = Propagation()) -> np.ndarray:
    """RadioMapSeer-scaled gain: float32 [H, W] in [0, 1], 0 inside buildings."""
    gain = (path_gain_db(buildings, tx, prop) - GAIN_MIN_DB) / (GAIN_MAX_DB - GAIN_MIN_DB)
    gain = np.clip(gain, 0.0, 1.0)
    gain[buildings] = 0.0
    return gain.astype(np.float32)


def city(seed: int, map_id: int, size: int = NATIVE_SIZE) -> np.ndarray:
    """The building mask of synthetic map `map_id` (deterministic from `seed`)."""
    return random_city(np.random.default_rng([seed, map_id]), size)


def sample(seed: int, map_id: int, tx: int, buildings: np.ndarray | None = None,
           prop: Propagation = Propagation()) -> dict[str, np.ndarray]:
    """Transmitter `tx` of map `map_id`: `image` (gain), `buildings`, `tx`, on 8-bit levels."""
    if buildings is None:
        buildings = city(seed, map_id)
    pos = place_transmitter(np.random.default_rng([seed, map_id, 1 + tx]), buildings)
    tx_image = np.zeros(buildings.shape, dtype=np.float32)
    tx_image[pos] = 1.0
    gain = np.round(path_gain(buildings, pos, prop) * 255.0) / 255.0  # as the PNGs store it
    return {"image": gain.astype(np.float32), "buildings": buildings.astype(np.float32),
            "tx": tx_image}


class SyntheticRadioMaps(RadioMapDataset):
    """Synthetic maps generated on first use; kept in memory (per DataLoader worker) when the
    whole split fits in `cache_bytes`, else regenerated on every access (same values).

    The cache holds the native maps as uint8 gray levels: every synthetic value is a multiple
    of 1/255 (the gain is quantised as the PNGs store it; buildings and transmitter are 0/1),
    so this is lossless and a 2,864-map split takes 563 MB instead of 2.25 GB in float32.
    Generating a map costs ~30 ms, a tenth of a CPU training step on 4 maps."""

    def __init__(self, map_ids: list[int], num_tx: int, image_size: Size = "native",
                 hflip: bool = False, seed: int = 42, cache_bytes: int = 2 ** 30,
                 crop: tuple[int, int] | None = None):
        super().__init__(map_ids, num_tx, image_size, hflip, seed, crop)
        self.cached = len(self) * 3 * NATIVE_SIZE * NATIVE_SIZE <= cache_bytes
        self._cities: dict[int, np.ndarray] = {}
        self._levels: dict[tuple[int, int], dict[str, np.ndarray]] = {}

    def load(self, map_id: int, tx: int) -> dict[str, np.ndarray]:
        if (map_id, tx) in self._levels:
            # float64 then float32, exactly as `sample` computes the gain
            return {k: (v / 255.0).astype(np.float32) for k, v in self._levels[map_id, tx].items()}
        if map_id not in self._cities:
            self._cities[map_id] = city(self.seed, map_id)
        arrays = sample(self.seed, map_id, tx, self._cities[map_id])
        if self.cached:
            self._levels[map_id, tx] = {k: np.round(v * 255.0).astype(np.uint8)
                                        for k, v in arrays.items()}
        return arrays


def write_radiomapseer(out: str | Path, num_maps: int, num_tx: int, seed: int = 42) -> int:
    """Write maps 1..num_maps in RadioMapSeer's layout (gain/DPM only); returns files written."""
    out = Path(out)
    dirs = {"buildings": out / "png/buildings_complete", "tx": out / "png/antennas",
            "image": out / "gain/DPM"}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    written = 0
    for map_id in range(1, num_maps + 1):
        buildings = city(seed, map_id)
        write_png(dirs["buildings"] / f"{map_id}.png", buildings.astype(np.float32))
        for tx in range(num_tx):
            item = sample(seed, map_id, tx, buildings)
            write_png(dirs["tx"] / f"{map_id}_{tx}.png", item["tx"])
            write_png(dirs["image"] / f"{map_id}_{tx}.png", item["image"])
            written += 2
        written += 1
    return written
