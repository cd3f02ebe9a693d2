"""Reconstruction quality of an autoencoder on a split: PSNR / SSIM / NMSE / RMSE on [0, 1] maps,
and the input | reconstruction | |error| sample grid."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from model.autoencoder import AutoencoderKL
from model.checkpoint import (CheckpointError, load_into, network_state_dict, read_checkpoint,
                              resolve_checkpoint)
from model.io import from_model
from model.metrics import METRICS, per_sample_metrics
from train.config import load_config
from train.data import build_dataset, build_loader

ERROR_GAIN = 4.0  # |error| is drawn x4 (clipped) so small errors stay visible


@torch.no_grad()
def metric_sums(model: AutoencoderKL, batches: Iterable[dict], device: torch.device,
                max_batches: int | None = None, autocast: contextlib.AbstractContextManager
                | None = None) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """Per-metric sums over maps (order of METRICS) plus the map count, as one float64 vector,
    and the first batch's (input, reconstruction) in [0, 1]. Reconstructions use the posterior
    mode (deterministic)."""
    sums = torch.zeros(len(METRICS) + 1, dtype=torch.float64, device=device)
    first = None
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        x = batch["image"].to(device, non_blocking=True)
        with autocast or contextlib.nullcontext():
            recon = model(x, sample_posterior=False)[0]
        target, pred = from_model(x), from_model(recon)
        values = per_sample_metrics(pred, target)
        sums[:-1] += torch.stack([values[name].double().sum() for name in METRICS])
        sums[-1] += x.shape[0]
        if first is None:
            first = (target, pred)
    return sums, first


def means_from_sums(sums: torch.Tensor) -> dict[str, float]:
    count = sums[-1].item()
    if count == 0:
        raise ValueError("no maps were evaluated (empty split?)")
    return {name: (sums[i] / count).item() for i, name in enumerate(METRICS)} | {"maps": int(count)}


def sample_grid(target: torch.Tensor, pred: torch.Tensor, rows: int) -> np.ndarray:
    """Rows of [input | reconstruction | |error| x4] from [N, 1, H, W] maps in [0, 1]."""
    target, pred = target[:rows, 0].float().cpu(), pred[:rows, 0].float().cpu()
    error = ((target - pred).abs() * ERROR_GAIN).clamp(0, 1)
    gap = torch.ones(target.shape[0], target.shape[1], 2)
    rows_ = torch.cat([target, gap, pred, gap, error], dim=2)  # [N, H, 3W + 4]
    sep = torch.ones(rows_.shape[0], 2, rows_.shape[2])
    return torch.cat([rows_, sep], dim=1).reshape(-1, rows_.shape[2])[:-2].numpy()


def format_table(results: dict[str, float]) -> str:
    """A Markdown table of the four metrics."""
    lines = ["| metric | value |", "|---|---|"]
    lines += [f"| {name.upper()} | {results[name]:.6g} |" for name in METRICS]
    return "\n".join(lines)


def evaluate_checkpoint(ckpt: str | Path, split: str = "test", cfg: str | Path | None = None,
                        overrides: Sequence[str] = (), use_ema: bool = True) -> dict:
    """Mean metrics of a checkpoint's reconstructions over a whole split. The run config is
    `cfg` if given, else the one the checkpoint stores."""
    path = resolve_checkpoint(ckpt)
    state = read_checkpoint(path)
    if cfg is None and not isinstance(state.get("config"), dict):
        raise CheckpointError(f"{path}: the checkpoint stores no config (an upstream file?): "
                              "pass --cfg first_radio.yaml (or the YAML it was trained with)")
    run = load_config(cfg if cfg is not None else state["config"], list(overrides))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoencoderKL.from_config(run.model)
    load_into(model, network_state_dict(state, use_ema), path)
    model.to(device).eval()
    loader = build_loader(build_dataset(run.data, split), run.batch_size, shuffle=False,
                          num_workers=run.data.num_workers, drop_last=False)
    sums, _ = metric_sums(model, loader, device)
    weights = "ema" if use_ema and isinstance(state.get("ema"), dict) else "model"
    return {"checkpoint": str(path), "step": state.get("step"), "split": split,
            "weights": weights, **means_from_sums(sums)}
