"""An exponential moving average of the autoencoder weights, saved in upstream's 'ema' layout."""
from __future__ import annotations

import copy

import torch
from torch import nn

from model.checkpoint import EMA_PREFIX


class EMA:
    """Shadow weights: copied from the model until `update_after_step`, then
    ema = decay * ema + (1 - decay) * model every `update_every` calls to `update()`."""

    def __init__(self, model: nn.Module, decay: float, update_every: int, update_after_step: int):
        self.model = model
        self.ema_model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.update_every, self.update_after_step = decay, update_every, update_after_step
        self.step = 0

    @torch.no_grad()
    def update(self) -> None:
        step, self.step = self.step, self.step + 1
        if step % self.update_every:
            return
        online, shadow = self.model.state_dict(), self.ema_model.state_dict()
        for key, value in shadow.items():
            if step <= self.update_after_step or not value.is_floating_point():
                value.copy_(online[key])
            else:
                value.lerp_(online[key], 1.0 - self.decay)

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
