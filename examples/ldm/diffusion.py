"""Cosine-schedule diffusion in continuous time, v-prediction, deterministic DDIM sampling."""
from __future__ import annotations

import math

import torch
from torch import nn


def alpha_sigma(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine schedule: alpha = cos(pi t / 2), sigma = sin(pi t / 2), t in [0, 1]."""
    angle = t.clamp(0, 1) * math.pi / 2
    return angle.cos(), angle.sin()


def v_loss(model: nn.Module, z0: torch.Tensor, cond: torch.Tensor,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """MSE between the model's v and v = alpha * eps - sigma * z0 at a uniform random t."""
    t = torch.rand(z0.shape[0], generator=generator)
    eps = torch.randn(z0.shape, generator=generator)
    a, s = (v.view(-1, 1, 1, 1) for v in alpha_sigma(t))
    zt = a * z0 + s * eps
    return (model(zt, t, cond) - (a * eps - s * z0)).square().mean()


@torch.no_grad()
def ddim_sample(model: nn.Module, cond: torch.Tensor, shape: tuple[int, ...], steps: int,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) from pure noise at t = 1 to t = 0 in `steps` steps."""
    z = torch.randn(shape, generator=generator)
    times = torch.linspace(1.0, 0.0, steps + 1)
    for t, t_next in zip(times[:-1], times[1:]):
        a, s = alpha_sigma(t)
        v = model(z, t.expand(shape[0]), cond)
        z0 = a * z - s * v
        eps = s * z + a * v
        a_next, s_next = alpha_sigma(t_next)
        z = a_next * z0 + s_next * eps
    return z
