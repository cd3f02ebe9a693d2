"""An endless, resumable stream of training batches in the loader's seeded epoch order."""
from __future__ import annotations

from typing import Any, Iterator

from torch.utils.data import DataLoader


class BatchStream:
    """Batches of `loader` epoch after epoch; epoch e's order depends only on (seed, e), so a
    stream started at `consumed` batches yields what an uninterrupted one would have."""

    def __init__(self, loader: DataLoader, consumed: int = 0):
        self.loader = loader
        self.epoch, skip = divmod(consumed, len(loader))
        self._it = self._start_epoch()
        for _ in range(skip):  # replays the epoch's order; costs loading `skip` batches
            next(self._it)

    def _start_epoch(self) -> Iterator[Any]:
        self.loader.sampler.set_epoch(self.epoch)
        return iter(self.loader)

    def __next__(self) -> Any:
        try:
            return next(self._it)
        except StopIteration:
            self.epoch += 1
            self._it = self._start_epoch()
            return next(self._it)

    def __iter__(self) -> BatchStream:
        return self
