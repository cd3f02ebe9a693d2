"""The radio-map literature's four metrics (PSNR, SSIM, NMSE, RMSE), batched, on maps in [0, 1],
and three radio-map ones that need the building mask (RMSE in dB outdoors, error inside
buildings, RMSE in dB near the transmitter).

Every function takes `pred` and `target` of the same shape `[B, C, H, W]`, `[B, H, W]` or
`[H, W]` and returns one value per sample (shape `[B]`, or `[]` for a single map).
SSIM follows Wang et al. 2004 exactly as scikit-image computes it with
`gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1`: an 11-tap
Gaussian window, K1 = 0.01, K2 = 0.03, averaged over the window positions fully inside the map.
NMSE is per map: sum((pred - target)^2) / sum(target^2).
The radio metrics also take `buildings`, a bool mask of the same shape (True inside buildings),
and convert gray errors to dB with model.io's scaling (1 gray unit = GAIN_MAX_DB - GAIN_MIN_DB
= 100 dB); they are NaN for a map whose mask leaves no pixel to average over.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from model.io import GAIN_MAX_DB, GAIN_MIN_DB

SSIM_SIGMA = 1.5
SSIM_WIN = 11
SSIM_K1, SSIM_K2 = 0.01, 0.03
_EPS = 1e-12  # NMSE of an all-zero target
DB_PER_GRAY = GAIN_MAX_DB - GAIN_MIN_DB  # dB per unit of gray level (100)
TX_PERCENT = 10  # tx_rmse_db: the strongest 10% of each map's outdoor pixels


def _as_batch(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Both maps as float64 [B, C, H, W]; the flag says the input was a single [H, W] map."""
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} "
                         f"and {tuple(target.shape)}")
    if pred.ndim not in (2, 3, 4):
        raise ValueError(f"expected maps of shape [H, W], [B, H, W] or [B, C, H, W], "
                         f"got {tuple(pred.shape)}")
    single = pred.ndim == 2
    while pred.ndim < 4:
        pred, target = pred.unsqueeze(-3), target.unsqueeze(-3)
    return pred.double(), target.double(), single


def _per_sample(values: torch.Tensor, single: bool) -> torch.Tensor:
    values = values.float()
    return values[0] if single else values


def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per map."""
    p, t, single = _as_batch(pred, target)
    return _per_sample((p - t).pow(2).flatten(1).mean(1), single)


def rmse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Root mean squared error per map."""
    return mse(pred, target).sqrt()


def nmse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Normalised MSE per map: ||pred - target||^2 / ||target||^2."""
    p, t, single = _as_batch(pred, target)
    err = (p - t).pow(2).flatten(1).sum(1)
    energy = t.pow(2).flatten(1).sum(1).clamp_min(_EPS)
    return _per_sample(err / energy, single)


def psnr(pred: torch.Tensor, target: torch.Tensor,
         data_range: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per map (inf for identical maps); `data_range` is one
    number or one per map ([B])."""
    p, t, single = _as_batch(pred, target)
    err = (p - t).pow(2).flatten(1).mean(1)
    peak = torch.as_tensor(data_range, dtype=torch.float64, device=p.device)
    return _per_sample(10.0 * torch.log10(peak ** 2 / err), single)


def _gaussian_window(device: torch.device) -> torch.Tensor:
    x = torch.arange(SSIM_WIN, dtype=torch.float64, device=device) - SSIM_WIN // 2
    w = torch.exp(-x.pow(2) / (2 * SSIM_SIGMA ** 2))
    return w / w.sum()


def _blur(x: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter over [N, 1, H, W], valid positions only."""
    x = F.conv2d(x, window.view(1, 1, -1, 1))
    return F.conv2d(x, window.view(1, 1, 1, -1))


def ssim(pred: torch.Tensor, target: torch.Tensor,
         data_range: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Structural similarity per map (channels averaged); `data_range` is one number or one
    per map ([B])."""
    p, t, single = _as_batch(pred, target)
    b, c, h, w = p.shape
    if min(h, w) < SSIM_WIN:
        raise ValueError(f"SSIM needs maps of at least {SSIM_WIN}x{SSIM_WIN}, got {h}x{w}")
    window = _gaussian_window(p.device)
    stack = torch.cat([p, t, p * p, t * t, p * t]).reshape(5 * b * c, 1, h, w)
    mu_p, mu_t, e_pp, e_tt, e_pt = _blur(stack, window).reshape(5, b, c, h - SSIM_WIN + 1, -1)
    var_p, var_t = e_pp - mu_p ** 2, e_tt - mu_t ** 2
    cov = e_pt - mu_p * mu_t
    peak = torch.as_tensor(data_range, dtype=torch.float64, device=p.device).reshape(-1, 1, 1, 1)
    c1, c2 = (SSIM_K1 * peak) ** 2, (SSIM_K2 * peak) ** 2
    num = (2 * mu_p * mu_t + c1) * (2 * cov + c2)
    den = (mu_p ** 2 + mu_t ** 2 + c1) * (var_p + var_t + c2)
    return _per_sample((num / den).flatten(1).mean(1), single)


def _mask(buildings: torch.Tensor, like: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The bool building mask as [B, C, H, W] (`like` is the caller's pred, `shape` its batch)."""
    if buildings.dtype != torch.bool:
        raise ValueError(f"buildings must be a bool mask (e.g. buildings_map > 0.5), "
                         f"got dtype {buildings.dtype}")
    if buildings.shape != like.shape:
        raise ValueError(f"buildings must have the maps' shape {tuple(like.shape)}, "
                         f"got {tuple(buildings.shape)}")
    return buildings.reshape(shape).to(like.device)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-map mean of `values` over the True pixels of `mask` (NaN where there are none)."""
    v, m = values.flatten(1), mask.flatten(1)
    return torch.where(m, v, 0.0).sum(1) / m.sum(1)


def _strongest(target: torch.Tensor, outdoor: torch.Tensor) -> torch.Tensor:
    """Mask of the outdoor pixels whose truth is at least the k-th largest outdoor value of
    their map, k = ceil(TX_PERCENT% of the outdoor pixels) (ties at the threshold included)."""
    t, m = target.flatten(1), outdoor.flatten(1)
    ranked = t.masked_fill(~m, float("-inf")).sort(1, descending=True).values
    k = ((m.sum(1) * TX_PERCENT + 99) // 100).clamp_min(1)
    return ((t >= ranked.gather(1, k[:, None] - 1)) & m).reshape(target.shape)


def rmse_db(pred: torch.Tensor, target: torch.Tensor, buildings: torch.Tensor) -> torch.Tensor:
    """RMSE in dB over each map's non-building pixels."""
    p, t, single = _as_batch(pred, target)
    outdoor = ~_mask(buildings, pred, p.shape)
    return _per_sample(DB_PER_GRAY * _masked_mean((p - t).pow(2), outdoor).sqrt(), single)


def building_error(pred: torch.Tensor, target: torch.Tensor,
                   buildings: torch.Tensor) -> torch.Tensor:
    """Mean |pred - target| inside buildings (the truth is 0 there), in gray units."""
    p, t, single = _as_batch(pred, target)
    return _per_sample(_masked_mean((p - t).abs(), _mask(buildings, pred, p.shape)), single)


def tx_rmse_db(pred: torch.Tensor, target: torch.Tensor, buildings: torch.Tensor) -> torch.Tensor:
    """RMSE in dB over the strongest TX_PERCENT% of the truth's outdoor pixels (near the
    transmitter)."""
    p, t, single = _as_batch(pred, target)
    strong = _strongest(t, ~_mask(buildings, pred, p.shape))
    return _per_sample(DB_PER_GRAY * _masked_mean((p - t).pow(2), strong).sqrt(), single)


METRICS = {"psnr": psnr, "ssim": ssim, "nmse": nmse, "rmse": rmse}
RADIO_METRICS = {"rmse_db": rmse_db, "building_error": building_error, "tx_rmse_db": tx_rmse_db}
METRIC_NAMES = (*METRICS, *RADIO_METRICS)


def per_sample_metrics(pred: torch.Tensor, target: torch.Tensor,
                       buildings: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """One value per map of the four metrics, plus the radio ones when `buildings` is given."""
    with torch.no_grad():
        pred, target = pred.detach(), target.detach()
        values = {name: fn(pred, target) for name, fn in METRICS.items()}
        if buildings is not None:
            values |= {name: fn(pred, target, buildings) for name, fn in RADIO_METRICS.items()}
        return values


def mean_metrics(pred: torch.Tensor, target: torch.Tensor,
                 buildings: torch.Tensor | None = None) -> dict[str, float]:
    """Each metric averaged over the maps where it is defined, as plain floats."""
    return {name: v.nanmean().item()
            for name, v in per_sample_metrics(pred, target, buildings).items()}
