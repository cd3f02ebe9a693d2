"""`python -m bench.model`: encode / decode / reconstruct speed and accuracy of every inference
path (plain fp32 baseline, runtime/inference.py fast paths, onnxruntime, the diffusers peer) on
the same weights, side by side in one run.

Per (op, batch): every path is warmed up, then the timed repeats go round-robin over the paths
(repeat r runs each path once), so a change in machine load hits all paths alike; `speedup`
is the median over rounds of baseline time / path time. When a path
reuses memory, each call runs under its path's malloc setting (runtime.malloc.malloc_reuse: on
for paths with reuse_memory; glibc's steady-state thresholds, 32 MiB mmap / 64 MiB trim, for
the others), though the setting is process-wide; otherwise glibc is left untouched. Accuracy is
each path's output against the baseline's on synthetic radio maps: PSNR (maps in [0, 1];
latents: data range = the baseline latents' peak-to-peak) and max abs error.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

from model.io import from_model
from model.metrics import psnr
from runtime.autotune import options_for
from runtime.malloc import malloc_reuse

from .common import (MEASUREMENTS, bench_parser, build_model, cpu_peak, gpu_peak, machine,
                     markdown_table, measured_gemm_rate, model_flops, parse_ints, print_and_write,
                     synchronize, synthetic_maps)
from .paths import CPU_PATHS, GPU_PATHS, Runner, Skip, build_runner, default_paths, make_workdir

OPS = ("encode", "decode", "reconstruct")
ACCURATE_DB = 50.0
COLUMNS = ["op", "batch", "path", "ms_per_map", "maps_per_s", "speedup", "psnr_db",
           "max_abs_err", "pct_peak", "status"]


def build_parser() -> argparse.ArgumentParser:
    p = bench_parser("model", __doc__)
    p.add_argument("--config", help="model YAML (default first_radio.yaml; with --ckpt: the "
                                    "checkpoint's stored config)")
    p.add_argument("--ckpt", help="checkpoint to load (default: the config's network with "
                                  "seeded random weights)")
    p.add_argument("--size", type=int, help="map height = width (default: the config's)")
    p.add_argument("--batch", type=parse_ints, help="batch sizes (default 1,4,16; GPU 1,4,16,64)")
    p.add_argument("--ops", default=",".join(OPS), help="comma-separated subset of %(default)s")
    p.add_argument("--paths", help=f"comma-separated paths (default: all that apply here). "
                                   f"CPU: {', '.join(CPU_PATHS)}. GPU: {', '.join(GPU_PATHS)}. "
                                   "Also: default (runtime's neutral baseline, plain fp32)")
    p.add_argument("--compile", action="store_true",
                   help="include the torch.compile paths (tens of seconds to compile)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="CPU threads for torch and onnxruntime (default %(default)s)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per path (default 1)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per path (default 5)")
    p.add_argument("--quick", action="store_true",
                   help="batch 1 only, 3 repeats: a first look in a few minutes")
    p.add_argument("--onnx-dir", help="directory with encoder.onnx/decoder.onnx of THIS model "
                                      "(`python -m export` output) to time; exported into it "
                                      "when empty (default: a fresh export in a temp dir)")
    p.add_argument("--profile", metavar="PATH:OP",
                   help="also print torch.profiler's top ops for one call of PATH on OP")
    p.add_argument("--json", type=Path, default=MEASUREMENTS / "model.json",
                   help="where to write the results (default %(default)s)")
    return p


def _options_name(name: str) -> bool:
    try:
        options_for(name)
    except ValueError:
        return False
    return True


def _check_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    bad = [o for o in ops if o not in OPS]
    if bad or not ops:
        parser.error(f"--ops: expected a comma-separated subset of {list(OPS)}, got {args.ops!r}")
    args.ops = ops
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available to torch here")
    known = (*(GPU_PATHS if args.device.type == "cuda" else CPU_PATHS), "default")
    if args.paths:
        args.paths = [p.strip() for p in args.paths.split(",") if p.strip()]
        bad = [p for p in args.paths if p not in known and not _options_name(p)]
        if bad:
            parser.error(f"--paths: {bad[0]!r} is not a {args.device.type} path; "
                         f"expected some of {list(known)}, or inference options joined by + "
                         "(e.g. bf16+channels_last)")
        if "baseline" not in args.paths:
            args.paths.insert(0, "baseline")
    else:
        args.paths = default_paths(args.device, args.compile)
    if args.quick:
        args.batch, args.repeats = args.batch or [1], min(args.repeats, 3)
    args.batch = args.batch or ([1, 4, 16, 64] if args.device.type == "cuda" else [1, 4, 16])
    if args.warmup < 0 or args.repeats < 1 or args.threads < 1:
        parser.error("--warmup >= 0, --repeats >= 1 and --threads >= 1 are required")


def _peak(device: torch.device, precision: str, threads: int) -> float | None:
    if device.type == "cuda":
        return gpu_peak(torch.cuda.get_device_name(device), precision)
    return cpu_peak(threads)["flops"].get(precision)


def _accuracy(op: str, out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """PSNR (batch mean) and max abs error of `out` against the baseline's `ref`."""
    out, ref = out.float(), ref.float()
    if op == "encode":
        span = float(ref.max() - ref.min()) or 1.0
        db = psnr(out, ref, data_range=span)
        err = (out - ref).abs().max()
    else:
        a, b = from_model(out), from_model(ref)
        db, err = psnr(a, b), (a - b).abs().max()
    return {"psnr_db": float(db.mean()), "max_abs_err": float(err)}


def _call(runner: Runner, op: str, x: torch.Tensor) -> torch.Tensor:
    return getattr(runner, op)(x)


def _timed(runner: Runner, op: str, x: torch.Tensor, device: torch.device
           ) -> tuple[float, torch.Tensor]:
    """One call's wall time and output, under the runner's own (process-wide) malloc setting
    for `op` (untouched glibc when no runner of this run reuses memory)."""
    if device.type == "cpu" and runner.toggle_malloc:
        malloc_reuse(runner.reuse_memory_for(op))
    start = time.perf_counter()
    out = _call(runner, op, x)
    synchronize(device)
    return time.perf_counter() - start, out


def _time_round_robin(runners: list[Runner], op: str, x: torch.Tensor, args: argparse.Namespace
                      ) -> dict[str, dict]:
    """Warm each runner up, then time them in turns; per runner its times and last output."""
    state: dict[str, dict] = {}
    for r in runners:
        try:
            first, _ = _timed(r, op, x, args.device)
            for _ in range(max(args.warmup - 1, 0)):
                _call(r, op, x)
            state[r.name] = {"first_call_s": first, "times": []}
        except Exception as err:  # one broken path must not end the whole comparison
            state[r.name] = {"status": f"failed: {type(err).__name__}: {str(err)[:200]}"}
            traceback.print_exc(file=sys.stderr)
    live = [r for r in runners if "times" in state[r.name]]
    for _ in range(args.repeats):
        for r in live:
            seconds, state[r.name]["out"] = _timed(r, op, x, args.device)
            state[r.name]["times"].append(seconds)
    return state


def _rows(runners: list[Runner], state: dict[str, dict], op: str, batch: int,
          flops: float, args: argparse.Namespace) -> list[dict]:
    ref = state["baseline"].get("out")
    base = state["baseline"].get("times")
    rows = []
    for r in runners:
        s = state[r.name]
        row = {"op": op, "batch": batch, "path": r.name, "setup_s": r.setup_s,
               "status": s.get("status", "ok")}
        if "times" in s:
            median = sorted(s["times"])[len(s["times"]) // 2]
            precision = r.precision_for(op)
            peak = precision and _peak(args.device, precision, args.threads)
            row.update(median_s=median, times_s=s["times"], first_call_s=s["first_call_s"],
                       ms_per_map=1e3 * median / batch, maps_per_s=batch / median,
                       pct_peak=100 * flops * batch / median / peak if peak else None)
            if base:  # per round, then the median: a load change mid-run hits both sides
                row["speedup"] = statistics.median(b / t for b, t in zip(base, s["times"]))
            if ref is not None:
                row.update(_accuracy(op, s["out"], ref))
                row["accurate"] = row["psnr_db"] >= ACCURATE_DB
        rows.append(row)
    return rows


def _inputs(op: str, batch: int, size: tuple[int, int], baseline: Runner
            ) -> torch.Tensor:
    """Synthetic maps, or (decode) the baseline's posterior mean of them."""
    maps = synthetic_maps(batch, *size)
    return baseline.encode(maps) if op == "decode" else maps


def profile(runner: Runner, op: str, x: torch.Tensor, rows: int = 15) -> str:
    """torch.profiler's table of the ops that take the time in one call."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    _call(runner, op, x)
    with torch_profile(activities=activities) as prof:
        _call(runner, op, x)
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def _size(model, args: argparse.Namespace) -> tuple[int, int]:
    return (args.size, args.size) if args.size else model.ddconfig.size


def _build_runners(model, args: argparse.Namespace) -> tuple[list[Runner], list[dict]]:
    workdir = make_workdir()
    runners, skipped = [], []
    for name in args.paths:
        print(f"setting up {name} ...", file=sys.stderr, flush=True)
        try:
            runners.append(build_runner(name, model, args.device, args.threads, args.onnx_dir,
                                        workdir, _size(model, args)))
        except Skip as why:
            skipped.append({"path": name, "status": f"skipped: {why}"})
    toggle = any(r.reuse_memory for r in runners)
    for r in runners:
        r.toggle_malloc = toggle
    return runners, skipped


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    # "fp32" means fp32: TF32 matmuls/convolutions would be a precision change.
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    model, source = build_model(args.config, args.ckpt)
    size = _size(model, args)
    runners, skipped = _build_runners(model, args)
    results, profiles = [], {}
    for op in args.ops:
        flops = model_flops(model, op, *size)
        for batch in args.batch:
            print(f"{op} batch {batch} ...", file=sys.stderr, flush=True)
            x = _inputs(op, batch, size, runners[0])
            state = _time_round_robin(runners, op, x, args)
            rows = _rows(runners, state, op, batch, flops, args)
            print(markdown_table(rows, COLUMNS), file=sys.stderr, flush=True)  # progress
            results += rows
            synchronize(args.device)
    if args.profile:
        name, _, op = args.profile.partition(":")
        runner = next((r for r in runners if r.name == name), None)
        if runner is None or op not in OPS:
            raise SystemExit(f"--profile: expected PATH:OP with PATH among {args.paths} and OP "
                             f"among {list(OPS)}, got {args.profile!r}")
        profiles[args.profile] = profile(runner, op, _inputs(op, args.batch[0], size, runners[0]))
    return {"machine": machine(), "model": source, "size": list(size),
            "params": sum(p.numel() for p in model.parameters()),
            "flops_per_map": {op: model_flops(model, op, *size) for op in args.ops},
            "peak": _peak_record(args), "args": {k: str(v) for k, v in vars(args).items()},
            "accurate_db": ACCURATE_DB, "results": results + skipped, "profiles": profiles}


def _peak_record(args: argparse.Namespace) -> dict:
    if args.device.type == "cuda":
        name = torch.cuda.get_device_name(args.device)
        return {"gpu": name, "bf16_dense": gpu_peak(name, "bf16"),
                "fp32": gpu_peak(name, "fp32"), "source": "vendor datasheet, dense"}
    peak = cpu_peak(args.threads)
    peak["measured_sgemm_flops"] = measured_gemm_rate(args.threads)
    return peak


def report(result: dict) -> str:
    """The human-readable summary: machine, peak, one table per op."""
    m, peak = result["machine"], result["peak"]
    lines = [f"# {result['model']}, {result['size'][0]}x{result['size'][1]}, "
             f"{result['params'] / 1e6:.1f} M parameters",
             f"{m['date']}  {m['cpu']} ({m['cpu_count']} CPUs, {m['torch_threads']} threads, "
             f"load {m['load_average'][0]:.2f})  {m.get('gpu', 'no GPU')}  torch "
             f"{m['versions']['torch']}",
             "model GFLOP per map: " + ", ".join(f"{op} {v / 1e9:.0f}"
                                                 for op, v in result["flops_per_map"].items())]
    if "derivation" in peak:
        peaks = ", ".join(f"{name} {flops / 1e9:.0f}" for name, flops in
                          peak["flops"].items() if flops)
        lines.append(f"assumed peak GFLOP/s: {peaks} = {peak['derivation']}; measured sgemm "
                     f"{peak['measured_sgemm_flops'] / 1e9:.0f} GFLOP/s; pct_peak counts model "
                     "(direct-convolution) FLOPs against the peak of the row's precision")
    for op in dict.fromkeys(r.get("op") for r in result["results"] if r.get("op")):
        rows = [r for r in result["results"] if r.get("op") == op]
        lines += ["", f"## {op}", markdown_table(rows, COLUMNS)]
    lines += [f"{r['path']}: {r['status']}" for r in result["results"] if "op" not in r]
    for key, table in result["profiles"].items():
        lines += ["", f"## profile {key}", table]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(args, parser)
    result = run(args)
    return print_and_write(report(result), args.json, result)


if __name__ == "__main__":
    sys.exit(main())
