"""`python -m bench.export_vs_torch`: what the ONNX export costs and what it buys on CPU.

(a) Export: seconds per graph for `export.onnx_export.export_graph` (no parity check) and the
    graph sizes, for the config's full network (default first_radio.yaml, random weights).
(b) Speed: onnxruntime (CPU provider) against torch eager fp32, one map (batch 1) at the
    config's size, for encode (map -> posterior mean) and decode (latent -> map). Timed
    repeats alternate torch and onnxruntime, so a change in machine load hits both alike;
    the table gives medians.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from export.onnx_export import DECODER_FILE, DEFAULT_OPSET, ENCODER_FILE, EXPORTERS, export_graph
from export.ort_session import make_session

from .common import (MEASUREMENTS, bench_parser, build_model, machine, markdown_table,
                     print_and_write, synthetic_maps)

COLUMNS = ["op", "runtime", "median_ms", "min_ms", "max_ms", "speedup_vs_torch", "max_abs_err"]


def build_parser() -> argparse.ArgumentParser:
    p = bench_parser("export_vs_torch", __doc__)
    p.add_argument("--config", help="model YAML (default first_radio.yaml; with --ckpt: the "
                                    "checkpoint's stored config)")
    p.add_argument("--ckpt", help="checkpoint (default: the config's network, random weights)")
    p.add_argument("--size", type=int, help="map height = width (default: the config's)")
    p.add_argument("--exporter", choices=EXPORTERS, default="dynamo")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    p.add_argument("--threads", type=int, default=2,
                   help="CPU threads for torch and onnxruntime (default %(default)s)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs each (default 1)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs each (default 5)")
    p.add_argument("--json", type=Path, default=MEASUREMENTS / "export_vs_torch.json",
                   help="where to write the results (default %(default)s)")
    return p


def export_both(model, out: Path, exporter: str, opset: int) -> dict:
    """Export encoder and decoder into `out`; seconds and bytes per graph."""
    result = {"exporter": exporter, "opset": opset}
    for name, file in (("encoder", ENCODER_FILE), ("decoder", DECODER_FILE)):
        start = time.perf_counter()
        export_graph(model, name, out, exporter, opset)
        result[name] = {"seconds": time.perf_counter() - start,
                        "megabytes": (out / file).stat().st_size / 1e6}
    return result


def _time_pair(torch_fn, ort_fn, warmup: int, repeats: int) -> tuple[list[float], list[float]]:
    for _ in range(warmup):
        torch_fn(), ort_fn()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, bucket in ((torch_fn, times[0]), (ort_fn, times[1])):
            start = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - start)
    return times


def _rows(op: str, times: tuple[list[float], list[float]], err: float) -> list[dict]:
    base = statistics.median(times[0])
    return [{"op": op, "runtime": runtime, "median_ms": 1e3 * statistics.median(t),
             "min_ms": 1e3 * min(t), "max_ms": 1e3 * max(t),
             "speedup_vs_torch": base / statistics.median(t),
             "max_abs_err": None if runtime == "torch eager" else err}
            for runtime, t in (("torch eager", times[0]), ("onnxruntime cpu", times[1]))]


@torch.inference_mode()
def time_ops(model, out: Path, size: tuple[int, int], args: argparse.Namespace) -> list[dict]:
    """Encode and decode of one synthetic map, torch eager vs onnxruntime CPU."""
    enc = make_session(out / ENCODER_FILE, "cpu", args.threads)
    dec = make_session(out / DECODER_FILE, "cpu", args.threads)
    x = synthetic_maps(1, *size)
    z = model.encode(x).mean
    x_np, z_np = x.numpy(), z.numpy()
    rows = []
    for op, torch_fn, ort_fn, ref in (
            ("encode", lambda: model.encode(x).mean, lambda: enc.run(["mean"], {"image": x_np}),
             z),
            ("decode", lambda: model.decode(z), lambda: dec.run(None, {"latent": z_np}),
             model.decode(z))):
        err = float(np.abs(ort_fn()[0] - ref.numpy()).max())
        rows += _rows(op, _time_pair(torch_fn, ort_fn, args.warmup, args.repeats), err)
        print(f"{op}: torch {rows[-2]['median_ms']:.1f} ms, onnxruntime "
              f"{rows[-1]['median_ms']:.1f} ms (median)", file=sys.stderr)
    return rows


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    model, origin = build_model(args.config, args.ckpt)
    size = (args.size, args.size) if args.size else model.ddconfig.size
    with tempfile.TemporaryDirectory(prefix="export_vs_torch.") as tmp:
        exported = export_both(model, Path(tmp), args.exporter, args.opset)
        rows = time_ops(model, Path(tmp), size, args)
    return {"machine": machine(), "model": origin,
            "parameters": sum(p.numel() for p in model.parameters()),
            "size": list(size), "batch": 1, "threads": args.threads, "warmup": args.warmup,
            "repeats": args.repeats, "export": exported, "timing": rows}


def report(result: dict) -> str:
    exp = result["export"]
    lines = [f"model: {result['model']}, {result['parameters']:,} parameters; "
             f"maps {result['size'][0]}x{result['size'][1]}, batch 1, "
             f"{result['threads']} threads, median of {result['repeats']}",
             f"export ({exp['exporter']}, opset {exp['opset']}):"]
    for name in ("encoder", "decoder"):
        lines.append(f"  {name}.onnx  {exp[name]['megabytes']:.1f} MB  "
                     f"{exp[name]['seconds']:.1f} s")
    lines += ["", markdown_table(result["timing"], COLUMNS)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = run(args)
    return print_and_write(report(result), args.json, result)


if __name__ == "__main__":
    sys.exit(main())
