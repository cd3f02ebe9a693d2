"""What is being served: the model's geometry and source, and the limits on what it accepts."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from model.autoencoder import check_network_size
from model.checkpoint import CheckpointError
from model.config import to_dict
from model.loading import choose_weights, read_file
from model.manifest import MANIFEST_NAME, read_manifest
from runtime.tiling import Tiler

from .settings import Settings


class ModelSourceError(ValueError):
    """--model does not name something this server can load; the message says what was expected."""


@dataclass(frozen=True)
class ModelSpec:
    """Geometry and provenance of the served autoencoder, known before any worker starts."""
    backend: Literal["onnx", "torch"]
    path: str
    downsample_factor: int
    latent_channels: int
    scale_factor: float
    model_config: dict[str, Any]
    precision: str = "fp32"
    graph_files: dict[str, str] = field(default_factory=dict)  # onnx: "encoder"/"decoder" -> file
    # Where scale_factor comes from, and the per-channel latent statistics (None without them).
    scale_factor_source: str = "config"
    latents_mean: Optional[list[float]] = None
    latents_std: Optional[list[float]] = None

    def scaling(self) -> dict[str, Any]:
        """scale_factor, its source, latents_mean and latents_std, for /info."""
        return {"scale_factor": self.scale_factor, "scale_factor_source": self.scale_factor_source,
                "latents_mean": self.latents_mean, "latents_std": self.latents_std}

    @property
    def config_size(self) -> tuple[int, int]:
        """The (H, W) the model was configured for (used for the warm-up)."""
        res = self.model_config["ddconfig"]["resolution"]
        return (res, res) if isinstance(res, int) else (int(res[0]), int(res[1]))


@dataclass(frozen=True)
class Limits:
    """What a request may hold."""
    max_body_bytes: int
    max_pixels: int
    max_request_maps: int
    resolution: Optional[tuple[int, int]] = None
    factor: int = field(default=1)
    max_tiled_pixels: int = 4096 * 4096  # H*W limit of a tiled map (at least max_pixels)
    tiler: Tiler = field(default_factory=Tiler)  # how tiled requests are cut (--tile ...)

    def accepted(self) -> str:
        """The accepted map sizes, in words, for error messages and /info."""
        if self.resolution:
            return f"{self.resolution[0]}x{self.resolution[1]} maps only"
        return (f"HxW maps with H and W multiples of {self.factor} and H*W <= {self.max_pixels}")

    def tiling(self) -> str:
        """How larger maps are served, in words, for error messages and the OpenAPI text."""
        return (f"larger maps are tiled ({self.tiler.tile}x{self.tiler.tile} tiles overlapping "
                f"by {self.tiler.overlap}) up to H*W <= {self.max_tiled_pixels} "
                "(--max-tiled-pixels)")


def limits_of(settings: Settings, spec: ModelSpec) -> Limits:
    if settings.resolution:
        h, w = settings.resolution
        f = spec.downsample_factor
        if h % f or w % f:
            raise ModelSourceError(f"--resolution {h} {w}: both must be multiples of the model's "
                                   f"downsampling factor {f}")
    return Limits(settings.max_body_bytes, settings.max_pixels, settings.max_request_maps,
                  settings.resolution, spec.downsample_factor,
                  max(settings.max_tiled_pixels, settings.max_pixels), _tiler(settings, spec))


def _tiler(settings: Settings, spec: ModelSpec) -> Tiler:
    """--tile and --tile-overlap; by default tiles of the size the model was trained at (a
    model trained at 64x64 is not asked for 256x256 passes, whose attention costs it 2.6x
    more per pixel), overlapping by half a tile; both defaults rounded down to the downsampling
    factor's multiples (a configured resolution need not be one)."""
    f = spec.downsample_factor
    tile = settings.tile or max(f, min(spec.config_size) // f * f)
    overlap = tile // 2 // f * f if settings.tile_overlap is None else settings.tile_overlap
    try:
        return Tiler(tile, overlap, spec.downsample_factor)
    except ValueError as err:
        raise ModelSourceError(f"--tile {tile} --tile-overlap {overlap}: {err}") from None


def describe_model(settings: Settings) -> ModelSpec:
    """Read what --model names (export dir, checkpoint, run dir) without building the network."""
    path = Path(settings.model)
    is_export = path.is_dir() and (path / MANIFEST_NAME).is_file()
    backend = settings.backend or ("onnx" if is_export else "torch")
    if backend == "onnx":
        if not is_export:
            raise ModelSourceError(f"{path}: the onnx backend needs an export directory holding "
                                   f"{MANIFEST_NAME} (run: python -m export --ckpt CKPT --out DIR)")
        return _from_export(path)
    if is_export:
        raise ModelSourceError(f"{path}: is an ONNX export directory; the torch backend needs a "
                               "checkpoint file or a run directory holding model-N.pt")
    return _from_checkpoint(path, settings.config)


def _from_checkpoint(path: Path, config: Optional[str]) -> ModelSpec:
    try:  # the weights the workers load (model/loading.py's rule), finite, and their scaling
        chosen = choose_weights(read_file(path), config)
        cfg = chosen.config
        check_network_size(cfg)  # before any worker allocates it
    except CheckpointError as err:
        raise ModelSourceError(str(err)) from None
    scaling = chosen.scaling
    return ModelSpec("torch", str(chosen.path), cfg.ddconfig.downsample_factor, cfg.embed_dim,
                     scaling["scale_factor"], to_dict(cfg),
                     scale_factor_source=scaling["scale_factor_source"],
                     latents_mean=scaling["latents_mean"], latents_std=scaling["latents_std"])


def _from_export(path: Path) -> ModelSpec:
    manifest = read_manifest(path)  # also checks each graph file against its SHA-256
    return ModelSpec("onnx", str(path), manifest["downsample_factor"],
                     manifest["latent_channels"], float(manifest["scale_factor"]),
                     manifest["model_config"], manifest["precision"],
                     {name: manifest[name]["file"] for name in ("encoder", "decoder")},
                     manifest.get("scale_factor_source", "manifest"),
                     manifest.get("latents_mean"), manifest.get("latents_std"))
