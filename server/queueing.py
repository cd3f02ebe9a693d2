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

import hashlib
import ipaddress
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


class OverShare(Exception):
    """The client already has `held` megapixels queued: more would pass its share."""

    def __init__(self, held: float):
        super().__init__(held)
        self.held = held


FREE, QUEUED, ABANDONED, DROPPED = 0, 1, 2, 3  # a slot's states (QueueSlots)


class QueueSlots:
    """The tickets of one endpoint's queue: at most `capacity` requests are in it at a time,
    counting those whose client left but whose payload the queue still holds (ABANDONED: the
    next worker to meet it drops it and frees the slot), so that the queue process never holds
    more payloads than its capacity; at most `max_bytes` of payloads; and one client's cost
    stays within its share (one per-request budget), so that a client looping expensive
    requests cannot fill the queue ahead of everyone else.

    A slot goes FREE -> QUEUED (take) -> FREE when a worker runs it (claim), or -> ABANDONED
    when its handler stops waiting (abandon) -> FREE when a worker meets it (claim, False), or
    -> DROPPED when a worker drops it at its deadline (drop) -> FREE when its handler gives up
    (abandon). `release` frees a slot at once (for accounting that ends with the answer)."""

    def __init__(self, capacity: int, max_bytes: float = math.inf):
        # A spawn-context lock: a fork-context one cannot be passed to the spawned workers.
        ctx = mp.get_context("spawn")
        self.capacity, self.max_bytes = capacity, max_bytes
        self._generation = ctx.Array("q", capacity)  # which request a slot holds (its ticket)
        self._state = ctx.Array("b", capacity, lock=False)  # under _generation's lock
        self._cost = ctx.Array("d", capacity, lock=False)
        self._bytes = ctx.Array("q", capacity, lock=False)
        self._client = ctx.Array("q", capacity, lock=False)  # who queued it (0: nobody known)

    def take(self, cost: float, client: int = 0, share: float = math.inf,
             size: int = 0) -> Optional[Ticket]:
        """A ticket for `client`'s request costing `cost` megapixels and `size` payload bytes;
        None when the queue is full (slots or bytes); OverShare when the client has work in it
        and this would take it past `share` (with nothing in it, a client may always queue one
        admitted request)."""
        with self._generation.get_lock():
            held = [slot for slot in range(self.capacity) if self._state[slot] != FREE]
            mine = sum(self._cost[s] for s in held if client and self._client[s] == client
                       and self._state[s] == QUEUED)
            if mine and mine + cost > share:
                raise OverShare(mine)
            if sum(self._bytes[s] for s in held) + size > self.max_bytes:
                return None
            free = next((slot for slot in range(self.capacity) if self._state[slot] == FREE),
                        None)
            if free is None:
                return None
            generations = self._generation.get_obj()
            generations[free] += 1
            self._state[free] = QUEUED
            self._cost[free], self._bytes[free], self._client[free] = cost, size, client
            return Ticket(free, generations[free])

    def _move(self, ticket: Ticket, moves: dict[int, int]) -> Optional[int]:
        """Under the lock: the slot's state before, moved as `moves` says (None: not this
        ticket's request any more)."""
        if self._generation.get_obj()[ticket.slot] != ticket.generation:
            return None
        before = self._state[ticket.slot]
        after = moves.get(before, before)
        self._state[ticket.slot] = after
        if after == FREE:
            self._cost[ticket.slot], self._bytes[ticket.slot] = 0.0, 0
            self._client[ticket.slot] = 0
        return before

    def claim(self, ticket: Ticket) -> bool:
        """A worker meets the request: True to run it; False to drop it (its client left)."""
        with self._generation.get_lock():
            return self._move(ticket, {QUEUED: FREE, ABANDONED: FREE}) == QUEUED

    def drop(self, ticket: Ticket) -> None:
        """A worker drops the request unrun (its deadline passed in the queue)."""
        with self._generation.get_lock():
            self._move(ticket, {QUEUED: DROPPED, ABANDONED: FREE})

    def abandon(self, ticket: Ticket) -> bool:
        """The handler stops waiting: True when the request never ran (and never will)."""
        with self._generation.get_lock():
            return self._move(ticket, {QUEUED: ABANDONED, DROPPED: FREE}) in (QUEUED, DROPPED)

    def release(self, ticket: Ticket) -> None:
        with self._generation.get_lock():
            self._move(ticket, {QUEUED: FREE, ABANDONED: FREE, DROPPED: FREE})

    def waiting(self) -> tuple[int, float]:
        """The requests waiting to run, and their summed cost in megapixels."""
        with self._generation.get_lock():
            held = [slot for slot in range(self.capacity) if self._state[slot] == QUEUED]
            return len(held), sum(self._cost[slot] for slot in held)


class Abandoned(Exception):
    """The HTTP handler stopped waiting for its request: `reason` is deadline or disconnected."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def client_key(peer: Optional[str], forwarded: Optional[str],
               trusted: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> int:
    """A client's identity for fair shares, as a nonzero 63-bit number: the address a trusted
    proxy (nginx, an ingress; `trusted`: their networks) names in X-Real-IP, else the
    connection's own address."""
    who = forwarded.strip() if forwarded and _within(peer, trusted) else (peer or "unknown")
    return int.from_bytes(hashlib.blake2b(who.encode(), digest_size=8).digest(), "big") >> 1 or 1


def trusted_networks(spec: str) -> tuple:
    """'127.0.0.1,10.0.0.0/8' -> the networks whose X-Real-IP is believed; ValueError naming a
    bad entry."""
    try:
        return tuple(ipaddress.ip_network(part.strip(), strict=False)
                     for part in spec.split(",") if part.strip())
    except ValueError as err:
        raise ValueError(f"--trusted-proxies: {err}; expected addresses or networks such as "
                         "'127.0.0.1,10.0.0.0/8'") from None


def _within(peer: Optional[str], trusted: Iterable) -> bool:
    try:
        address = ipaddress.ip_address(peer or "")
    except ValueError:
        return False
    return any(address in network for network in trusted)


def retry_after(workers: Iterable[dict], path: str, queued_megapixels: float,
                timeout: float = math.inf) -> int:
    """Seconds until `path`'s workers have worked through what is queued, at the speed they
    measured (the slowest of them), shared among them; at least 1, and at most `timeout`
    (--timeout): every queued request has run or been given up on by then."""
    rates = [w["seconds_per_megapixel"] for w in workers
             if w.get("endpoint") == path and "seconds_per_megapixel" in w]
    if not rates:
        return 1
    drain = math.ceil(max(rates) * queued_megapixels / len(rates))
    return max(1, drain if math.isinf(timeout) else min(drain, math.ceil(timeout)))
