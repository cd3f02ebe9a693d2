"""Reconstruction quality of an autoencoder on a split: PSNR / SSIM / NMSE / RMSE on [0, 1] maps
plus the radio metrics (RMSE in dB outdoors, building error, RMSE in dB near the transmitter),
at the model's resolution and at the data's native one; and the input | reconstruction |
|error| sample grid."""
from __future__ import annotations

import contextlib
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from model.autoencoder import AutoencoderKL
from model.io import from_model
from model.literature_metrics import DEFINITIONS, SOURCES, definition_metrics
from model.metrics import METRIC_NAMES, per_sample_metrics
from model.run_config import RunConfig, load_run
from radiomaps import RadioMapDataset, validation_subset, whole_maps
from radiomaps.base import resize
from train.logging import _json_number as _number  # NaN / Inf as strings
from train.split_commands import tracked_loader

ERROR_GAIN = 4.0  # |error| is drawn x4 (clipped) so small errors stay visible
WORST, BEST = 10, 3  # maps listed by PSNR in the eval JSON
PERCENTILES = {"p5": 5, "median": 50, "p95": 95}
SAME = "same as native: the maps are not resized (data.image_size is their native size)"
Scores = dict[str, dict[str, torch.Tensor]]  # resolution ("model", "native") -> metric -> [B]


def _scores(pred: torch.Tensor, target: torch.Tensor, buildings: torch.Tensor,
            definitions: bool = False) -> dict:
    """Per-map metrics of [0, 1] maps; `buildings` is the loader's [-1, 1] map. With
    `definitions`, also the papers' definitions (model/literature_metrics.py)."""
    scores = per_sample_metrics(pred, target, buildings.to(pred.device) > 0)
    return scores | (definition_metrics(pred, target) if definitions else {})


def batch_metrics(model: AutoencoderKL, batch: dict, device: torch.device,
                  autocast: contextlib.AbstractContextManager | None = None,
                  definitions: bool = False) -> tuple[Scores, torch.Tensor, torch.Tensor]:
    """Per-map metrics of one batch at model resolution ("model") and, when it holds native
    maps, at native resolution ("native": the reconstruction resized back); plus (target,
    reconstruction) in [0, 1]. Reconstructions use the posterior mode (deterministic).
    `definitions` adds the papers' metric definitions at both resolutions."""
    x = batch["image"].to(device, non_blocking=True)
    with autocast or contextlib.nullcontext():
        recon = model(x, sample_posterior=False)[0]
    target, pred = from_model(x), from_model(recon)
    scores = {"model": _scores(pred, target, batch["buildings"], definitions)}
    if "native_image" in batch:
        native = from_model(batch["native_image"].to(device))
        upsized = resize(pred[:, 0], tuple(native.shape[-2:]))[:, None]
        scores["native"] = _scores(upsized, native, batch["native_buildings"], definitions)
    return scores, target, pred


def metric_vector(values: dict[str, torch.Tensor]) -> torch.Tensor:
    """[sum per metric, maps it is defined on (not NaN) per metric, maps] in float64, in the
    order of METRIC_NAMES: sums of these vectors (over batches, over DDP ranks) give means."""
    v = torch.stack([values[name].double() for name in METRIC_NAMES])
    defined = ~v.isnan()
    counts = torch.cat([defined.sum(1).double(), v.new_tensor([v.shape[1]])])
    return torch.cat([torch.where(defined, v, 0.0).sum(1), counts])


@torch.no_grad()
def metric_sums(model: AutoencoderKL, batches: Iterable[dict], device: torch.device,
                max_batches: int | None = None, autocast: contextlib.AbstractContextManager
                | None = None) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """`metric_vector` summed over the batches at model resolution, and the first batch's
    (input, reconstruction) in [0, 1]."""
    sums = torch.zeros(2 * len(METRIC_NAMES) + 1, dtype=torch.float64, device=device)
    first = None
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        scores, target, pred = batch_metrics(model, batch, device, autocast)
        sums += metric_vector(scores["model"]).to(device)
        if first is None:
            first = (target, pred)
    return sums, first


def means_from_sums(sums: torch.Tensor) -> dict[str, float]:
    """Each metric's mean over the maps it is defined on (NaN if none), and the map count."""
    count, k = sums[-1].item(), len(METRIC_NAMES)
    if count == 0:
        raise ValueError("no maps were evaluated (empty split?)")
    means = {name: (sums[i] / sums[k + i]).item() if sums[k + i] > 0 else float("nan")
             for i, name in enumerate(METRIC_NAMES)}
    return means | {"maps": int(count)}


def sample_grid(target: torch.Tensor, pred: torch.Tensor, rows: int) -> np.ndarray:
    """Rows of [input | reconstruction | |error| x4] from [N, 1, H, W] maps in [0, 1]."""
    target, pred = target[:rows, 0].float().cpu(), pred[:rows, 0].float().cpu()
    error = ((target - pred).abs() * ERROR_GAIN).clamp(0, 1)
    gap = torch.ones(target.shape[0], target.shape[1], 2)
    rows_ = torch.cat([target, gap, pred, gap, error], dim=2)  # [N, H, 3W + 4]
    sep = torch.ones(rows_.shape[0], 2, rows_.shape[2])
    return torch.cat([rows_, sep], dim=1).reshape(-1, rows_.shape[2])[:-2].numpy()


def format_table(results: dict) -> str:
    """A Markdown table of the mean metrics at native and at model resolution."""
    native, model = results["native"], results["model"]
    heads = [f"native {_size(native)}"] + ([f"model {_size(model)}"] if model != SAME else [])
    blocks = [native] + ([model] if model != SAME else [])
    lines = ["| metric | " + " | ".join(heads) + " |", "|---" * (len(heads) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(_cell(b["metrics"][name]["mean"]) for b in blocks)
              + " |" for name in METRIC_NAMES]
    if model == SAME:
        lines.append(f"model resolution: {SAME}")
    return "\n".join(lines)


def format_definitions(results: dict) -> str:
    """One line per paper's metric definition: its means at native resolution, its source."""
    return "\n".join(f"{name}'s definitions, native: " + ", ".join(
        f"{m} {_cell(v['mean'])}" for m, v in d["metrics"].items()) + f" ({d['source']})"
        for name, d in results["native"].get("definitions", {}).items())


def _size(block: dict) -> str:
    return "x".join(map(str, block["size"]))


def _cell(value: float | str) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


@torch.no_grad()
def score_maps(model: AutoencoderKL, loader: Iterable[dict], device: torch.device
               ) -> tuple[list[str], Scores, dict[str, list[int]]]:
    """Every map's name, its metrics per resolution (in loader order), and each resolution's
    [H, W]."""
    names: list[str] = []
    parts: dict = defaultdict(lambda: defaultdict(list))
    sizes: dict[str, list[int]] = {}
    for batch in loader:
        scores, _, _ = batch_metrics(model, batch, device, definitions=True)
        names += list(batch["name"])
        sizes = {"model": list(batch["image"].shape[-2:]),
                 "native": list(batch.get("native_image", batch["image"]).shape[-2:])}
        for res, values in scores.items():
            for metric, v in values.items():
                parts[res][metric].append(v.cpu())
    return names, {res: {k: torch.cat(v) for k, v in d.items()} for res, d in parts.items()}, sizes


def _percentiles(values: torch.Tensor) -> dict[str, float | str]:
    """Nearest-rank percentiles over the maps where the metric is defined."""
    defined = values[~values.isnan()].double().numpy()
    return {key: _number(float(np.percentile(defined, q, method="nearest")) if defined.size
                         else float("nan")) for key, q in PERCENTILES.items()}


def _entry(names: list[str], values: dict[str, torch.Tensor], i: int) -> dict:
    return {"name": names[i], **{k: _number(v[i].item()) for k, v in values.items()}}


def _summary(values: torch.Tensor) -> dict:
    """Mean over the maps where it is defined, and percentiles."""
    defined = values[~values.isnan()].double()
    mean = defined.mean().item() if defined.numel() else float("nan")
    return {"mean": _number(mean), **_percentiles(values)}


def definitions_block(values: dict[str, torch.Tensor]) -> dict:
    """The papers' definitions (keys `DEFINITION_metric` in `values`), each with its source."""
    return {name: {"source": SOURCES[name],
                   "metrics": {m: _summary(values[f"{name}_{m}"]) for m in metrics}}
            for name, metrics in DEFINITIONS.items() if f"{name}_{next(iter(metrics))}" in values}


def summarize(names: list[str], values: dict[str, torch.Tensor], size: list[int]) -> dict:
    """One resolution's block: [H, W], each metric's mean and percentiles, and the maps with
    the lowest PSNR (worst first) and the highest (best first); the papers' definitions when
    `values` holds them."""
    metrics = {name: _summary(values[name]) for name in METRIC_NAMES}
    worst = torch.argsort(values["psnr"], stable=True)[:WORST].tolist()
    best = torch.argsort(-values["psnr"], stable=True)[:BEST].tolist()
    block = {"size": size, "metrics": metrics,
             "worst": [_entry(names, values, i) for i in worst],
             "best": [_entry(names, values, i) for i in best]}
    definitions = definitions_block(values)
    return block | ({"definitions": definitions} if definitions else {})


def evaluate(model: AutoencoderKL, loader: Iterable[dict], device: torch.device) -> dict:
    """The metric part of the eval JSON: map count, the native block and the model block (the
    string SAME when the maps are not resized)."""
    names, scores, sizes = score_maps(model, loader, device)
    if not names:
        raise ValueError("no maps were evaluated (empty split?)")
    blocks = {res: summarize(names, values, sizes[res]) for res, values in scores.items()}
    return {"maps": len(names), "native": blocks.get("native", blocks["model"]),
            "model": blocks["model"] if "native" in blocks else SAME}


def eval_dataset(run: RunConfig, split: str) -> RadioMapDataset:
    """The split's whole maps (no flips or crops), with their native maps when resized."""
    dataset = whole_maps(run.data, split)
    dataset.with_native = True
    return dataset


def evaluate_checkpoint(ckpt: str | Path, split: str = "test", cfg: str | Path | None = None,
                        overrides: Sequence[str] = (), use_ema: bool = True,
                        max_maps: int | None = None) -> dict:
    """Metrics of a checkpoint's reconstructions over a whole split (with `max_maps`, the subset
    spanning its maps that validation uses). The run config is `cfg` if given, else the one
    the checkpoint stores."""
    loaded = load_run(ckpt, cfg, overrides, use_ema)
    dataset = eval_dataset(loaded.run, split)
    subset = dataset if max_maps is None else validation_subset(dataset, max_maps,
                                                                loaded.run.data.seed)
    return {"checkpoint": str(loaded.path), "step": loaded.step, "split": split,
            "weights": loaded.weights, "split_maps": len(dataset),
            **evaluate(loaded.model, tracked_loader(loaded.run, subset, f"eval {split}"), loaded.device)}
