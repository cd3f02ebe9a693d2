"""Inference fast paths: `prepare_for_inference(model, device, **options)` returns an
`InferenceModel` running exactly the options given; every option left out is off, so with none
it is the plain fp32 network (eager, contiguous NCHW) on every machine. This module holds no
policy: which path a machine runs is chosen by measurement and recorded, in one place
(runtime/decision.py `choose`).

Paths (each an `InferenceOptions` field):
- `winograd` (CPU): 3x3 stride-1 convolutions run through NNPACK's Winograd kernels, which
  need several times fewer multiplications than direct convolution, in each layer and at each
  input size where that measured faster than oneDNN (timed on first use; wide layers on large
  maps win, thin layers and small maps keep oneDNN). fp32 throughout.
- `matmul_1x1` (CPU): 1x1 convolutions as one matrix product per map.
  The Winograd and 1x1 layers are in runtime/fast_layers.py.
- `channels_last`: NHWC activations and weights (oneDNN / cuDNN favour them).
- `precision`: `bf16` / `fp16` autocast. A CPU without AVX-512 BF16 emulates bf16 and is
  far slower than fp32, so bf16 is a CPU candidate only where it is native. bf16's 8-bit
  mantissa may cost too much accuracy (~42 dB against fp32 on an H200, bench/RESULTS.md), which
  the accuracy gate measures per weights; fp16 overflows past 65504, so an fp16 output holding
  inf or NaN is recomputed in fp32 (with a warning).
- `onednn_bf16` (CPU with AVX512-BF16 / AMX): convolutions and matrix products stay fp32 for
  the network but oneDNN computes them from bf16-rounded inputs on the bf16 units
  (torch.backends.mkldnn fp32_precision "bf16"), accumulating and storing in fp32; activations,
  norms and additions stay fp32. Much more accurate than bf16 autocast (first_radio decode 50.8
  vs 45.6 dB), much less of its speed (1.2x vs 6x); set for each call only.
- `reuse_memory` (CPU, glibc): malloc keeps freed blocks for reuse instead of unmapping them
  (runtime/malloc.py). Process-wide; the process then keeps up to 1 GiB of freed memory.
- `compile` / `cuda_graphs`: torch.compile of the encoder and decoder (CUDA graphs through
  mode="reduce-overhead"; on CPU with inductor's freezing); compiling takes tens of seconds,
  so they are opt-in (never autotune candidates).
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, replace
from typing import Callable, Literal

import torch
from torch import nn

from model.autoencoder import AutoencoderKL
from model.distributions import DiagonalGaussianDistribution

from .fast_layers import use_matmul_1x1, use_winograd, winograd_available
from .malloc import glibc, malloc_reuse
from .tiling import Tiler

logger = logging.getLogger(__name__)
Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16,
                                             "fp16": torch.float16}


@dataclass(frozen=True)
class InferenceOptions:
    """Which fast paths an InferenceModel uses."""
    precision: Precision = "fp32"
    channels_last: bool = False
    winograd: bool = False
    matmul_1x1: bool = False
    onednn_bf16: bool = False
    reuse_memory: bool = False
    compile: bool = False
    cuda_graphs: bool = False

    def describe(self) -> str:
        """A short label, e.g. 'fp32+winograd'."""
        flags = [name for name in ("winograd", "matmul_1x1", "onednn_bf16", "reuse_memory",
                                   "channels_last", "compile", "cuda_graphs")
                 if getattr(self, name)]
        return "+".join([self.precision, *flags])


class InferenceModel:
    """An AutoencoderKL prepared for inference: float32 in, float32 NCHW out, no autograd.

    encode(x) -> posterior, decode(z) -> image, reconstruct(x) = decode(encode(x).mode()),
    with maps in the network's [-1, 1] range, on any device (inputs are moved to `device`).
    """

    def __init__(self, model: AutoencoderKL, device: torch.device, options: InferenceOptions):
        self.model, self.device, self.options = model, device, options
        self.fp32_recomputes = 0  # fp16 batches that overflowed and ran again in fp32
        self.tiler: Tiler | None = None  # enable_tiling()
        self._encoder, self._decoder = model.encoder, model.decoder
        if options.compile or options.cuda_graphs:
            self._encoder = _compiled(model.encoder, device, options)
            self._decoder = _compiled(model.decoder, device, options)

    def _autocast(self) -> contextlib.AbstractContextManager:
        dtype = PRECISIONS[self.options.precision]
        if self.options.onednn_bf16:
            return _onednn_bf16()
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def _input(self, t: torch.Tensor) -> torch.Tensor:
        fmt = torch.channels_last if self.options.channels_last else torch.contiguous_format
        return t.to(self.device, torch.float32).contiguous(memory_format=fmt)

    def _run(self, fn: Callable[[torch.Tensor], torch.Tensor], t: torch.Tensor) -> torch.Tensor:
        """fn(t) at the chosen precision; an fp16 result holding inf/NaN (from finite inputs)
        is recomputed in fp32. The check syncs with the device once per call; the first
        recompute of a compiled path compiles its fp32 graph."""
        with self._autocast():
            out = fn(t)
        if (self.options.precision == "fp16" and not bool(torch.isfinite(out).all())
                and bool(torch.isfinite(t).all())):
            self.fp32_recomputes += 1
            logger.warning("fp16 inference overflowed (inf/NaN): batch recomputed in fp32 "
                           "(%d so far); if this recurs, use precision fp32",
                           self.fp32_recomputes)
            with torch.autocast(self.device.type, enabled=False):
                out = fn(t)
        return out

    def enable_tiling(self, tile: int = 256, overlap: int = 128) -> None:
        """Encode / decode maps larger than `tile` pixels as overlapping, blended tiles
        (runtime/tiling.py); smaller maps are unaffected."""
        self.tiler = Tiler(tile, overlap, self.model.downsample_factor)

    def disable_tiling(self) -> None:
        self.tiler = None

    def _moments(self, x: torch.Tensor) -> torch.Tensor:
        moments = self._run(lambda t: self.model.quant_conv(self._encoder(t)), self._input(x))
        return moments.float()

    def _image(self, z: torch.Tensor) -> torch.Tensor:
        image = self._run(lambda t: self._decoder(self.model.post_quant_conv(t)), self._input(z))
        if self.options.cuda_graphs and image.dtype == torch.float32:
            image = image.clone()  # the graph's output buffer is overwritten by the next call
        return image.float()

    @torch.inference_mode()
    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """Maps [N, C, H, W] -> the posterior over latents (float32)."""
        moments = self.tiler.encode(self._moments, x) if self.tiler else self._moments(x)
        return DiagonalGaussianDistribution(moments.contiguous())

    @torch.inference_mode()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents [N, z, h, w] -> maps [N, C, h*f, w*f] (float32, NCHW)."""
        image = self.tiler.decode(self._image, z) if self.tiler else self._image(z)
        return image.contiguous()

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """decode(encode(x).mode())."""
        return self.decode(self.encode(x).mode())

    __call__ = reconstruct


def _compiled(module: nn.Module, device: torch.device, options: InferenceOptions) -> Callable:
    """torch.compile of `module` for inference; on CPU with inductor's freezing (weights folded
    in as constants, prepacked for oneDNN). Without it, a compiled bf16 + channels_last encoder
    returned all-NaN latents on CPU (torch 2.13, first_radio's family with two ResNet blocks
    per level; tests/test_inference.py), and it is the faster CPU mode."""
    if options.cuda_graphs:
        return torch.compile(module, mode="reduce-overhead")
    compiled = torch.compile(module)
    if device.type != "cpu":
        return compiled
    from torch._inductor import config as inductor_config  # no public switch for freezing

    def frozen(*args: torch.Tensor) -> torch.Tensor:
        # Dynamo reads the flag when it traces (parameters become constants) and inductor when
        # it compiles, both inside a call (a retrace too); `torch.compile(options=...)` reaches
        # only inductor. patch() raises if torch renames the flag.
        with inductor_config.patch(freezing=True):
            return compiled(*args)

    return frozen


@contextlib.contextmanager
def _onednn_bf16():
    """oneDNN computes fp32 convolutions and matmuls from bf16 inputs for the duration (the
    setting is process-wide, so it is restored after each call)."""
    backends = (torch.backends.mkldnn.conv, torch.backends.mkldnn.matmul)
    before = [b.fp32_precision for b in backends]
    for b in backends:
        b.fp32_precision = "bf16"
    try:
        yield
    finally:
        for b, value in zip(backends, before):
            b.fp32_precision = value


def _check(options: InferenceOptions, device: torch.device) -> None:
    if options.precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, "
                         f"got {options.precision!r}")
    if options.onednn_bf16 and (device.type != "cpu" or options.precision != "fp32"):
        raise ValueError("onednn_bf16 is a CPU fp32 path (oneDNN's bf16 units); it does not "
                         "combine with bf16/fp16 autocast or a GPU")
    if options.winograd and device.type != "cpu":
        raise ValueError(f"winograd is a CPU path (NNPACK); device is {device}")
    if options.cuda_graphs and device.type != "cuda":
        raise ValueError(f"cuda_graphs needs a CUDA device; device is {device}")
    if options.winograd and options.compile:
        raise ValueError("winograd does not combine with compile: torch.compile cannot trace "
                         "NNPACK's convolution (it has no fake-tensor kernel); choose one")
    if options.winograd and not winograd_available():
        raise RuntimeError("winograd=True but this torch build has no working NNPACK "
                           "(torch._nnpack_available() is False); use winograd=False")
    if options.reuse_memory and glibc() is None:
        raise RuntimeError("reuse_memory=True needs glibc malloc (Linux); use reuse_memory=False")


def prepare_for_inference(model: AutoencoderKL, device: str | torch.device = "cpu",
                          **overrides: object) -> InferenceModel:
    """Move `model` to `device` in eval mode and apply the fast paths, IN PLACE (like
    `model.to`); `overrides` are the InferenceOptions fields to set, every other one off (no
    overrides: the plain fp32 network). The path a machine should run: runtime/decision.py."""
    device = torch.device(device)
    unknown = sorted(set(overrides) - set(InferenceOptions.__dataclass_fields__))
    if unknown:
        raise TypeError(f"unknown inference option {unknown[0]!r}; expected one of "
                        f"{sorted(InferenceOptions.__dataclass_fields__)}")
    options = replace(InferenceOptions(), **overrides)
    _check(options, device)
    model = model.eval().to(device)
    if options.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if options.winograd:
        use_winograd(model)
    if options.matmul_1x1:
        use_matmul_1x1(model)
    if options.reuse_memory:
        malloc_reuse(True)
    return InferenceModel(model, device, options)
