"""Drop-in replacements for the network's layers that compute the same function faster on
CPU, each sharing the original's parameters (state-dict names unchanged), and the in-place
swap that installs them."""
from __future__ import annotations

import contextlib
import functools
import math
import statistics
import time
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

TIMED_CALLS = 3  # per kernel, when a layer first meets an input size
MIN_TIMED_S = 0.02  # a timed run repeats a shorter call to last about this long


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


def _plain_conv(conv: nn.Module, kernel: int) -> bool:
    return (type(conv) is nn.Conv2d and conv.kernel_size == (kernel, kernel)
            and conv.stride == (1, 1) and conv.padding == (kernel // 2, kernel // 2)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros")


def _share(conv: nn.Conv2d, new: nn.Conv2d) -> nn.Conv2d:
    new.weight, new.bias = conv.weight, conv.bias
    return new


def _fast_here(x: torch.Tensor) -> bool:
    """CPU float32 inference: where the replacements' kernels apply."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled()


def run_seconds(fn: Callable[[], object], on_cpu: bool, repeats: int = 1) -> float:
    """Seconds one call of `fn` takes (the mean of `repeats`) with its cores to itself: on a
    CPU the process's CPU time over torch's threads, capped by the wall time, which another job
    on the machine barely moves (wall time beside a busy 2-thread job was 2-4x the idle figure,
    and what is decided from it is recorded for every later process); elsewhere wall time (a
    CUDA sync may spin a core)."""
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        fn()
    seconds = time.perf_counter() - start
    if on_cpu:
        seconds = min(seconds, (time.process_time() - cpu) / torch.get_num_threads())
    return seconds / repeats


def median_seconds(fn: Callable[[], object], calls: int = TIMED_CALLS,
                   on_cpu: bool = True) -> float:
    """Median seconds (run_seconds) of `calls` timed runs of `fn`, after one untimed warm-up
    call (one-time setup: NNPACK's and oneDNN's primitives, allocations); a timed run repeats a
    call that takes under MIN_TIMED_S until it lasts about that long (a few-millisecond call's
    timing is mostly noise)."""
    fn()
    repeats = math.ceil(MIN_TIMED_S / max(run_seconds(fn, on_cpu), 1e-4))
    return statistics.median(run_seconds(fn, on_cpu, repeats) for _ in range(calls))


def nnpack_is_faster(nnpack: Callable[[], torch.Tensor], onednn: Callable[[], torch.Tensor]
                     ) -> bool:
    """Whether `nnpack()` ran faster than `onednn()` here (medians of TIMED_CALLS each)."""
    return median_seconds(nnpack) < median_seconds(onednn)


_MEASURING = False  # measure_kernels(): layers time NNPACK against oneDNN on unmet sizes


@contextlib.contextmanager
def measure_kernels() -> Iterator[None]:
    """Within it, a WinogradConv2d meeting an input size it has no choice for times both kernels
    and keeps the winner; outside it, such a size runs oneDNN. Only a recorded decision
    (runtime/decision.py) measures, once: every process then loads the same choices and
    computes the same bits."""
    global _MEASURING
    before, _MEASURING = _MEASURING, True
    try:
        yield
    finally:
        _MEASURING = before


class WinogradConv2d(nn.Conv2d):
    """A 3x3, stride-1, padding-1 Conv2d that runs NNPACK's Winograd kernel on CPU float32
    inference inputs at the input sizes where, for this layer, NNPACK measured faster than
    oneDNN's direct convolution, and the ordinary convolution otherwise (other sizes, GPU,
    other dtypes, autograd).

    Winograd needs several times fewer multiplications, which wins on wide layers and large
    maps and loses on thin layers and small maps; where the line falls is a fact of the CPU (on
    a 2-core AVX2 EPYC: 128+ channels and 40x40+ maps; bench/RESULTS.md). The two kernels round
    differently, so the per-layer choice is data: measured under `measure_kernels()` (both
    kernels timed on one map) and recorded (`winograd_plan`), then installed in every process
    that serves the model (`apply_winograd_plan`); a size with no recorded choice runs oneDNN.
    `measured`: size -> NNPACK won."""

    measured: dict[tuple[int, int], bool]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _fast_here(x) or not self._nnpack_wins(x):
            return super().forward(x)
        # One map at a time: for batches NNPACK switches to its training-oriented kernel,
        # measured 2-3x slower per map than its single-map inference kernel.
        maps = [self._nnpack(m) for m in x.contiguous().split(1)]
        return maps[0] if len(maps) == 1 else torch.cat(maps)

    def _nnpack(self, x: torch.Tensor) -> torch.Tensor:
        return torch._nnpack_spatial_convolution(x, self.weight, self.bias, [1, 1], [1, 1])

    def _nnpack_wins(self, x: torch.Tensor) -> bool:
        size = (x.shape[-2], x.shape[-1])
        if size not in self.measured:
            if not _MEASURING:
                return False
            one = x[:1].contiguous()
            try:
                self.measured[size] = nnpack_is_faster(
                    lambda: self._nnpack(one), lambda: self._conv_forward(one, self.weight,
                                                                          self.bias))
            except RuntimeError:  # a shape NNPACK refuses: oneDNN, from now on
                self.measured[size] = False
        return self.measured[size]

    @classmethod
    def eligible(cls, module: nn.Module) -> bool:
        """3x3, stride 1, padding 1 (whether NNPACK is faster is measured, per input size)."""
        return _plain_conv(module, 3)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> WinogradConv2d:
        """A WinogradConv2d sharing `conv`'s parameters."""
        new = _share(conv, cls(conv.in_channels, conv.out_channels, 3, padding=1,
                               bias=conv.bias is not None, device="meta"))
        new.measured = {}
        return new


WinogradPlan = dict[str, list[list[int]]]  # layer name -> the [H, W] sizes where NNPACK runs


def winograd_plan(module: nn.Module) -> WinogradPlan:
    """The per-layer kernel choices `module`'s WinogradConv2d layers hold, as JSON-able data."""
    return {name: sorted([list(size) for size, won in layer.measured.items() if won])
            for name, layer in module.named_modules() if isinstance(layer, WinogradConv2d)}


def apply_winograd_plan(module: nn.Module, plan: WinogradPlan) -> None:
    """Install recorded choices: each WinogradConv2d runs NNPACK at exactly its plan's sizes."""
    layers = {name: layer for name, layer in module.named_modules()
              if isinstance(layer, WinogradConv2d)}
    unknown = sorted(set(plan) - set(layers))
    if unknown:
        raise ValueError(f"the Winograd plan names layers this network lacks: {unknown[:3]}")
    for name, layer in layers.items():
        layer.measured = {tuple(size): True for size in plan.get(name, [])}


class PointwiseConv2d(nn.Conv2d):
    """A 1x1 Conv2d computed as one matrix product per map (oneDNN's 1x1 convolution on NCHW
    inputs runs far below the matmul rate on CPU); keeps the input's memory format."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _fast_here(x):
            return super().forward(x)
        weight = self.weight.view(self.out_channels, self.in_channels)
        if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            return F.linear(x.permute(0, 2, 3, 1), weight, self.bias).permute(0, 3, 1, 2)
        n, c, h, w = x.shape
        out = torch.matmul(weight, x.reshape(n, c, h * w))
        if self.bias is not None:
            out += self.bias[:, None]
        return out.view(n, self.out_channels, h, w)

    @classmethod
    def eligible(cls, module: nn.Module) -> bool:
        return _plain_conv(module, 1)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> PointwiseConv2d:
        """A PointwiseConv2d sharing `conv`'s parameters."""
        return _share(conv, cls(conv.in_channels, conv.out_channels, 1,
                                bias=conv.bias is not None, device="meta"))


def swap(module: nn.Module, eligible: Callable[[nn.Module], bool],
         replace: Callable[[nn.Module], nn.Module]) -> int:
    """Replace every eligible descendant of `module` (outermost first) in place; returns how
    many."""
    swapped = 0
    for name, child in module.named_children():
        if eligible(child):
            setattr(module, name, replace(child))
            swapped += 1
        else:
            swapped += swap(child, eligible, replace)
    return swapped


def use_winograd(module: nn.Module) -> int:
    """3x3 stride-1 convs -> WinogradConv2d; returns how many."""
    return swap(module, WinogradConv2d.eligible, WinogradConv2d.from_conv)


def use_matmul_1x1(module: nn.Module) -> int:
    """1x1 convs -> PointwiseConv2d; returns how many."""
    return swap(module, PointwiseConv2d.eligible, PointwiseConv2d.from_conv)
