"""`python -m train figures --ckpt CKPT --eval EVAL_JSON --out DIR`: the PNGs docs/quality.md
shows: `curves.png` (validation metrics and every logged loss term against step) and
`worst.png` / `best.png` (the eval's worst and best maps as input | reconstruction | error in
dB, at native resolution)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from model.io import from_model
from model.metrics import DB_PER_GRAY
from model.run_config import load_run
from radiomaps import whole_maps
from radiomaps.base import resize
from train.logging import read_metrics

CURVES = ("val/psnr", "val/ssim", "val/rmse_db", "val/tx_rmse_db", "val/building_error")


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def curves_png(run_dir: str | Path, out: str | Path) -> Path:
    """One panel per validation metric and per logged loss term, against step."""
    records = read_metrics(run_dir)
    losses = sorted({k for r in records for k in r
                     if k.startswith("train/") and k.endswith("loss")})
    names = [n for n in (*CURVES, *losses) if any(isinstance(r.get(n), float) for r in records)]
    plt = _pyplot()
    cols = 4
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    for ax, name in zip(axes.flat, names):
        points = [(r["step"], r[name]) for r in records if isinstance(r.get(name), float)]
        ax.plot(*zip(*points), lw=1.2, marker="o" if name.startswith("val/") else None, ms=3)
        if name.endswith("loss") and min(v for _, v in points) > 0:
            ax.set_yscale("log")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return Path(out)


@torch.no_grad()
def maps_png(ckpt: str | Path, entries: list[dict], split: str, out: str | Path) -> Path:
    """Rows of input | reconstruction | |error| (dB) for eval entries ({"name", "psnr", ...})."""
    loaded = load_run(ckpt)
    dataset = whole_maps(loaded.run.data, split)
    index = {f"{m}_{t}": i * dataset.num_tx + t for i, m in enumerate(dataset.map_ids)
             for t in range(dataset.num_tx)}
    plt = _pyplot()
    fig, axes = plt.subplots(len(entries), 3, figsize=(9, 3 * len(entries)), squeeze=False)
    for row, entry in zip(axes, entries):
        map_id, tx = entry["name"].split("_")
        native = dataset.load(int(map_id), int(tx))["image"]
        item = dataset[index[entry["name"]]]
        recon = from_model(loaded.model(item["image"][None].to(loaded.device),
                                        sample_posterior=False)[0])[0].cpu()
        recon = resize(recon, tuple(native.shape))[0].numpy()
        error_db = abs(recon - native) * DB_PER_GRAY
        panels = ((native, "input", "gray", 1.0), (recon, "reconstruction", "gray", 1.0),
                  (error_db, "|error| dB", "magma", 10.0))
        for ax, (image, title, cmap, vmax) in zip(row, panels):
            shown = ax.imshow(image, cmap=cmap, vmin=0, vmax=vmax)
            ax.set_title(f"{entry['name']}: {title}" + (f" (PSNR {entry['psnr']:.1f} dB)"
                                                         if title == "input" else ""), fontsize=8)
            ax.axis("off")
        fig.colorbar(shown, ax=row[2], fraction=0.046)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return Path(out)


def command(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m train figures", allow_abbrev=False,
                                description="Curves and best/worst maps of an evaluated run.")
    p.add_argument("--ckpt", required=True, help="the evaluated checkpoint (file or run dir)")
    p.add_argument("--run", help="run directory with metrics.jsonl (default: the checkpoint's)")
    p.add_argument("--eval", required=True, help="the JSON written by `python -m train eval`")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--rows", type=int, default=4, help="maps per best/worst figure")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = json.loads(Path(args.eval).read_text())
    native = results["native"]
    run_dir = Path(args.run) if args.run else Path(results["checkpoint"]).parent
    written = [curves_png(run_dir, out / "curves.png")]
    for kind in ("worst", "best"):
        written.append(maps_png(args.ckpt, native[kind][:args.rows], results["split"],
                                out / f"{kind}.png"))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0
