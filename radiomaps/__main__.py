"""`python -m radiomaps synth --out DIR --maps N [--tx K]`: cache synthetic maps to disk in
RadioMapSeer's layout; `python -m radiomaps raytrace --out DIR --maps N [--tx K]`: ray-trace
the same cities with Sionna RT into that layout; `python -m radiomaps sheet --out PNG`: draw
maps beside their cities (and beside their ray-traced maps with --raytraced DIR)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from .raytrace import SAMPLES_PER_TX, SIMULATIONS, DatasetMismatch
from .sionna_backend import RayTracerUnavailable
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


def raytrace(args: argparse.Namespace) -> None:
    from runtime.progress import log_line

    from .raytrace import Generation, Geometry, generate
    from .sionna_backend import load_sionna_rt
    from .splits import split_map_ids

    names = args.simulations
    rt = load_sionna_rt()
    if args.threads:
        import drjit
        drjit.set_thread_count(args.threads)
    import mitsuba
    ids = (split_map_ids(args.split, "disjoint", args.maps, args.seed) if args.split
           else list(range(1, args.maps + 1)))
    generation = Generation(args.seed, args.trace_seed, args.tx, names, args.samples, Geometry())
    print(f"ray-tracing {len(ids)} cities x {args.tx} transmitters ({', '.join(names)}; "
          f"{args.samples:.0e} rays per transmitter) with Sionna RT {rt.__version__} on "
          f"{mitsuba.variant()} into {args.out}", flush=True)
    start = time.perf_counter()
    summary = generate(args.out, sorted(ids), generation,
                       log=lambda m: print(log_line(m), flush=True))
    per_map = ", ".join(f"{n} {s:.1f} s" for n, s in summary["seconds_per_map"].items())
    print(f"done in {time.perf_counter() - start:.0f} s: {summary['generated']} cities "
          f"generated, {summary['kept']} kept (finished and verified); per city, median: "
          f"{per_map or 'none generated'}")
    print(f"read it with: data.name=radio data.root={args.out} data.num_maps={args.maps} "
          f"data.num_tx={args.tx} data.simulation={names[0]}"
          + (f" (the {args.split} split only)" if args.split else ""))


def raytraced_sheet(args: argparse.Namespace) -> None:
    """One row per city: layout, straight-line synthetic map, each ray-traced setting."""
    import json

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from model.io import read_png

    root = args.raytraced
    manifest = root / "raytrace.json"
    if not manifest.exists():
        raise DatasetMismatch(f"{manifest}: not found; --raytraced takes a folder written by "
                              f"`python -m radiomaps raytrace`")
    names = json.loads(manifest.read_text())["simulations"]
    ids = sorted(int(p.stem) for p in (root / "raytrace").glob("*.json"))[:args.maps]
    if not ids:
        raise DatasetMismatch(f"{root}: no finished city yet")
    fig, axes = plt.subplots(len(ids), 2 + len(names), squeeze=False,
                             figsize=(2.4 * (2 + len(names)), 2.5 * len(ids)))
    for row, m in enumerate(ids):
        item = sample(args.seed, m, 0)
        seconds = json.loads((root / "raytrace" / f"{m}.json").read_text())["seconds"]
        panels = [(item["buildings"], f"map {m}: buildings"),
                  (item["image"], "straight-line synthetic")]
        panels += [(read_png(root / "gain" / n / f"{m}_0.png"), f"{n} ray-traced ({seconds[n]:.0f} s)")
                   for n in names]
        ty, tx = np.unravel_index(item["tx"].argmax(), item["tx"].shape)
        for ax, (image, title) in zip(axes[row], panels):
            ax.imshow(image, cmap="gray", vmin=0, vmax=1)
            ax.plot(tx, ty, "r+", markersize=7)
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    fig.suptitle(f"transmitter 0 of cities {ids[0]}..{ids[-1]} (seed {args.seed}): the same "
                 f"layout and transmitter, straight-line model vs Sionna RT (seconds: all "
                 f"transmitters of the city)", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out, dpi=args.dpi)
    print(f"wrote {args.out} ({len(ids)} cities x {2 + len(names)} panels)")


def sheet(args: argparse.Namespace) -> None:
    if args.raytraced:
        return raytraced_sheet(args)
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
    parser = argparse.ArgumentParser(prog="python -m radiomaps", description=__doc__,
                                     allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("synth", allow_abbrev=False,
                       help="write synthetic maps in RadioMapSeer's folder layout")
    p.add_argument("--out", type=Path, required=True, help="dataset root to create")
    p.add_argument("--maps", type=int, required=True, help="cities, written as maps 1..N")
    p.add_argument("--tx", type=int, default=80, help="transmitters per city (default 80)")
    p.add_argument("--seed", type=int, default=42)
    p.set_defaults(run=synth)
    p = sub.add_parser("raytrace", allow_abbrev=False,
                       help="ray-trace the synthetic cities (Sionna RT) in RadioMapSeer's layout")
    p.add_argument("--out", type=Path, required=True, help="dataset root (resumes one there)")
    p.add_argument("--maps", type=int, required=True, help="cities, maps 1..N")
    p.add_argument("--tx", type=int, default=2, help="transmitters per city (default 2)")
    p.add_argument("--simulations", default="DPM,IRT2",
                   help="comma-separated settings: DPM, IRT2, IRT4 (default DPM,IRT2)")
    p.add_argument("--samples", type=int, default=SAMPLES_PER_TX,
                   help="rays per transmitter (default 1e6; docs/raytrace.md gives the noise)")
    p.add_argument("--split", choices=["train", "val", "test"], default=None,
                   help="only the cities of this split of the N maps (e.g. a held-out test set)")
    p.add_argument("--seed", type=int, default=42, help="cities and transmitters (as synth)")
    p.add_argument("--trace-seed", type=int, default=0, help="the ray tracer's random numbers")
    p.add_argument("--threads", type=int, default=0,
                   help="Dr.Jit worker threads (default: every core)")
    p.set_defaults(run=raytrace)
    p = sub.add_parser("sheet", allow_abbrev=False,
                       help="draw synthetic maps beside their building layouts")
    p.add_argument("--out", type=Path, required=True, help="PNG file to write")
    p.add_argument("--maps", type=int, default=8)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--dpi", type=int, default=110)
    p.add_argument("--raytraced", type=Path, default=None,
                   help="a `raytrace` output folder: draw its maps beside the synthetic ones")
    p.set_defaults(run=sheet)
    args = parser.parse_args(argv)
    if args.maps < 1 or getattr(args, "tx", 1) < 1:
        parser.error("--maps and --tx must be positive integers")
    if args.command == "raytrace":
        args.simulations = tuple(dict.fromkeys(n.strip() for n in args.simulations.split(",")))
        unknown = [n for n in args.simulations if n not in SIMULATIONS]
        if unknown:
            parser.error(f"--simulations: {', '.join(unknown)} unknown; choose from "
                         f"{', '.join(SIMULATIONS)}")
        if args.samples < 1 or args.threads < 0:
            parser.error("--samples must be positive and --threads >= 0")
    try:
        args.run(args)
    except (RayTracerUnavailable, DatasetMismatch) as err:
        parser.exit(2, f"error: {err}\n")
    except OSError as err:
        parser.exit(1, f"error: {err}\n")


if __name__ == "__main__":
    sys.exit(main())
