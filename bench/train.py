"""`python -m bench.train`: training step time and peak memory of the real Trainer
(train/trainer.py, LPIPSWithDiscriminator loss) in strict fp32, TF32, bf16 / fp16 autocast, with
or without gradient checkpointing, in phase 1 (autoencoder only) and phase 2 (with the
discriminator and the adaptive GAN weight). `speedup` is against the first --precisions entry
that ran in that phase (`speedup_vs` names it). Peak memory is in GiB (2^30 bytes).

Each (phase, precision) runs in a fresh process, so its peak memory is its own: peak RSS on
CPU (the whole process: Python, torch, weights, optimizer state, activations), or
torch.cuda.max_memory_allocated on a GPU. Data are synthetic maps; LPIPS runs with a random
VGG backbone when its weights are absent (the same compute as the pretrained one).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time

import torch

from .common import MEASUREMENTS, bench_parser, machine, markdown_table, write_json

COLUMNS = ["phase", "precision", "step_s", "maps_per_s", "speedup", "peak_mem_gib", "status"]
PHASE_START = {1: 10 ** 9, 2: 0}  # lossconfig.disc_start: never / from the first step
PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
AUTOCAST = ("bf16", "fp16")


def parse_variant(variant: str) -> tuple[str, bool] | None:
    """'bf16+checkpointing' -> ('bf16', True); None for anything else than PRECISIONS[+ckpt]."""
    precision, plus, extra = variant.partition("+")
    if precision not in PRECISIONS or (plus and extra != "checkpointing"):
        return None
    return precision, bool(plus)


def build_parser() -> argparse.ArgumentParser:
    p = bench_parser("train", __doc__)
    p.add_argument("--config", default="first_radio.yaml", help="run config (default %(default)s)")
    p.add_argument("--size", type=int, default=None,
                   help="map height = width (default: 320 on GPU, 128 on CPU)")
    p.add_argument("--batch", type=int, default=None, help="default: 8 on GPU, 2 on CPU")
    p.add_argument("--precisions", default="fp32,bf16",
                   help="comma-separated variants (default %(default)s): fp32 (strict: no TF32), "
                        "tf32 (the trainer's own fp32 on a GPU: TF32 matmuls and convolutions), "
                        "bf16, fp16 (autocast), each optionally +checkpointing (gradient "
                        "checkpointing: trainer.gradient_checkpointing=true)")
    p.add_argument("--phases", default="1,2", help="default %(default)s")
    p.add_argument("--steps", type=int, default=3, help="timed steps (default %(default)s)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps (default %(default)s)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--timeout", type=float, default=1800,
                   help="seconds one (phase, precision) may take (default %(default)s)")
    p.add_argument("--json", default=str(MEASUREMENTS / "train.json"))
    p.add_argument("--one", nargs=2, metavar=("PHASE", "PRECISION"), help=argparse.SUPPRESS)
    return p


def _overrides(args: argparse.Namespace, phase: int, variant: str, run_dir: str) -> list[str]:
    size = f"[{args.size},{args.size}]"
    precision, checkpointing = parse_variant(variant)
    return [f"model.ddconfig.resolution={size}", f"data.image_size={size}",
            "data.name=synthetic", "data.num_maps=16", "data.num_tx=1", "data.num_workers=0",
            f"trainer.batch_size={args.batch}", "trainer.gradient_accumulate_every=1",
            f"trainer.amp={str(precision in AUTOCAST).lower()}",
            f"trainer.fp16={str(precision == 'fp16').lower()}",
            f"trainer.gradient_checkpointing={str(checkpointing).lower()}",
            f"trainer.device={args.device}", f"trainer.results_folder={run_dir}",
            f"model.lossconfig.disc_start={PHASE_START[phase]}",
            "model.lossconfig.allow_random_lpips=true", "model.ckpt_path=null"]


def measure_one(args: argparse.Namespace, phase: int, precision: str) -> dict:
    """In this process: build the Trainer, run warm-up and timed steps, report peak memory."""
    from model.run_config import load_config
    from train.signals import StopRequest
    from train.stream import BatchStream
    from train.trainer import Trainer

    with tempfile.TemporaryDirectory(prefix="radiodiff-bench-train-") as run_dir:
        cfg = load_config(args.config, _overrides(args, phase, precision, run_dir))
        trainer = Trainer(cfg)
        if parse_variant(precision)[0] == "fp32":  # the plain baseline: no TF32 anywhere
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        stream, times = BatchStream(trainer.train_loader), []
        with StopRequest() as stop:
            for i in range(args.warmup + args.steps):
                start = time.perf_counter()
                trainer.train_step(stream, stop)
                if trainer.device.type == "cuda":
                    torch.cuda.synchronize()
                if i >= args.warmup:
                    times.append(time.perf_counter() - start)
        adversarial = trainer.loss.adversarial(trainer.step - 1)
    if trainer.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2 ** 30  # GiB
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB -> GiB
    return {"phase": phase, "precision": precision, "times_s": times,
            "step_s": sorted(times)[len(times) // 2], "adversarial": adversarial,
            "peak_mem_gib": peak, "peak_kind": "cuda allocated" if trainer.device.type == "cuda"
            else "process peak RSS"}


def _child(args: argparse.Namespace, phase: int, precision: str) -> dict:
    cmd = [sys.executable, "-m", "bench.train", "--one", str(phase), precision,
           "--config", args.config, "--size", str(args.size), "--batch", str(args.batch),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"phase": phase, "precision": precision,
                "status": f"stopped after the {args.timeout:.0f} s --timeout"}
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"phase": phase, "precision": precision, "status": f"failed: {last[:300]}"}
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "status": "ok"}


def run(args: argparse.Namespace) -> dict:
    rows = []
    for phase in args.phases:
        for precision in args.precisions:
            print(f"phase {phase} {precision} ...", file=sys.stderr, flush=True)
            rows.append(_child(args, phase, precision))
    for row in rows:  # against the phase's first variant that ran
        if "step_s" in row:
            row["maps_per_s"] = args.batch / row["step_s"]
            base = next(r for r in rows if r["phase"] == row["phase"] and "step_s" in r)
            row["speedup"] = base["step_s"] / row["step_s"]
            row["speedup_vs"] = base["precision"]
    return {"machine": machine(), "config": args.config, "size": args.size, "batch": args.batch,
            "device": args.device, "steps": args.steps, "warmup": args.warmup, "results": rows}


def _check_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    gpu = args.device.startswith("cuda")
    args.size = args.size or (320 if gpu else 128)
    args.batch = args.batch or (8 if gpu else 2)
    try:
        args.phases = [int(p) for p in str(args.phases).split(",")]
    except ValueError:
        args.phases = []
    if not args.phases or any(p not in PHASE_START for p in args.phases):
        parser.error(f"--phases: expected a comma-separated subset of 1,2, got {args.phases!r}")
    args.precisions = [p.strip() for p in str(args.precisions).split(",") if p.strip()]
    if not args.precisions or any(parse_variant(p) is None for p in args.precisions):
        parser.error(f"--precisions: expected a comma-separated list of {', '.join(PRECISIONS)}, "
                     f"each optionally +checkpointing, got {','.join(args.precisions)!r}")
    if args.steps < 1 or args.warmup < 0 or args.batch < 1 or args.size < 8:
        parser.error("--steps >= 1, --warmup >= 0, --batch >= 1 and --size >= 8 are required")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure_one(args, int(args.one[0]), args.one[1])))
        return 0
    _check_args(args, parser)
    result = run(args)
    m = result["machine"]
    print(f"# train step: {args.config} at {args.size}x{args.size}, batch {args.batch}, "
          f"{args.device}\n{m['date']}  {m['cpu']} ({m['cpu_count']} CPUs, load "
          f"{m['load_average'][0]:.2f})  {m.get('gpu', 'no GPU')}\n")
    print(markdown_table(result["results"], COLUMNS))
    print(f"\nwrote {write_json(args.json, result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
