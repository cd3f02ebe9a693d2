"""The radio-map papers' metric definitions, as their public evaluation code computes them, so
that this project's figures (model/metrics.py: every metric on [0, 1] maps with a peak of 1)
can be set beside published ones. Each function returns one value per map, as model/metrics.py.

- `radiodiff`: UNIC-Lab/RadioDiff `sample_cond_ldm.py` (`calc_loss_test`, sampler batch size 1,
  so one map at a time): torchmetrics' `peak_signal_noise_ratio(pred, target)` and
  `structural_similarity_index_measure(pred, target)` with their defaults. Without
  `data_range` (torchmetrics < 1.8) PSNR takes the peak from the target, max - min; SSIM from
  both maps, max(pred max - min, target max - min); the SSIM window is the same 11-tap
  sigma-1.5 Gaussian over the positions inside the map (torchmetrics < 1.5; from 1.5 on it
  also averages the reflect-padded border). NMSE = MSE / mean(target^2), RMSE = sqrt(MSE), as
  here. Maps in [0, 1] (its loader divides the gray levels by 256, its sampler's output by
  nothing; a common scale does not change PSNR with an inferred range, nor NMSE).
- `radiounet`: RonLevie/RadioUNet (`lib/loaders.py`, notebook `calc_loss_test`): the target
  gain / 255 cut at the noise floor `thresh = 0.2` and stretched back to [0, 1]
  ((max(x, 0.2) - 0.2) / 0.8), MSE and NMSE = MSE / mean(target^2) on that scale. Applied
  here to both maps. RadioUNet's code reports no PSNR; `psnr` is 10 log10(1 / MSE) on its
  scale, for comparison. (It averages NMSE over shuffled batches of 15 maps, a ratio of
  batch means; per map is what can be reproduced.)
"""
from __future__ import annotations

from typing import Callable

import torch

from .metrics import nmse, psnr, rmse, ssim

RADIOUNET_THRESHOLD = 0.2  # RadioUNet's default pathloss threshold ("the noise floor")
Metric = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _per_map_range(x: torch.Tensor) -> torch.Tensor:
    """max - min of each map of [B, ...] (or of one [H, W] map)."""
    flat = x.double().reshape(1 if x.ndim == 2 else x.shape[0], -1)
    return flat.max(1).values - flat.min(1).values


def psnr_target_range(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """PSNR with the peak taken from the target (torchmetrics, data_range=None)."""
    peak = _per_map_range(target)
    return psnr(pred, target, peak[0] if target.ndim == 2 else peak)


def ssim_inferred_range(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SSIM with data_range = max(pred's max - min, target's max - min) (torchmetrics)."""
    peak = torch.maximum(_per_map_range(pred), _per_map_range(target))
    return ssim(pred, target, peak[0] if target.ndim == 2 else peak)


def radiounet_scale(x: torch.Tensor, threshold: float = RADIOUNET_THRESHOLD) -> torch.Tensor:
    """RadioUNet's target transform: values below the threshold set to it, then [thr, 1] -> [0, 1]."""
    return (x.clamp_min(threshold) - threshold) / (1.0 - threshold)


def _on_radiounet_scale(metric: Metric) -> Metric:
    return lambda pred, target: metric(radiounet_scale(pred), radiounet_scale(target))


DEFINITIONS: dict[str, dict[str, Metric]] = {
    "radiodiff": {"psnr": psnr_target_range, "ssim": ssim_inferred_range, "nmse": nmse,
                  "rmse": rmse},
    "radiounet": {"psnr": _on_radiounet_scale(psnr), "nmse": _on_radiounet_scale(nmse),
                  "rmse": _on_radiounet_scale(rmse)},
}
SOURCES = {
    "radiodiff": "UNIC-Lab/RadioDiff sample_cond_ldm.py calc_loss_test: torchmetrics defaults "
                 "(PSNR peak = target max - min, SSIM range = max of both maps' max - min), "
                 "NMSE = MSE / mean(target^2); one map per batch",
    "radiounet": "RonLevie/RadioUNet lib/loaders.py + calc_loss_test: maps cut at the 0.2 "
                 "noise floor and stretched to [0, 1], MSE / NMSE = MSE / mean(target^2) there; "
                 "psnr = 10 log10(1 / MSE) on that scale (RadioUNet reports none)",
}


def definition_metrics(pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-map values of every definition, keyed `DEFINITION_metric` (e.g. `radiodiff_psnr`)."""
    with torch.no_grad():
        pred, target = pred.detach(), target.detach()
        return {f"{name}_{metric}": fn(pred, target)
                for name, metrics in DEFINITIONS.items() for metric, fn in metrics.items()}
