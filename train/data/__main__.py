"""`python -m train.data synth --out DIR --maps N [--tx K]`: cache synthetic maps to disk in
RadioMapSeer's layout; `python -m train.data sheet --out PNG`: draw maps beside their cities."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from .synthetic import city, sample, write_radiomapseer


def synth(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    files = write_radiomapseer(args.out, args.maps, args.tx, args.seed)
    seconds = time.perf_counter() - start
    maps = args.maps * args.tx
    print(f"wrote {files} PNGs ({args.maps} cities x {args.tx} transmitters) to {args.out} in "
          f"{seconds:.1f} s ({1000 * seconds / maps:.0f} ms per radio map, PNG writing included)")
    print(f"read it with: data.name=radio data.root={args.out} data.num_maps={args.maps} "
          f"data.num_tx={args.tx}")


def sheet(args: argparse.Namespace) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ids = range(1, args.maps + 1)
    items, wall, cpu = [], [], []
    for m in ids:
        start, start_cpu = time.perf_counter(), time.process_time()
        items.append(sample(args.seed, m, 0, city(args.seed, m)))
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    per_map = float(np.median(cpu))
    cols = 4
    rows = -(-len(items) // cols)
    fig, axes = plt.subplots(rows, 2 * cols, figsize=(4 * cols, 2.5 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for k, (m, item) in enumerate(zip(ids, items)):
        r, c = divmod(k, cols)
        ty, tx = np.unravel_index(item["tx"].argmax(), item["tx"].shape)
        axes[r, 2 * c].imshow(item["buildings"], cmap="gray", vmin=0, vmax=1)
        axes[r, 2 * c].plot(tx, ty, "r+", markersize=8)
        axes[r, 2 * c].set_title(f"map {m}: buildings", fontsize=8)
        axes[r, 2 * c + 1].imshow(item["image"], cmap="gray", vmin=0, vmax=1)
        axes[r, 2 * c + 1].set_title(f"map {m}: path gain", fontsize=8)
    fig.suptitle(f"synthetic radio maps (seed {args.seed}), 256x256, "
                 f"{1000 * per_map:.0f} ms CPU per map (city + path gain, median)", fontsize=10)
    fig.tight_layout()
    fig.savefig(args.out, dpi=args.dpi)
    print(f"wrote {args.out} ({len(items)} maps); per map (city + path gain), median: "
          f"{1000 * per_map:.0f} ms CPU, {1000 * float(np.median(wall)):.0f} ms wall")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m train.data", description=__doc__,
                                     allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("synth", allow_abbrev=False,
                       help="write synthetic maps in RadioMapSeer's folder layout")
    p.add_argument("--out", type=Path, required=True, help="dataset root to create")
    p.add_argument("--maps", type=int, required=True, help="cities, written as maps 1..N")
    p.add_argument("--tx", type=int, default=80, help="transmitters per city (default 80)")
    p.add_argument("--seed", type=int, default=42)
    p.set_defaults(run=synth)
    p = sub.add_parser("sheet", allow_abbrev=False,
                       help="draw synthetic maps beside their building layouts")
    p.add_argument("--out", type=Path, required=True, help="PNG file to write")
    p.add_argument("--maps", type=int, default=8)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--dpi", type=int, default=110)
    p.set_defaults(run=sheet)
    args = parser.parse_args(argv)
    if args.maps < 1 or getattr(args, "tx", 1) < 1:
        parser.error("--maps and --tx must be positive integers")
    try:
        args.run(args)
    except OSError as err:
        parser.exit(1, f"error: {err}\n")


if __name__ == "__main__":
    sys.exit(main())
