"""Inference fast paths: `prepare_for_inference(model, device)` returns an `InferenceModel`
whose defaults are the fastest path measured accurate (PSNR >= 50 dB against the plain fp32
output) on that kind of device; bench/RESULTS.md holds the measurements.

Paths (each an `InferenceOptions` field):
- `winograd` (CPU): every 3x3 stride-1 convolution runs through NNPACK's Winograd kernels,
  which need several times fewer multiplications than direct convolution. fp32 throughout.
- `fused_attention`: the mid-block attention computes q, k, v as one matmul each in a
  [N, HW, C] layout, which scaled_dot_product_attention runs with its fused (flash) kernel;
  the network's own [N, 1, HW, C]-transposed views send it to the unfused math kernel.
- `channels_last`: NHWC activations and weights (oneDNN / cuDNN favour them).
- `precision`: `bf16` / `fp16` autocast. A CPU without AVX-512 BF16 emulates bf16 and is
  far slower than fp32, so no CPU default uses it.
- `reuse_memory` (CPU, glibc): malloc keeps freed blocks for reuse. By default glibc hands
  every block over 32 MiB back to the OS and the next tensor of that size page-faults its
  memory in again, which costs activations of full-size maps more than the arithmetic on them.
  Process-wide (see `malloc_reuse`); the process then keeps up to 1 GiB of freed memory.
- `compile` / `cuda_graphs`: torch.compile of the encoder and decoder (CUDA graphs through
  mode="reduce-overhead"); compiling takes tens of seconds, so they are opt-in.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import platform
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .autoencoder import AutoencoderKL
from .blocks import AttnBlock
from .distributions import DiagonalGaussianDistribution

Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16,
                                             "fp16": torch.float16}


@dataclass(frozen=True)
class InferenceOptions:
    """Which fast paths an InferenceModel uses."""
    precision: Precision = "fp32"
    channels_last: bool = False
    winograd: bool = False
    fused_attention: bool = False
    reuse_memory: bool = False
    compile: bool = False
    cuda_graphs: bool = False

    def describe(self) -> str:
        """A short label, e.g. 'fp32+winograd'."""
        flags = [name for name in ("winograd", "fused_attention", "reuse_memory",
                                   "channels_last", "compile", "cuda_graphs")
                 if getattr(self, name)]
        return "+".join([self.precision, *flags])


def default_options(device: str | torch.device) -> InferenceOptions:
    """The fastest accurate path measured on this kind of device (see bench/RESULTS.md).

    CPU: Winograd (NNPACK) convolutions when this torch build has NNPACK, fused attention,
    malloc reuse under glibc, fp32.
    CUDA: fp32 + channels_last; no GPU was measured yet, so no lower precision is assumed.
    """
    device = torch.device(device)
    if device.type == "cpu":
        return InferenceOptions(winograd=winograd_available(), fused_attention=True,
                                reuse_memory=glibc() is not None)
    return InferenceOptions(channels_last=True)


@functools.lru_cache(maxsize=1)
def winograd_available() -> bool:
    """NNPACK is in this torch build and agrees with the reference convolution on a probe."""
    # _nnpack_available() also initialises NNPACK; without that call every NNPACK conv fails.
    if not torch._nnpack_available():
        return False
    gen = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(s, generator=gen) for s in ((2, 8, 12, 12), (8, 8, 3, 3), (8,)))
    with torch.no_grad():
        try:
            fast = torch._nnpack_spatial_convolution(x, w, b, [1, 1], [1, 1])
        except RuntimeError:
            return False
        return torch.allclose(fast, F.conv2d(x, w, b, padding=1), rtol=1e-4, atol=1e-4)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (glibc malloc.h)
REUSE_BYTES = 1 << 30
GLIBC_MMAP_MAX = 32 << 20  # where glibc's dynamic mmap threshold stops growing


@functools.lru_cache(maxsize=1)
def glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (mallopt, malloc_trim), else None."""
    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def malloc_reuse(enabled: bool) -> bool:
    """Process-wide: glibc keeps up to 1 GiB of freed memory for reuse (enabled), or behaves as
    in its steady state by default (blocks over 32 MiB mapped and unmapped per allocation, the
    heap trimmed past 64 MiB free). Returns False where the C library is not glibc."""
    libc = glibc()
    if libc is None:
        return False
    mmap, trim = (REUSE_BYTES, REUSE_BYTES) if enabled else (GLIBC_MMAP_MAX, 2 * GLIBC_MMAP_MAX)
    done = libc.mallopt(_M_MMAP_THRESHOLD, mmap) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, trim) == 1
    if not enabled:
        libc.malloc_trim(0)
    return done


class WinogradConv2d(nn.Conv2d):
    """A 3x3, stride-1, padding-1 Conv2d that runs NNPACK's Winograd kernel on CPU float32
    inputs and the ordinary convolution otherwise (GPU, other dtypes, autograd)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.dtype != torch.float32 or torch.is_grad_enabled():
            return super().forward(x)
        return torch._nnpack_spatial_convolution(x.contiguous(), self.weight, self.bias,
                                                 [1, 1], [1, 1])

    @classmethod
    def eligible(cls, conv: nn.Module) -> bool:
        return (type(conv) is nn.Conv2d and conv.kernel_size == (3, 3)
                and conv.stride == (1, 1) and conv.padding == (1, 1)
                and conv.dilation == (1, 1) and conv.groups == 1
                and conv.padding_mode == "zeros")

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> WinogradConv2d:
        """A WinogradConv2d sharing `conv`'s parameters (state-dict names unchanged)."""
        new = cls(conv.in_channels, conv.out_channels, 3, padding=1, bias=conv.bias is not None,
                  device="meta")
        new.weight = conv.weight
        new.bias = conv.bias
        return new


def use_winograd(module: nn.Module) -> int:
    """Swap every eligible 3x3 conv in `module` for a WinogradConv2d, in place; returns how many."""
    swapped = 0
    for name, child in module.named_children():
        if WinogradConv2d.eligible(child):
            setattr(module, name, WinogradConv2d.from_conv(child))
            swapped += 1
        else:
            swapped += use_winograd(child)
    return swapped


class FusedAttention(nn.Module):
    """AttnBlock's computation with its parameters (same state-dict names), laid out so that
    scaled_dot_product_attention takes its fused kernel."""

    def __init__(self, block: AttnBlock):
        super().__init__()
        self.norm, self.q, self.k, self.v = block.norm, block.q, block.k, block.v
        self.proj_out = block.proj_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        y = self.norm(x).flatten(2).transpose(1, 2)  # [N, HW, C], a view
        q, k, v = (F.linear(y, p.weight.view(c, c), p.bias)[:, None]
                   for p in (self.q, self.k, self.v))  # [N, 1, HW, C], C contiguous
        out = F.scaled_dot_product_attention(q, k, v)[:, 0]
        out = F.linear(out, self.proj_out.weight.view(c, c), self.proj_out.bias)
        return x + out.transpose(1, 2).reshape(n, c, h, w)


def use_fused_attention(module: nn.Module) -> int:
    """Swap every AttnBlock in `module` for a FusedAttention, in place; returns how many."""
    swapped = 0
    for name, child in module.named_children():
        if type(child) is AttnBlock:
            setattr(module, name, FusedAttention(child))
            swapped += 1
        else:
            swapped += use_fused_attention(child)
    return swapped


class InferenceModel:
    """An AutoencoderKL prepared for inference: float32 in, float32 NCHW out, no autograd.

    encode(x) -> posterior, decode(z) -> image, reconstruct(x) = decode(encode(x).mode()),
    with maps in the network's [-1, 1] range, on any device (inputs are moved to `device`).
    """

    def __init__(self, model: AutoencoderKL, device: torch.device, options: InferenceOptions):
        self.model, self.device, self.options = model, device, options
        self._encoder, self._decoder = model.encoder, model.decoder
        if options.compile or options.cuda_graphs:
            mode = "reduce-overhead" if options.cuda_graphs else None
            self._encoder = torch.compile(model.encoder, mode=mode)
            self._decoder = torch.compile(model.decoder, mode=mode)

    def _autocast(self) -> contextlib.AbstractContextManager:
        dtype = PRECISIONS[self.options.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def _input(self, t: torch.Tensor) -> torch.Tensor:
        fmt = torch.channels_last if self.options.channels_last else torch.contiguous_format
        return t.to(self.device, torch.float32).contiguous(memory_format=fmt)

    @torch.inference_mode()
    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """Maps [N, C, H, W] -> the posterior over latents (float32)."""
        with self._autocast():
            moments = self.model.quant_conv(self._encoder(self._input(x)))
        return DiagonalGaussianDistribution(moments.float().contiguous())

    @torch.inference_mode()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents [N, z, h, w] -> maps [N, C, h*f, w*f] (float32, NCHW)."""
        with self._autocast():
            image = self._decoder(self.model.post_quant_conv(self._input(z)))
        return image.float().contiguous()

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """decode(encode(x).mode())."""
        return self.decode(self.encode(x).mode())

    __call__ = reconstruct


def _check(options: InferenceOptions, device: torch.device) -> None:
    if options.precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, "
                         f"got {options.precision!r}")
    if options.winograd and device.type != "cpu":
        raise ValueError(f"winograd is a CPU path (NNPACK); device is {device}")
    if options.winograd and not winograd_available():
        raise RuntimeError("winograd=True but this torch build has no working NNPACK "
                           "(torch._nnpack_available() is False); use winograd=False")
    if options.cuda_graphs and device.type != "cuda":
        raise ValueError(f"cuda_graphs needs a CUDA device; device is {device}")
    if options.reuse_memory and glibc() is None:
        raise RuntimeError("reuse_memory=True needs glibc malloc (Linux); use reuse_memory=False")


def prepare_for_inference(model: AutoencoderKL, device: str | torch.device = "cpu",
                          **overrides: object) -> InferenceModel:
    """Move `model` to `device` in eval mode and apply the fast paths, IN PLACE (like
    `model.to`); `overrides` are InferenceOptions fields replacing the device's defaults."""
    device = torch.device(device)
    unknown = sorted(set(overrides) - set(InferenceOptions.__dataclass_fields__))
    if unknown:
        raise TypeError(f"unknown inference option {unknown[0]!r}; expected one of "
                        f"{sorted(InferenceOptions.__dataclass_fields__)}")
    options = replace(default_options(device), **overrides)
    _check(options, device)
    model = model.eval().to(device)
    if options.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if options.winograd:
        use_winograd(model)
    if options.fused_attention:
        use_fused_attention(model)
    if options.reuse_memory:
        malloc_reuse(True)
    return InferenceModel(model, device, options)
