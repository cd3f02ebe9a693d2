"""Ray-traced maps read honestly: the ray tracer's own seed-to-seed PSNR beside the VAE's.

    python -m bench.raytrace_seeds --roots results/rt-seeds/trace0,results/rt-seeds/trace1,\
results/rt-seeds/trace2 --simulation IRT2 --ckpt reference --json OUT.json

The roots are `python -m radiomaps raytrace` folders of the same cities and transmitters
traced with different `--trace-seed`s. Per map, all on [0, 1] maps at native size, under this
project's metrics and RadioDiff's definitions (model/literature_metrics.py):
- tracer: seed a against seed b, over every pair (what the target itself varies by);
- tracer vs average: seed k against the mean of the other seeds (a perfect copy of one trace,
  scored against a less noisy target);
- VAE: its reconstruction of seed k against seed k (what eval reports);
- VAE vs average: its reconstruction of seed k against the mean of the other seeds.
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import torch

from bench.common import bench_parser
from model.io import from_model, read_png, to_model
from model.literature_metrics import definition_metrics
from model.loading import load
from model.metrics import per_sample_metrics

FIGURES = ("psnr", "ssim", "rmse_db", "radiodiff_psnr", "radiodiff_ssim")


def _score(pred: np.ndarray, target: np.ndarray, buildings: np.ndarray) -> dict[str, float]:
    p, t = torch.from_numpy(pred).double(), torch.from_numpy(target).double()
    values = per_sample_metrics(p, t, torch.from_numpy(buildings)) | definition_metrics(p, t)
    return {k: float(values[k]) for k in FIGURES}


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([r[k] for r in rows])) for k in FIGURES}


def map_figures(traces: list[np.ndarray], recons: list[np.ndarray],
                buildings: np.ndarray) -> dict[str, dict[str, float]]:
    """The four comparisons of one map (means over seeds / pairs)."""
    n = len(traces)
    others = [np.mean([traces[j] for j in range(n) if j != k], axis=0) for k in range(n)]
    return {
        "tracer": _mean([_score(traces[a], traces[b], buildings)
                         for a, b in itertools.combinations(range(n), 2)]),
        "tracer_vs_average": _mean([_score(traces[k], others[k], buildings) for k in range(n)]),
        "vae": _mean([_score(recons[k], traces[k], buildings) for k in range(n)]),
        "vae_vs_average": _mean([_score(recons[k], others[k], buildings) for k in range(n)]),
    }


@torch.no_grad()
def reconstruct(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    y = model(to_model(torch.from_numpy(x)[None, None].float()), sample_posterior=False)[0]
    return from_model(y)[0, 0].double().clamp(0, 1).numpy()


def run(roots: list[Path], simulation: str, ckpt: str) -> dict:
    model = load(ckpt).model
    names = sorted(set.intersection(*[{p.stem for p in (r / "gain" / simulation).glob("*.png")}
                                      for r in roots]))
    if not names:
        raise SystemExit(f"no {simulation} maps common to {roots}")
    per_map = {}
    for name in names:
        traces = [read_png(r / "gain" / simulation / f"{name}.png").astype(np.float64)
                  for r in roots]
        city = name.split("_")[0]
        buildings = read_png(roots[0] / "png" / "buildings_complete" / f"{city}.png") > 0.5
        per_map[name] = map_figures(traces, [reconstruct(model, t) for t in traces], buildings)
    return {"roots": [str(r) for r in roots], "simulation": simulation, "checkpoint": ckpt,
            "maps": len(names), "seeds": len(roots), **summarise(per_map), "per_map": per_map}


def summarise(per_map: dict[str, dict]) -> dict:
    """Means, medians and the worst maps of the comparisons over maps. A map whose traces
    agree exactly (no ray reaches a fringe) scores the tracer inf dB: it is left out of the
    means, named, and kept in the medians."""
    whos = list(next(iter(per_map.values())))
    identical = [n for n, m in per_map.items() if not np.isfinite(m["tracer"]["psnr"])]
    finite = [m for n, m in per_map.items() if n not in identical]
    worst = sorted(per_map, key=lambda n: per_map[n]["vae"]["psnr"])[:5]
    return {"identical_trace_maps": identical,
            "mean": {who: _mean([m[who] for m in finite]) for who in whos},
            "median": {who: {k: float(np.median([m[who][k] for m in per_map.values()]))
                             for k in FIGURES} for who in whos},
            "worst_by_vae_psnr": [{"name": n, **{w: per_map[n][w]["psnr"] for w in whos}}
                                  for n in worst]}


def main(argv: list[str] | None = None) -> int:
    p = bench_parser("raytrace_seeds", __doc__)
    p.add_argument("--roots", required=True, help="comma-separated raytrace folders, one per "
                                                  "trace seed (at least 2)")
    p.add_argument("--simulation", default="IRT2")
    p.add_argument("--ckpt", default="reference")
    p.add_argument("--json")
    args = p.parse_args(argv)
    roots = [Path(r) for r in args.roots.split(",")]
    if len(roots) < 2:
        p.error("--roots: at least two trace seeds")
    result = run(roots, args.simulation, args.ckpt)
    identical = result["identical_trace_maps"]
    print(f"{result['maps']} maps, {result['seeds']} trace seeds, {args.simulation}; PSNR dB / "
          f"SSIM / RMSE dB outdoors / RadioDiff PSNR / RadioDiff SSIM; means leave out the "
          f"{len(identical)} maps whose traces agree exactly {identical}:")
    for stat in ("mean", "median"):
        for who, m in result[stat].items():
            print(f"  {stat:6s} {who:18s} " + " / ".join(f"{m[k]:.3f}" for k in FIGURES))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
