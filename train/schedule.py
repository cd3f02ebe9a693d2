"""The learning-rate schedule: optional linear warmup, then upstream's polynomial decay
(1 - step / total) ** 0.95, floored at the absolute `min_lr`."""
from __future__ import annotations

from typing import Callable

from model.run_config import TrainerConfig

POWER = 0.95


def lr_multiplier(cfg: TrainerConfig) -> Callable[[int], float]:
    """The factor on `cfg.lr` at each step, for torch.optim.lr_scheduler.LambdaLR."""
    floor = cfg.min_lr / cfg.lr  # upstream floors the factor itself at min_lr: lr -> 2.5e-12

    def multiplier(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(step / cfg.train_num_steps, 1.0)
        return max((1.0 - progress) ** POWER, floor)

    return multiplier
