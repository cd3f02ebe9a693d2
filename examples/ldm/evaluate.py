"""Held-out figures of the LDM's decoded maps, and of the VAE's own reconstruction (its
ceiling), under this project's metrics and the papers' definitions."""
from __future__ import annotations

import torch
from torch import nn

from model.literature_metrics import definition_metrics
from model.metrics import per_sample_metrics
from train.evaluate import summarize

from .data import LatentPairs
from .diffusion import ddim_sample
from .serve import ServedVAE


def score(pred: torch.Tensor, target: torch.Tensor, buildings: torch.Tensor) -> dict:
    """Per-map values of every metric, both definitions (pred, target in [0, 1])."""
    return per_sample_metrics(pred, target, buildings) | definition_metrics(pred, target)


def _decode(client: ServedVAE, data: LatentPairs, z: torch.Tensor) -> torch.Tensor:
    latents, scaled = data.for_decode(z)
    return torch.from_numpy(client.decode(latents, scaled=scaled)).float()


@torch.no_grad()
def sample_maps(model: nn.Module, data: LatentPairs, rows: list[int], client: ServedVAE,
                steps: int, seed: int) -> torch.Tensor:
    """The LDM's maps for `rows`: DDIM from seeded noise, decoded by the server."""
    cond = data.cond[rows]
    shape = (len(rows), *data.shards.index["latent_shape"])
    z = ddim_sample(model, cond, shape, steps, torch.Generator().manual_seed(seed))
    return _decode(client, data, z)


def _batches(rows: list[int], size: int) -> list[list[int]]:
    return [rows[i:i + size] for i in range(0, len(rows), size)]


def evaluate_ldm(model: nn.Module, data: LatentPairs, client: ServedVAE, rows: list[int],
                 steps: int, seed: int = 0, batch: int = 8) -> dict:
    """The summary (train.evaluate.summarize: means, percentiles, worst maps) of the LDM's
    decoded maps against the ground truth over `rows`."""
    model.eval()
    names, parts = [], []
    for k, chunk in enumerate(_batches(rows, batch)):
        pred = sample_maps(model, data, chunk, client, steps, seed + k)
        target, buildings, chunk_names = data.targets(chunk)
        parts.append(score(pred, target, buildings))
        names += chunk_names
    return _summary(names, parts, list(target.shape[-2:]))


def evaluate_vae(data: LatentPairs, client: ServedVAE, rows: list[int], batch: int = 8) -> dict:
    """The VAE's own reconstruction of `rows` (posterior means decoded by the server)."""
    names, parts = [], []
    for chunk in _batches(rows, batch):
        pred = torch.from_numpy(client.decode(data.means_raw(chunk), scaled=False)).float()
        target, buildings, chunk_names = data.targets(chunk)
        parts.append(score(pred, target, buildings))
        names += chunk_names
    return _summary(names, parts, list(target.shape[-2:]))


def _summary(names: list[str], parts: list[dict], size: list[int]) -> dict:
    values = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    return {"maps": len(names), **summarize(names, values, size)}
