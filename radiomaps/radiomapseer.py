"""RadioMapSeer read from its published folder layout (Levie et al., RadioUNet, 2021).

    ROOT/png/buildings_complete/{map}.png    buildings 255, elsewhere 0
    ROOT/png/antennas/{map}_{tx}.png          255 at the transmitter, elsewhere 0
    ROOT/png/cars/{map}.png                   cars 255 (only read with data.cars: true)
    ROOT/gain/{DPM,IRT2,IRT4}/{map}_{tx}.png  path gain, pixel / 255
    ROOT/gain/cars{DPM,IRT2,IRT4}/{map}_{tx}.png  the same simulations with cars

701 maps (0..700; upstream reads 1..700), 80 transmitters per map (IRT4: 2), 256x256 8-bit PNGs.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from model.config import ConfigError
from model.io import RadioMapError, read_png

from .base import RadioMapDataset, Size

MAX_TX = {"DPM": 80, "IRT2": 80, "IRT4": 2}
LAYOUT = ("expected the RadioMapSeer layout: ROOT/png/buildings_complete/{map}.png, "
          "ROOT/png/antennas/{map}_{tx}.png, ROOT/gain/{DPM|IRT2|IRT4}/{map}_{tx}.png "
          "(ROOT/gain/cars{DPM|IRT2|IRT4}/ and ROOT/png/cars/{map}.png with data.cars: true)")


class DataError(ValueError):
    """The dataset on disk is missing, incomplete or corrupt; the message names the path."""


class RadioMapSeer(RadioMapDataset):
    """RadioMapSeer gain maps with their building and transmitter images."""

    def __init__(self, root: str | Path, map_ids: list[int], num_tx: int = 80,
                 simulation: str = "DPM", cars: bool = False, image_size: Size = "native",
                 hflip: bool = False, seed: int = 42, crop: tuple[int, int] | None = None):
        if not root:
            raise DataError(f"data.root: the RadioMapSeer folder is required; {LAYOUT}")
        if simulation not in MAX_TX:
            raise ConfigError(f"data.simulation must be one of {list(MAX_TX)}, "
                              f"got {simulation!r}")
        if num_tx > MAX_TX[simulation]:
            raise ConfigError(f"data.num_tx={num_tx}: {simulation} has {MAX_TX[simulation]} "
                              f"transmitters per map; set data.num_tx <= {MAX_TX[simulation]}")
        super().__init__(map_ids, num_tx, image_size, hflip, seed, crop)
        self.root = Path(root)
        self.dirs = {
            "image": self.root / "gain" / (f"cars{simulation}" if cars else simulation),
            "buildings": self.root / "png" / "buildings_complete",
            "tx": self.root / "png" / "antennas",
        }
        if cars:
            self.dirs["cars"] = self.root / "png" / "cars"
        self._check_files()

    def names(self, map_id: int, tx: int) -> dict[str, str]:
        """File names (inside `self.dirs`) behind one item."""
        return {k: f"{map_id}.png" if k in ("buildings", "cars") else f"{map_id}_{tx}.png"
                for k in self.dirs}

    def paths(self, map_id: int, tx: int) -> dict[str, Path]:
        """The files behind one item."""
        return {k: self.dirs[k] / name for k, name in self.names(map_id, tx).items()}

    def _check_files(self) -> None:
        """Fail now, not hours into training, if a folder or file is missing."""
        if not self.root.is_dir():
            raise DataError(f"{self.root}: RadioMapSeer folder not found; {LAYOUT}")
        listing = {}
        for key, d in self.dirs.items():
            if not d.is_dir():
                raise DataError(f"{d}: folder not found; {LAYOUT}")
            listing[key] = set(os.listdir(d))
        missing = sorted({self.dirs[k] / name for i in range(len(self))
                          for k, name in self.names(*self.locate(i)).items()
                          if name not in listing[k]})
        if missing:
            raise DataError(f"{missing[0]}: file not found ({len(missing)} of this split's "
                            f"files are missing; data.num_maps / data.num_tx may exceed what "
                            f"is on disk); {LAYOUT}")

    def load(self, map_id: int, tx: int) -> dict[str, np.ndarray]:
        arrays = {}
        for key, path in self.paths(map_id, tx).items():
            try:
                arrays[key] = read_png(path)
            except RadioMapError as err:
                raise DataError(f"{err}; {LAYOUT}") from None
        shapes = {k: a.shape for k, a in arrays.items()}
        if len(set(shapes.values())) > 1:
            raise DataError(f"map {map_id}, transmitter {tx}: images differ in size {shapes} "
                            f"({', '.join(str(p) for p in self.paths(map_id, tx).values())})")
        return arrays
