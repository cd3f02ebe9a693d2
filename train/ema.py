"""An exponential moving average of the autoencoder weights, saved in upstream's 'ema' layout.

The decay follows ema-pytorch (which upstream RadioDiff uses) exactly: with t the number of
`update()` calls past `update_after_step` (minus one),

    decay(t) = 0 if t <= 0, else min(1 - (1 + t / inv_gamma) ** -power, max_decay)

so the average starts by tracking the model closely and only reaches `max_decay`
(`trainer.ema_decay`) after about (1 - max_decay) ** (-1 / power) calls: with power 2/3 and
0.995 that is ~2,800 steps. A fixed decay from the first step (power 0) would keep the random
initialisation in the average for thousands of steps: the grey offset on dark maps.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from model.checkpoint import EMA_PREFIX


def ema_decay(step: int, max_decay: float, update_after_step: int, power: float = 2 / 3,
              inv_gamma: float = 1.0) -> float:
    """The decay ema-pytorch applies at the update made when its step counter reads `step`
    (counted after the increment, as ema-pytorch does)."""
    t = max(step - update_after_step - 1, 0)
    if t <= 0:
        return 0.0
    if power == 0:
        return max_decay
    return min(1.0 - (1.0 + t / inv_gamma) ** -power, max_decay)


class EMA:
    """Shadow weights: copied from the model until `update_after_step`, then
    ema = d * ema + (1 - d) * model every `update_every` calls to `update()`, with the
    warm-up decay d above (power 0 gives a fixed decay)."""

    def __init__(self, model: nn.Module, decay: float, update_every: int, update_after_step: int,
                 power: float = 2 / 3, inv_gamma: float = 1.0):
        self.model = model
        self.ema_model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.update_every, self.update_after_step = decay, update_every, update_after_step
        self.power, self.inv_gamma = power, inv_gamma
        self.step = 0

    def current_decay(self) -> float:
        return ema_decay(self.step, self.decay, self.update_after_step, self.power, self.inv_gamma)

    @torch.no_grad()
    def update(self) -> None:
        step, self.step = self.step, self.step + 1
        if step % self.update_every:
            return
        online, shadow = self.model.state_dict(), self.ema_model.state_dict()
        decay = self.current_decay()
        for key, value in shadow.items():
            if step <= self.update_after_step or not value.is_floating_point():
                value.copy_(online[key])
            else:
                value.lerp_(online[key], 1.0 - decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """`ema_model.`-prefixed weights plus upstream's `step` and `initted` entries."""
        sd = {f"{EMA_PREFIX}{k}": v for k, v in self.ema_model.state_dict().items()}
        sd["step"] = torch.tensor(self.step)
        sd["initted"] = torch.tensor(self.step > self.update_after_step)
        return sd

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        weights = {k[len(EMA_PREFIX):]: v for k, v in sd.items() if k.startswith(EMA_PREFIX)}
        self.ema_model.load_state_dict(weights, strict=True)
        self.step = int(sd["step"])
