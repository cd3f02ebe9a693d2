"""Tiled vs untiled reconstruction of maps larger than a tile: error, seams, time, memory.

    python -m bench.tiling --ckpt reference --size 512 --maps 2 --overlaps 64,128 --untiled
    python -m bench.tiling --ckpt reference --size 1024 --maps 2 --overlaps 64,128

Maps are synthetic cities generated at SIZE x SIZE (1 m pixels). Each reconstruction runs in
its own process (so its peak RSS is its own); errors are against the ground truth, and, when
both ran, tiled against untiled. `seam` is the band of pixels within `--band` of an inner tile
edge, where blended tiles meet; `rest` is every other pixel. The network runs as the plain fp32
network (`prepare_for_inference` with no options, the same on every machine): what is measured
is tiling, not a machine's fastest path. Writes bench/measurements/tiling-SIZE.json and prints
a table.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import MEASUREMENTS, bench_parser, machine, markdown_table, parse_ints, write_json
from runtime.tiling import Tiler, seam_band


def city_map(size: int, seed: int) -> np.ndarray:
    """A synthetic radio map [size, size] in [0, 1]."""
    from radiomaps.synthetic import path_gain, place_transmitter, random_city
    rng = np.random.default_rng([seed, size])
    buildings = random_city(rng, size)
    return path_gain(buildings, place_transmitter(rng, buildings))


def reconstruct_one(args: argparse.Namespace) -> None:
    """Child process: reconstruct one map, save it, print seconds and peak RSS as JSON."""
    from model.loading import load
    from runtime.inference import prepare_for_inference
    torch.set_num_threads(args.threads)
    x = torch.from_numpy(city_map(args.size, args.seed))[None, None] * 2 - 1
    engine = prepare_for_inference(load(args.ckpt).model, "cpu")
    if args.overlap >= 0:
        engine.enable_tiling(args.tile, args.overlap)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    y = engine.reconstruct(x)
    seconds = time.perf_counter() - start
    np.save(args.save, ((y[0, 0] + 1) / 2).clamp(0, 1).numpy())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": seconds, "peak_rss_mib": peak / 1024,
                      "rss_before_mib": base / 1024}))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / max(np.mean((a - b) ** 2), 1e-12)))


def rmse_db(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a - b) ** 2)) * 100)  # 1 gray = 100 dB (model/io.py)


def run_child(args: argparse.Namespace, seed: int, overlap: int, save: Path) -> dict:
    cmd = [sys.executable, "-m", "bench.tiling", "--one", "--ckpt", args.ckpt, "--size",
           str(args.size), "--tile", str(args.tile), "--overlap", str(overlap), "--seed",
           str(seed), "--save", str(save), "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = bench_parser("tiling", __doc__)
    p.add_argument("--ckpt", default="reference")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--maps", type=int, default=2)
    p.add_argument("--tile", type=int, default=256)
    p.add_argument("--overlaps", type=parse_ints, default=[64, 128])
    p.add_argument("--untiled", action="store_true", help="also the whole map at once")
    p.add_argument("--band", type=int, default=8, help="seam band half-width, pixels")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--overlap", type=int, default=-1, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--save", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        return reconstruct_one(args)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.maps):
            truth = city_map(args.size, seed)
            outputs = {}
            for overlap in ([-1] if args.untiled else []) + args.overlaps:
                save = Path(tmp) / f"{seed}_{overlap}.npy"
                row = {"map": seed, "mode": "untiled" if overlap < 0 else f"tiled o{overlap}",
                       **run_child(args, seed, overlap, save)}
                outputs[overlap] = np.load(save)
                row.update(psnr=psnr(outputs[overlap], truth),
                           rmse_db=rmse_db(outputs[overlap], truth))
                if overlap >= 0:
                    seam = seam_band(args.size, args.tile, overlap, args.band)
                    row.update(tiles=Tiler(args.tile, overlap).count(args.size, args.size),
                               seam_rmse_db=rmse_db(outputs[overlap][seam], truth[seam]),
                               rest_rmse_db=rmse_db(outputs[overlap][~seam], truth[~seam]))
                    if -1 in outputs:
                        row["psnr_vs_untiled"] = psnr(outputs[overlap], outputs[-1])
                rows.append(row)
                print(row, flush=True)
    table = [{k: (f"{v:.2f}" if isinstance(v, float) else v) for k, v in r.items()
              if k != "rss_before_mib"} for r in rows]
    info = machine()
    write_json(MEASUREMENTS / f"tiling-{args.size}.json",
               {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows})
    print(f"{info['cpu']}, {info['cpu_count']} cores, {args.threads} thread(s); "
          f"{args.size}x{args.size}, tile {args.tile}, seam band +-{args.band} px")
    print(markdown_table(table, list(dict.fromkeys(k for r in table for k in r))))

if __name__ == "__main__":
    main()
