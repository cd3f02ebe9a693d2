"""The LDM's training loop: AdamW, EMA weights, bf16 autocast on CPU, and a held-out curve
(decoded through the server) against step and CPU time."""
from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader

from .data import LatentPairs
from .diffusion import v_loss


@dataclass
class TrainOptions:
    steps: int = 3000
    batch_size: int = 16
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup: int = 100
    ema_decay: float = 0.999
    eval_every: int = 500
    amp: bool = True
    seed: int = 0


def learning_rate(step: int, o: TrainOptions) -> float:
    """Linear warm-up, then cosine decay to min_lr."""
    if step < o.warmup:
        return o.lr * (step + 1) / o.warmup
    done = (step - o.warmup) / max(1, o.steps - o.warmup)
    return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1 + math.cos(math.pi * min(1.0, done)))


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, step: int, decay: float) -> None:
    d = min(decay, (1 + step) / (10 + step))  # warm-up, as ema_pytorch
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - d)


def train(model: nn.Module, data: LatentPairs, o: TrainOptions, curve_path: Path,
          evaluate: Callable[[nn.Module], dict]) -> nn.Module:
    """Train `model`; every `eval_every` steps (and at the end) append a curve point to
    `curve_path` (JSONL: step, training CPU seconds of this process (the curve's own sampling
    excluded), wall seconds, loss, and `evaluate(ema)`); returns the EMA model."""
    torch.manual_seed(o.seed)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(o.seed)
    loader = DataLoader(data, batch_size=o.batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(o.seed))
    cpu0, wall0, step, epoch, losses = time.process_time(), time.perf_counter(), 0, 0, []
    eval_cpu = 0.0  # the curve's own sampling is not training time
    curve_path.parent.mkdir(parents=True, exist_ok=True)
    while step < o.steps:
        data.set_epoch(epoch)
        for z, cond, _ in loader:
            for group in opt.param_groups:
                group["lr"] = learning_rate(step, o)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=o.amp):
                loss = v_loss(model, z, cond, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            update_ema(ema, model, step, o.ema_decay)
            losses.append(loss.item())
            step += 1
            if step % o.eval_every == 0 or step == o.steps:
                point = {"step": step, "cpu_s": time.process_time() - cpu0 - eval_cpu,
                         "wall_s": time.perf_counter() - wall0,
                         "loss": sum(losses) / len(losses)}
                before = time.process_time()
                point |= evaluate(ema)
                eval_cpu += time.process_time() - before
                losses = []
                with open(curve_path, "a") as f:
                    f.write(json.dumps(point) + "\n")
                print(json.dumps(point), flush=True)
                model.train()
            if step >= o.steps:
                break
        epoch += 1
    return ema
