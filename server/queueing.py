"""Backpressure and deadlines: a bounded queue per endpoint, shared by every server process.

An admitted request takes a ticket, one of its endpoint's `--max-queue` slots, before it is
queued; when none is free it gets 429 at once. The ticket is handed back exactly once, by
whichever comes first: a worker taking the request off the queue (it then runs), or the HTTP
handler that stops waiting for it (its deadline passed, or its client went away: it then never
runs, and the worker that meets it later drops it). The slots live in shared memory, made before
the HTTP processes fork and the workers spawn, so that every HTTP process and worker sees the
same queue under one lock: the limit is per endpoint, not per HTTP process.
"""
from __future__ import annotations

import math
import multiprocessing as mp
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Optional

# Default --max-queue: this many full batches per worker may wait. One lets the next batch fill
# while the current one runs; a second absorbs a burst. Deeper queues only add waiting that the
# deadline cuts short (the batch ahead may take half of --timeout by itself).
QUEUED_BATCHES = 2


def default_queue(max_batch_size: int, workers: int) -> int:
    return QUEUED_BATCHES * max_batch_size * workers


@dataclass(frozen=True)
class Ticket:
    """A queued request's place: its slot, and which request the slot holds."""
    slot: int
    generation: int


class QueueSlots:
    """The tickets of one endpoint's queue: at most `capacity` requests wait at a time."""

    def __init__(self, capacity: int):
        # A spawn-context lock: a fork-context one cannot be passed to the spawned workers.
        ctx = mp.get_context("spawn")
        self.capacity = capacity
        self._generation = ctx.Array("q", capacity)  # per slot: even: free; odd: a request waits
        self._cost = ctx.Array("d", capacity, lock=False)  # under _generation's lock

    def take(self, cost: float) -> Optional[Ticket]:
        """A ticket for a request costing `cost` megapixels; None when the queue is full."""
        with self._generation.get_lock():
            generations = self._generation.get_obj()
            for slot, generation in enumerate(generations):
                if generation % 2 == 0:
                    generations[slot] = generation + 1
                    self._cost[slot] = cost
                    return Ticket(slot, generation + 1)
        return None

    def claim(self, ticket: Ticket) -> bool:
        """Hand `ticket` back: True for the first caller only (worker or HTTP handler)."""
        with self._generation.get_lock():
            generations = self._generation.get_obj()
            if generations[ticket.slot] != ticket.generation:
                return False
            generations[ticket.slot] += 1
            self._cost[ticket.slot] = 0.0
            return True

    def waiting(self) -> tuple[int, float]:
        """The requests waiting, and their summed cost in megapixels."""
        with self._generation.get_lock():
            held = [slot for slot, g in enumerate(self._generation.get_obj()) if g % 2]
            return len(held), sum(self._cost[slot] for slot in held)


class Abandoned(Exception):
    """The HTTP handler stopped waiting for its request: `reason` is deadline or disconnected."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def retry_after(workers: Iterable[dict], path: str, queued_megapixels: float) -> int:
    """Seconds until `path`'s workers have worked through what is queued, at the speed they
    measured (the slowest of them), shared among them; at least 1."""
    rates = [w["seconds_per_megapixel"] for w in workers
             if w.get("endpoint") == path and "seconds_per_megapixel" in w]
    if not rates:
        return 1
    return max(1, math.ceil(max(rates) * queued_megapixels / len(rates)))
