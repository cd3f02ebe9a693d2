"""Inference backends behind one interface: torch (from a checkpoint), onnxruntime (from an export).

Both take and give CPU float32 tensors in the network's conventions: maps in [-1, 1]
[N, 1, H, W], posterior moments and latents [N, z, H/f, W/f]. Both run a call through
overlapping, blended tiles when given a `Tiler` (runtime/tiling.py), for that call only.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Protocol

import numpy as np
import torch

from model.config import ModelConfig, from_dict
from model.loading import load
from runtime.decision import PathRequest, choose, engines
from runtime.inference import InferenceModel
from runtime.tiling import Tiler

from .logs import LOGGER
from .spec import ModelSpec

logger = logging.getLogger(LOGGER)


class Backend(Protocol):
    def encode(self, x: torch.Tensor, tiler: Optional[Tiler] = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Maps [N, 1, H, W] in [-1, 1] -> posterior (mean, logvar) [N, z, h, w]."""

    def decode(self, z: torch.Tensor, tiler: Optional[Tiler] = None) -> torch.Tensor:
        """Latents [N, z, h, w] -> maps [N, 1, H, W] in the network's [-1, 1] range."""

    def describe(self) -> dict[str, str]:
        """Backend, provider and device, for /info and the logs."""


class TorchBackend:
    """The checkpoint's AutoencoderKL through runtime.inference, on the path the recorded
    decision names for this worker's endpoint `op`: runtime.decision.choose() decides from the
    request `path` / `precision` (--path, --precision) built here; this class has no policy of
    its own. /reconstruct runs the encoder's path then the decoder's, so /encode then /decode
    gives its bits."""

    def __init__(self, spec: ModelSpec, device: str, precision: str = "auto",
                 path: str = "auto", size: Optional[tuple[int, int]] = None,
                 budget_s: float = 60.0, op: str = "reconstruct",
                 allow_inaccurate: bool = False):
        config = from_dict(ModelConfig, spec.model_config, "model")
        model = load(spec.path, config).model
        request = PathRequest(tuple(size or spec.config_size), path, precision,
                              allow_inaccurate=allow_inaccurate, budget_s=budget_s)
        self.decision = choose(model, device, request)
        ops = ("encode", "decode") if op == "reconstruct" else (op,)
        self.engines = engines(self.decision, model, device, ops)
        self.device = torch.device(device)

    def encode(self, x: torch.Tensor, tiler: Optional[Tiler] = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        engine = self.engines["encode"]
        with _tiling(engine, tiler):
            posterior = engine.encode(x)
        return posterior.mean.cpu(), posterior.logvar.cpu()

    def decode(self, z: torch.Tensor, tiler: Optional[Tiler] = None) -> torch.Tensor:
        engine = self.engines["decode"]
        with _tiling(engine, tiler):
            return engine.decode(z).cpu()

    def describe(self) -> dict[str, str]:
        paths = [self.decision.path(op) for op in self.engines]
        return {"backend": "torch", "provider": f"torch {torch.__version__}",
                "device": str(self.device), "precision": " -> ".join(dict.fromkeys(paths)),
                "decision": self.decision.report()}


@contextmanager
def _tiling(engine: InferenceModel, tiler: Optional[Tiler]) -> Iterator[None]:
    """InferenceModel.enable_tiling for the duration of one call (nothing without a tiler)."""
    if tiler is None:
        yield
        return
    engine.enable_tiling(tiler.tile, tiler.overlap)
    try:
        yield
    finally:
        engine.disable_tiling()


class OnnxBackend:
    """The export's encoder and decoder graphs in onnxruntime sessions (float32 in and out)."""

    def __init__(self, spec: ModelSpec, device: str, require_cuda: bool = False,
                 threads: int = 0):
        import onnxruntime as ort  # only deployments serving an export need it

        providers: list = ["CPUExecutionProvider"]
        if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            index = int(device.split(":")[1]) if ":" in device else 0
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": index}))
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        root = Path(spec.path)
        self.encoder, self.decoder = (
            ort.InferenceSession(str(root / spec.graph_files[name]), options, providers=providers)
            for name in ("encoder", "decoder"))
        # onnxruntime-gpu falls back to CPU silently when CUDA cannot load: read what runs.
        self.provider = self.encoder.get_providers()[0]
        self.device, self.precision = device, spec.precision
        if device.startswith("cuda") and self.provider != "CUDAExecutionProvider":
            message = (f"onnxruntime cannot run on {device} (available providers: "
                       f"{', '.join(ort.get_available_providers())}; install onnxruntime-gpu)")
            if require_cuda:
                raise RuntimeError(message)
            logger.warning("%s; serving on CPU", message)
            self.device = "cpu"
        logger.info("onnxruntime provider in use: %s", self.provider)

    def encode(self, x: torch.Tensor, tiler: Optional[Tiler] = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if tiler is None:
            return self._moments(x)
        # The tiles' moments are blended as InferenceModel blends them: mean and logvar alike.
        moments = tiler.encode(lambda t: torch.cat(self._moments(t), 1), x)
        return tuple(moments.chunk(2, dim=1))

    def decode(self, z: torch.Tensor, tiler: Optional[Tiler] = None) -> torch.Tensor:
        return tiler.decode(self._image, z) if tiler else self._image(z)

    def _moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, logvar = self.encoder.run(["mean", "logvar"], {"image": _array(x)})
        return _tensor(mean), _tensor(logvar)

    def _image(self, z: torch.Tensor) -> torch.Tensor:
        (image,) = self.decoder.run(["image"], {"latent": _array(z)})
        return _tensor(image)

    def describe(self) -> dict[str, str]:
        return {"backend": "onnx", "provider": self.provider, "device": self.device,
                "precision": self.precision}


def _array(t: torch.Tensor) -> np.ndarray:
    """`t` as a C-contiguous float32 array (a tile, a strided view of its map, is copied)."""
    return np.ascontiguousarray(t.numpy(), dtype=np.float32)


def _tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def load_backend(spec: ModelSpec, device: str, precision: str = "auto",
                 require_cuda: bool = False, threads: int = 0, path: str = "auto",
                 size: Optional[tuple[int, int]] = None, budget_s: float = 60.0,
                 op: str = "reconstruct", allow_inaccurate: bool = False) -> Backend:
    """The backend `spec` names, on `device` ('cpu', 'cuda:0', ...), the torch one on `path`
    tuned at `size`; torch threads are set by the caller (torch.set_num_threads is
    process-wide)."""
    if spec.backend == "onnx":
        return OnnxBackend(spec, device, require_cuda, threads)
    return TorchBackend(spec, device, precision, path, size, budget_s, op, allow_inaccurate)
