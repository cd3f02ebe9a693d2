"""DataLoader construction: seeded per-epoch shuffling, workers, and DDP sharding."""
from __future__ import annotations

from typing import Iterator

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from model.config import ConfigError


class EpochSampler(DistributedSampler):
    """DistributedSampler that also runs without torch.distributed (one replica) and advances
    its epoch after each pass, so epoch e's order is a function of (seed, e) alone: a resumed
    run calls `set_epoch(e)` and sees the same order, and a loop that never calls it still
    gets a fresh order every epoch."""

    def __init__(self, dataset: Dataset, shuffle: bool, seed: int, drop_last: bool):
        distributed = dist.is_available() and dist.is_initialized()
        super().__init__(dataset, num_replicas=dist.get_world_size() if distributed else 1,
                         rank=dist.get_rank() if distributed else 0, shuffle=shuffle,
                         seed=seed, drop_last=drop_last)

    def __iter__(self) -> Iterator[int]:
        indices = super().__iter__()  # drawn now from (seed, epoch)
        set_epoch = getattr(self.dataset, "set_epoch", None)
        if set_epoch is not None:  # per-epoch augmentation (RadioMapDataset's flips)
            set_epoch(self.epoch)
        self.epoch += 1
        return indices


def build_loader(dataset: Dataset, batch_size: int, shuffle: bool = True, seed: int = 42,
                 num_workers: int = 2, drop_last: bool = True) -> DataLoader:
    """A DataLoader over `dataset`, sharded across ranks when torch.distributed is initialised.

    `loader.sampler.set_epoch(e)` fixes the order of epoch e (as with DistributedSampler).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    sampler = EpochSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
    if drop_last and len(sampler) < batch_size:
        raise ConfigError(f"{len(sampler)} samples per process cannot fill one batch of "
                          f"{batch_size} with drop_last; lower trainer.batch_size or add data")
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
        drop_last=drop_last, pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed),  # seeds the workers' RNGs
    )
