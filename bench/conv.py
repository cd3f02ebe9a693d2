"""`python -m bench.conv`: one 3x3 convolution, NNPACK's Winograd kernel (runtime/fast_layers.py's
WinogradConv2d) against torch's default CPU convolution (oneDNN), per layer shape, batch 1,
fp32 inference: where NNPACK wins by layer shape and map size on this CPU (WinogradConv2d measures
the same race per layer at run time).

The default shapes are every 3x3 layer shape of the tiny model (quickstart.yaml: 32-128
channels, 64x64 maps) and of the full one (first_radio.yaml: 128-512 channels, 320x320).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from runtime.fast_layers import winograd_available

from .common import MEASUREMENTS, bench_parser, machine, markdown_table, median_time, write_json

# (in channels, out channels, height = width)
SHAPES = [(32, 32, 64), (32, 64, 32), (64, 64, 32), (64, 128, 16), (128, 128, 16),
          (64, 128, 32), (64, 64, 64), (128, 128, 32), (32, 32, 160), (64, 64, 128),
          (128, 128, 40), (128, 128, 80), (128, 128, 160), (128, 128, 320), (128, 256, 160),
          (256, 256, 160), (256, 512, 80), (512, 512, 80)]
COLUMNS = ["c_in", "c_out", "size", "mmacs", "onednn_ms", "winograd_ms", "speedup"]


def build_parser() -> argparse.ArgumentParser:
    p = bench_parser("conv", __doc__)
    p.add_argument("--threads", type=int, default=2, help="default %(default)s")
    p.add_argument("--repeats", type=int, default=7, help="default %(default)s")
    p.add_argument("--json", type=Path, default=MEASUREMENTS / "conv.json")
    return p


def measure(c_in: int, c_out: int, size: int, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, c_in, size, size, generator=gen)
    w = torch.randn(c_out, c_in, 3, 3, generator=gen) / (3 * c_in ** 0.5)
    b = torch.randn(c_out, generator=gen)
    with torch.inference_mode():
        onednn = median_time(lambda: F.conv2d(x, w, b, padding=1), 2, repeats)["median_s"]
        nnpack = median_time(lambda: torch._nnpack_spatial_convolution(x, w, b, [1, 1], [1, 1]),
                             2, repeats)["median_s"]
    return {"c_in": c_in, "c_out": c_out, "size": size,
            "mmacs": c_in * c_out * size * size / 1e6,  # per kernel tap: the size measure
            "onednn_ms": 1e3 * onednn,
            "winograd_ms": 1e3 * nnpack, "speedup": onednn / nnpack}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not winograd_available():
        raise SystemExit("this torch build has no working NNPACK: nothing to compare")
    torch.set_num_threads(args.threads)
    rows = [measure(*shape, args.repeats) for shape in SHAPES]
    m = machine()
    print(f"# 3x3 conv, batch 1, fp32, {args.threads} threads\n{m['date']}  {m['cpu']}\n")
    print(markdown_table(rows, COLUMNS))
    payload = {"machine": m, "threads": args.threads, "results": rows}
    print(f"\nwrote {write_json(args.json, payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
