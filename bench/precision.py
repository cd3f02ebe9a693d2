"""`python -m bench.precision`: where reduced precision loses accuracy, block by block.

For encode and decode, the network runs under bf16 (or fp16) autocast with one block at a time
kept in fp32 (its input cast to float32, autocast off inside it), and once with none kept; each
output is compared with the plain fp32 network's on synthetic radio maps (PSNR; encode: the
posterior mean over its range, decode: the maps). A block whose fp32 island gains many dB is
where the error comes from; gains spread thinly over every block mean the error accumulates
through the depth of the network instead (docs/performance.md has the table). Two last rows
keep the residual stream in fp32 (every block adds its bf16 branch to an fp32 stream), alone
and with the network's ends and attention in fp32 besides.
"""
from __future__ import annotations

import contextlib
import copy
import sys
from typing import Iterator

import torch
from torch import nn

from model.autoencoder import AutoencoderKL
from model.metrics import psnr

from .common import (MEASUREMENTS, bench_parser, build_model, machine, markdown_table,
                     synthetic_maps, write_json)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def blocks(coder: nn.Module) -> list[tuple[str, nn.Module]]:
    """The coder's blocks in data order: conv_in, each level's res blocks and resampler, the
    mid block's parts, norm_out, conv_out."""
    found = [("conv_in", coder.conv_in)]
    levels = getattr(coder, "down", None) or getattr(coder, "up")
    for i, level in enumerate(levels):
        for j, block in enumerate(level.block):
            found.append((f"{'down' if hasattr(coder, 'down') else 'up'}[{i}].block[{j}]", block))
    found += [(f"mid.{name}", module) for name, module in coder.mid.named_children()]
    found += [("norm_out", coder.norm_out), ("conv_out", coder.conv_out)]
    return found


@contextlib.contextmanager
def fp32_island(module: nn.Module) -> Iterator[None]:
    """`module` computes in float32 while the rest runs under autocast."""
    original = module.forward

    def forward(x, *args, **kwargs):
        with torch.autocast("cpu", enabled=False):
            return original(x.float(), *args, **kwargs)

    module.forward = forward
    try:
        yield
    finally:
        module.forward = original


@contextlib.contextmanager
def fp32_stream(coder: nn.Module, ends: tuple[str, ...] = ()) -> Iterator[None]:
    """The residual stream in float32 while the branch convolutions run under autocast: every
    ResnetBlock normalises a float32 input and adds its branch to its float32 shortcut
    (nin_shortcut in fp32), resamplers return float32; `ends` (e.g. conv_in, norm_out) are
    float32 islands besides."""
    from model.blocks import Downsample, ResnetBlock, Upsample, swish

    def block_forward(self: ResnetBlock, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x.float())))
        h = self.conv2(self.dropout(swish(self.norm2(h.float()))))
        if self.in_channels != self.out_channels:
            with torch.autocast("cpu", enabled=False):
                x = self.nin_shortcut(x.float())
        return x.float() + h.float()

    with contextlib.ExitStack() as stack:  # undoes every patch, also when one fails
        for module in coder.modules():
            if isinstance(module, (ResnetBlock, Upsample, Downsample)):
                stack.callback(setattr, module, "forward", module.forward)
                module.forward = (block_forward.__get__(module) if isinstance(module, ResnetBlock)
                                  else lambda x, f=module.forward: f(x).float())
        for name in ends:
            stack.enter_context(fp32_island(coder.get_submodule(name)))
        yield


STREAM_ENDS = ("conv_in", "mid.attn_1", "norm_out", "conv_out")


def _run(model: AutoencoderKL, op: str, x: torch.Tensor, dtype) -> torch.Tensor:
    with torch.inference_mode(), torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        out = model.encode(x).mean if op == "encode" else model.decode(x)
    return out.float()


def attribute(model: AutoencoderKL, op: str, x: torch.Tensor, dtype) -> list[dict]:
    ref = _run(model, op, x, None)
    span = float(ref.max() - ref.min()) if op == "encode" else 2.0
    base = float(psnr(_run(model, op, x, dtype), ref, data_range=span).min())
    rows = [{"op": op, "fp32_block": "(none)", "psnr_db": round(base, 2), "gain_db": 0.0}]

    def measure(name: str, kept) -> None:
        """One row: the PSNR with `kept` (a context manager) in force."""
        with kept:
            value = float(psnr(_run(model, op, x, dtype), ref, data_range=span).min())
        rows.append({"op": op, "fp32_block": name, "psnr_db": round(value, 2),
                     "gain_db": round(value - base, 2)})
        print(f"{op} {name}: {value:.2f} dB", file=sys.stderr, flush=True)

    coder = model.encoder if op == "encode" else model.decoder
    for name, module in blocks(coder):
        measure(name, fp32_island(module))
    measure("(residual stream)", fp32_stream(coder))
    measure(f"(residual stream + {', '.join(STREAM_ENDS)})", fp32_stream(coder, STREAM_ENDS))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = bench_parser("precision", __doc__)
    p.add_argument("--config", help="model YAML (default first_radio.yaml)")
    p.add_argument("--ckpt", help="a checkpoint's weights instead of seeded random ones")
    p.add_argument("--size", type=int, help="map height = width (default: the config's)")
    p.add_argument("--maps", type=int, default=2)
    p.add_argument("--precision", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--json", default=str(MEASUREMENTS / "precision.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, source = build_model(args.config, args.ckpt)
    size = (args.size, args.size) if args.size else model.ddconfig.size
    maps = synthetic_maps(args.maps, *size)
    with torch.inference_mode():
        latents = copy.deepcopy(model).encode(maps).mean
    dtype = DTYPES[args.precision]
    rows = attribute(model, "encode", maps, dtype) + attribute(model, "decode", latents, dtype)
    result = {"machine": machine(), "model": source, "size": list(size),
              "precision": args.precision, "maps": args.maps, "rows": rows}
    write_json(args.json, result)
    print(markdown_table(rows, ["op", "fp32_block", "psnr_db", "gain_db"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
