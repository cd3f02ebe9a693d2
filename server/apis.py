"""The inference-worker side: one LitAPI per endpoint, batching requests across clients.

Requests arrive already decoded and validated (server/payloads.py, in the HTTP process), as
`Job`s. A worker merges up to max_batch_size of them, and no more than its request budget's
worth of compute (server/budget.py); `predict` groups the merged jobs by map shape and tiling
(a tiled job runs through its tiles, the others whole), runs each group through the backend in
forward passes of at most max_batch_size maps, and splits the results back per job, so a
request's answer does not depend on its neighbours.
"""
from __future__ import annotations

import logging
import os
import signal
import time
from collections import defaultdict
from pathlib import Path
from queue import Queue
from typing import NamedTuple, Optional

import litserve as ls
import numpy as np
import torch

from model.distributions import DiagonalGaussianDistribution
from model.io import from_model, to_model
from runtime.fast_layers import median_seconds
from runtime.malloc import release_free_memory
from runtime.tiling import Tiler

from . import memory, metrics, speed
from .backends import load_backend
from .budget import (BUDGET_FRACTION, UNBOUNDED, Budget, BudgetPolicy, cost_megapixels,
                     pass_megapixels)
from .litserve_adapter import STOP_SENTINEL, AdaptedBatchLoop, StopLoop
from .logs import LOGGER, configure_logging
from .payloads import Job
from .queueing import QueueSlots, default_queue
from .settings import Settings
from .spec import ModelSpec

logger = logging.getLogger(LOGGER)
SPEED_RUNS = 5  # timed warm-up runs behind a recorded speed: their median (server/speed.py)
SPEED_BOUNDS = 1.5  # served batches move the speed within this factor of the recorded one
GROWTH_RUNS = 3  # timed runs of the larger warm-up (the largest whole pass: --max-pixels)
GROWTH_MAX_SCALE = 4.0  # ... at most 4x the warm-up's side (a 64x64 model: its 256x256 tiles)
# The share of the memory a worker may still use (server/memory.py) that a batch may plan to
# take at the warm-up's measured bytes per megapixel: the rest covers what the estimate misses.
MEMORY_FRACTION = 0.8


class Queued(NamedTuple):
    """A request as litserve queues it; `timestamp` is when its HTTP handler queued it."""
    response_queue_id: int
    uid: str
    timestamp: float
    job: Job


class BlockingBatchedLoop(AdaptedBatchLoop):
    """litserve's BatchedLoop, except that an idle worker blocks on its queue, a batch is
    bounded by compute as well as by count, and deadlines hold (server/queueing.py).

    The stock loop polls the (manager-backed) queue every millisecond, or spins without pause
    when batch_timeout is 0, keeping a core busy per idle worker. Here the first request of a
    batch is awaited, and the batch then fills for at most batch_timeout seconds, while its
    requests' summed cost stays within the worker's request budget: the request that would
    pass it, or make the batch end after any member's deadline, is held over to start the next
    batch (a cheap request is never refused for an expensive batch-mate). A request that nobody
    waits for any more is dropped unrun; one that the batch, at the measured speed, would
    finish after its deadline gets 504 before the batch starts; a result finished after its
    deadline is not sent.
    """

    def __init__(self):
        super().__init__()
        self._pending: list = []  # taken off the queue, not yet batched, in arrival order
        self._last_client = 0  # whose request started the previous batch
        self._deadlines: dict[str, float] = {}  # of the running batch's requests, by uid
        self._published = False  # whether the supervisor holds a list of running requests

    def next_batch(self, lit_api: "RadioAPI", request_queue: Queue) -> list[tuple]:
        if self._published:  # the previous batch is answered
            lit_api.publish_running([])
            self._published = False
        batch: list[Queued] = []
        cost, fill_until, room = 0.0, None, None
        while len(batch) < lit_api.max_batch_size:
            item = self._next_item(request_queue, fill_until, lit_api.max_batch_size)
            if item is None:
                break
            if item == STOP_SENTINEL:
                raise StopLoop()
            queued = Queued(*item)
            total = cost + lit_api.job_cost(queued.job)
            room = lit_api.memory_room() if room is None else room  # read once per batch
            fits = lit_api.fits_in_memory(
                lit_api.memory_cost([*(q.job for q in batch), queued.job]), room)
            if batch and (total > lit_api.budget_megapixels or not fits
                          or not _all_on_time(lit_api, [*batch, queued], total)):
                self._pending.insert(0, item)  # for the next batch: never refused for a mate
                break
            if not _take(lit_api, queued):
                continue
            if not fits:  # alone, and more than the memory left: refused, not run
                self._refuse_for_memory(lit_api, queued, room)
                continue
            if not batch:
                self._last_client = queued.job.client
            batch.append(queued)
            cost = total
            fill_until = fill_until or time.monotonic() + lit_api.batch_timeout
        return self._startable(lit_api, batch, cost)

    def _refuse_for_memory(self, lit_api: "RadioAPI", queued: Queued, room: float) -> None:
        need = lit_api.bytes_per_megapixel * lit_api.memory_cost([queued.job])
        detail = (f"{lit_api.api_path}: not started: this request needs about "
                  f"{need / memory.MIB:.0f} MiB of working memory (measured at the warm-up) "
                  f"and the worker can use {MEMORY_FRACTION * room / memory.MIB:.0f} MiB now "
                  "(the machine's or container's free memory); retry later, or send fewer or "
                  "smaller maps")
        logger.warning("%s", detail)
        self.send_error(queued.response_queue_id, queued.uid, 503, detail)

    def _next_item(self, request_queue: Queue, fill_until: Optional[float], lookahead: int):
        """The next request for the batch: awaited (for up to a second) while the batch is
        empty, then until `fill_until`; None when none came. Among those already queued, the
        first batch slot goes to the oldest request of a client other than the one whose
        request started the previous batch (round robin between clients: a client looping
        expensive requests cannot keep another's small ones waiting behind all of its own)."""
        # at most a batch's worth taken ahead: the endpoint's other workers take the rest
        while len(self._pending) < lookahead and \
                (item := self.take(request_queue, block=False)) is not None:
            self._pending.append(item)
        if not self._pending:
            if fill_until is None:
                item = self.take(request_queue, timeout=1.0)
            else:
                remaining = fill_until - time.monotonic()
                item = self.take(request_queue, timeout=remaining) if remaining > 0 \
                    else None
            return item
        if fill_until is None:  # choosing the first request of a batch
            for index, waiting in enumerate(self._pending):
                if waiting == STOP_SENTINEL or Queued(*waiting).job.client != self._last_client:
                    return self._pending.pop(index)
        return self._pending.pop(0)

    def _startable(self, lit_api: "RadioAPI", batch: list[Queued], cost: float) -> list:
        """The batch's requests that it finishes by their deadlines at the measured speed, as
        (response queue, uid, job); the others get 504 now, never started."""
        now = time.monotonic()
        needs = lit_api.seconds_per_megapixel * cost
        on_time = []
        for queued in batch:
            deadline = queued.timestamp + lit_api.deadline_s
            if now + needs <= deadline:
                on_time.append(queued)
                continue
            detail = (f"{lit_api.api_path}: not started: its batch needs about {needs:.1f} s at "
                      f"the measured speed and {max(deadline - now, 0):.1f} s of its deadline "
                      f"(--timeout {lit_api.deadline_s:g} s) are left; retry later, or "
                      "send a smaller request")
            self.send_error(queued.response_queue_id, queued.uid, 504, detail)
        self._deadlines = {q.uid: q.timestamp + lit_api.deadline_s for q in on_time}
        if on_time:
            lit_api.publish_running([(q.response_queue_id, q.uid) for q in on_time])
            self._published = True
        return [(q.response_queue_id, q.uid, q.job) for q in on_time]

    def deliver(self, uid: str) -> bool:
        late = time.monotonic() - self._deadlines.get(uid, float("inf"))
        if late > 0:  # its HTTP handler answered 504 at the deadline: nobody waits for it
            logger.info("request %s finished %.1f s after its deadline; result discarded", uid,
                        late)
        return late <= 0

    def __call__(self, *args, **kwargs) -> None:
        # The main process stops workers (after the HTTP processes have drained) with a sentinel
        # on their queue; a signal sent to the whole process group (Ctrl+C, systemd, `timeout`)
        # must not cut a batch short.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        torch.seed()  # unseeded samples: a fresh process starts from torch's fixed default seed
        super().__call__(*args, **kwargs)
        # The loop saw the stop sentinel: leave at once. Results have been sent and metrics live
        # in mmap'd files, so nothing needs finalizing, and a spawned worker's interpreter
        # teardown (garbage-collecting torch and manager proxies) was seen to spin for seconds.
        logging.shutdown()
        os._exit(0)


def _all_on_time(lit_api: "RadioAPI", batch: list[Queued], cost: float) -> bool:
    """Whether a batch costing `cost` megapixels, started now, ends before every member's
    deadline at the measured speed."""
    ends = time.monotonic() + lit_api.seconds_per_megapixel * cost
    return all(ends <= q.timestamp + lit_api.deadline_s for q in batch)


def _take(lit_api: "RadioAPI", queued: Queued) -> bool:
    """Claim a queued request for the batch; False (it is dropped unrun) when nobody waits."""
    if time.monotonic() >= queued.timestamp + lit_api.deadline_s:
        # Its HTTP handler answers 504 at the deadline and frees the slot, counting the
        # request once, as never run.
        lit_api.slots.drop(queued.job.ticket)
        logger.info("%s: dropped request %s: its deadline passed in the queue",
                    lit_api.api_path, queued.uid)
        return False
    if not lit_api.slots.claim(queued.job.ticket):
        logger.info("%s: dropped request %s: its HTTP handler stopped waiting (deadline, or "
                    "the client left)", lit_api.api_path, queued.uid)
        return False
    return True


class RadioAPI(ls.LitAPI):
    """Shared worker logic; subclasses define `run(jobs) -> results` for one endpoint."""

    name = ""
    factor = 1  # input pixels -> output map pixels, per side (latents: the downsampling factor)

    def __init__(self, spec: ModelSpec, max_batch_size: int, batch_timeout: float,
                 precision: str = "auto", require_cuda: bool = False, log_level: str = "info",
                 threads: int = 0, warmup_size: Optional[tuple[int, int]] = None,
                 budget: BudgetPolicy = UNBOUNDED, max_queue: Optional[int] = None,
                 path: str = "auto", autotune_budget: float = 60.0,
                 allow_inaccurate: bool = False, max_queue_bytes: float = float("inf"),
                 largest_pass: int = 512 * 512):
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout,
                         api_path=f"/{self.name}", loop=BlockingBatchedLoop())
        self.model_spec, self.precision, self.require_cuda = spec, precision, require_cuda
        self.log_level, self.threads, self.budget = log_level, threads, budget
        # the torch backend's inference path, and what measuring it may cost (runtime/autotune.py)
        self.path, self.autotune_budget = path, autotune_budget
        self.allow_inaccurate = allow_inaccurate
        self.on_cpu = False  # set by setup: how warm-up runs are timed
        self.largest_pass = largest_pass  # pixels of the largest whole pass (--max-pixels)
        self.warmup_size = warmup_size or spec.config_size  # the size most requests will have
        # Manager dicts the server attaches: what each worker published (for /info), and the
        # requests each worker is running (for the supervisor, should the worker die).
        self.worker_info: Optional[dict] = None
        self.running: Optional[dict] = None
        self.budget_megapixels = float("inf")  # set by setup, from the timed warm-up
        self.seconds_per_megapixel = 0.0  # likewise
        self.growth = 0.0  # likewise: how a pass's cost grows above the warm-up size
        self.measured_to = 0.0  # likewise: the larger warm-up's megapixels
        self.recorded_rate = 0.0  # the recorded speed; seconds_per_megapixel moves around it
        self._published_at = 0.0
        self.bytes_per_megapixel = 0.0  # likewise: peak resident memory a megapixel adds
        self.base_resident = 0  # resident bytes once the model is loaded, before any batch
        # Made here, in the main process: the HTTP processes fork with it, the workers get it
        # pickled at spawn.
        self.slots = QueueSlots(max_queue or default_queue(max_batch_size, 1), max_queue_bytes)
        # Requests in flight (queued or running) per client, released only when answered: a
        # client's share (server/queueing.py) counts the work it has running too.
        self.in_flight = QueueSlots(2 * self.slots.capacity)

    def setup(self, device: str) -> None:
        configure_logging(self.log_level)  # a spawned worker starts with no logging set up
        self.on_cpu = not str(device).startswith("cuda")
        if self.threads:
            torch.set_num_threads(self.threads)
        self.backend = load_backend(self.model_spec, device, self.precision, self.require_cuda,
                                    self.threads, self.path, self.warmup_size,
                                    self.autotune_budget, self.name, self.allow_inaccurate)
        self.base_resident = memory.resident_bytes() or 0
        measured = speed.recorded(self._speed_file(), self._speed_entry(), self._measure_warmup)
        if measured["source"] != "measured":
            self.run([self.warmup_job()])  # one-time costs paid before the first request
        rate, self.bytes_per_megapixel = (measured["seconds_per_megapixel"],
                                          measured["bytes_per_megapixel"])
        self.growth = measured["cost_growth_per_megapixel"]
        self.measured_to = measured["growth_measured_to_megapixels"]
        self.seconds_per_megapixel = self.recorded_rate = rate
        self._set_budget(rate)
        described = {**self.backend.describe(), "endpoint": self.api_path, "pid": os.getpid(),
                     "seconds_per_megapixel": rate, "budget_megapixels": self.budget_megapixels,
                     "bytes_per_megapixel": round(self.bytes_per_megapixel),
                     "max_pass_megapixels": _finite(self._memory_megapixels()),
                     "pass_maps": self.max_batch_size,
                     "cost_growth_per_megapixel": self.growth,
                     "growth_measured_to_megapixels": self.measured_to,
                     "warmup_megapixels": self._warmup_cost(linear=True),
                     "speed_source": measured["source"]}
        logger.info("%s worker ready (pid %d): %s, %s; %.3g s/MP (%s), budget %.4g MP; GET /info "
                    "has the details", self.api_path, os.getpid(), described["backend"],
                    described["precision"], rate, measured["source"], self.budget_megapixels)
        if self.worker_info is not None:
            self.worker_info[self.worker_key] = described

    @property
    def deadline_s(self) -> float:
        """Seconds from queueing to a request's deadline (--timeout)."""
        return self.budget.timeout

    @property
    def worker_key(self) -> str:
        """litserve's name of this worker process, as in /health: "<endpoint>_<worker id>"."""
        return f"{self.name}_{os.environ.get('LITSERVE_WORKER_ID', '0')}"

    def publish_running(self, requests: list[tuple[int, str]]) -> None:
        """Tell the supervisor which requests (response queue id, uid) this worker runs now, so
        that they are answered should it die running them (server/supervisor.py)."""
        if self.running is not None:
            self.running[self.worker_key] = requests

    def warmup_job(self, scale: float = 1.0) -> Job:
        """One map of the warm-up size, each side times `scale` (a multiple of the factor)."""
        h, w = self._scaled(scale)
        return Job(np.zeros((1, 1, h, w), np.float32))

    def _scaled(self, scale: float) -> tuple[int, int]:
        f = self.model_spec.downsample_factor
        return tuple(max(f, round(side * scale / f) * f) for side in self.warmup_size)

    def job_cost(self, job: Job) -> float:
        """Megapixels of output maps, grown with the size of a pass (server/budget.py)."""
        return cost_megapixels(len(job.x), job.x.shape[-2:], self.factor, job.tiler,
                               self.cost_model())

    def memory_cost(self, jobs: list[Job]) -> float:
        """Megapixels of the largest forward pass `jobs` make together, which their working
        memory grows with: at most max_batch_size maps a pass, a tiled map a tile at a time."""
        maps = min(sum(len(job.x) for job in jobs), self.max_batch_size)
        return maps * max(pass_megapixels(job.x.shape[-2:], self.factor, job.tiler,
                                          self.cost_model()) for job in jobs)

    def cost_model(self) -> Budget:
        return Budget(self.budget_megapixels, self.growth, self._warmup_cost(linear=True),
                      self.measured_to)

    def _warmup_cost(self, scale: float = 1.0, linear: bool = False) -> float:
        job = self.warmup_job(scale)
        return cost_megapixels(len(job.x), job.x.shape[-2:], self.factor) if linear \
            else self.job_cost(job)

    def _set_budget(self, rate: float) -> None:
        one_map = self._warmup_cost()
        # speed alone: memory bounds a request's largest pass instead (max_pass_megapixels)
        self.budget_megapixels = self.budget.megapixels(rate, one_map)
        logger.info("%s: %.3g s per output megapixel; request budget %.4g megapixels",
                    self.api_path, rate, self.budget_megapixels)
        if self.budget.override is None and rate * one_map > BUDGET_FRACTION * self.budget.timeout:
            logger.warning("%s: one warm-up map takes %.3g s, more than %g of --timeout; the "
                           "budget is that one map: raise --timeout", self.api_path,
                           rate * one_map, BUDGET_FRACTION)

    def _speed_file(self) -> Optional[Path]:
        """Where this model's speed is recorded: beside its inference decision (None without
        one: an ONNX export, an unwritable cache)."""
        decision = getattr(self.backend, "decision", None)
        return Path(decision.file).with_suffix(".speed.json") if decision and decision.file \
            else None

    def _speed_entry(self) -> str:
        h, w = self.warmup_size
        return f"v6 {self.name} {h}x{w} to {self.largest_pass} batch {self.max_batch_size}"

    def _measure_warmup(self) -> speed.Speed:
        """Seconds and peak resident bytes per output megapixel of this endpoint on this
        device: a run's memory, and the median of SPEED_RUNS timed runs (one-time costs
        paid, kernel choices settled by the decision; on a CPU, what a run takes with its cores
        to itself, so that another job running at the time does not shrink the budget recorded
        for every later start: runtime/fast_layers.median_seconds)."""
        cost = self._warmup_cost(linear=True)
        # The same at the largest whole pass: how a pixel's cost changes with the pass's size.
        scale = min((self.largest_pass / (cost * 1e6)) ** 0.5, GROWTH_MAX_SCALE)
        big = self._warmup_cost(scale, linear=True)
        one_size = big <= cost * 1.2  # no larger pass to measure: memory at the warm-up size
        grown = self._added_memory() if one_size else 0  # first: nothing reused yet
        rate = self._median_seconds(1.0, SPEED_RUNS) / cost
        if one_size:
            return {"seconds_per_megapixel": rate, "bytes_per_megapixel": grown / cost,
                    "cost_growth_per_megapixel": 0.0, "growth_measured_to_megapixels": cost}
        grown_big = self._added_memory(scale)
        larger = self._median_seconds(scale, GROWTH_RUNS)
        growth = (larger / big / rate - 1.0) / (big - cost)
        logger.info("%s: %.3g s per megapixel at %dx%d, %.3g s for one %dx%d pass",
                    self.api_path, rate, *self.warmup_size, larger, *self._scaled(scale))
        # per megapixel of the larger pass: a small pass's fixed allocations would count many
        # times over (the tiny test model's 32x32 pass gave GBs per megapixel)
        return {"seconds_per_megapixel": rate, "bytes_per_megapixel": grown_big / big,
                "cost_growth_per_megapixel": growth, "growth_measured_to_megapixels": big}

    def _median_seconds(self, scale: float, runs: int) -> float:
        job = self.warmup_job(scale)
        return median_seconds(lambda: self.run([job]), runs, self.on_cpu)

    def _added_memory(self, scale: float = 1.0) -> int:
        """The resident memory one warm-up run adds at its peak (0 where the peak cannot be
        measured), after the heap has given back what earlier runs left free: the autotuner's
        probes held as much as a 512x512 pass needs, and a pass measured on top of them seemed
        to need 0.5-80 MB per megapixel, where requests took 0.26-1.4 GB."""
        release_free_memory()
        base = memory.resident_bytes() if memory.reset_peak() else None
        self.run([self.warmup_job(scale)])
        peak = memory.peak_resident_bytes()
        return 0 if base is None or peak is None else max(peak - base, 0)

    def _memory_megapixels(self) -> float:
        """The largest pass whose measured working memory fits in this process's share of all
        the memory there is (the machine's, or its container's limit); inf where unknown. A
        request whose largest pass is larger can never run: 413 (server/budget.py)."""
        capacity = memory.capacity_bytes()
        if capacity is None or not self.bytes_per_megapixel:
            return float("inf")
        return MEMORY_FRACTION * (capacity - self.base_resident) / self.bytes_per_megapixel

    def memory_room(self) -> float:
        """Bytes a batch may take: what the machine (or container) still has free, plus what
        this worker already holds from earlier batches and reuses; inf where unknown."""
        free = memory.available_bytes()
        if free is None or not self.bytes_per_megapixel:
            return float("inf")
        held = max((memory.resident_bytes() or 0) - self.base_resident, 0)
        return float(free + held)

    def fits_in_memory(self, megapixels: float, room: float) -> bool:
        return self.bytes_per_megapixel * megapixels <= MEMORY_FRACTION * room

    def decode_request(self, request: Job) -> Job:
        return request  # decoded and validated by the HTTP process

    def predict(self, jobs: list[Job]) -> list[np.ndarray]:
        start = time.perf_counter()
        results: list = [None] * len(jobs)
        for indices in _groups_by_shape(jobs):
            group = [jobs[i] for i in indices]
            for i, result in zip(indices, self.run(group)):
                results[i] = result
            self._observe_forward_passes(sum(len(job.x) for job in group))
        endpoint = self.api_path
        seconds = time.perf_counter() - start
        self._refresh_speed(seconds, sum(self.job_cost(job) for job in jobs))
        metrics.MODEL_SECONDS.labels(endpoint).observe(seconds)
        metrics.BATCH_REQUESTS.labels(endpoint).observe(len(jobs))
        metrics.MAPS.labels(endpoint).inc(sum(len(job.x) for job in jobs))
        return results

    def _refresh_speed(self, seconds: float, cost: float) -> None:
        """Move the speed behind deadline checks (a batch that would end too late: 504) and
        Retry-After towards what served batches show, a fifth of the way per batch, within
        SPEED_BOUNDS of the recorded speed; the budget (413) stays the recorded one."""
        if cost <= 0 or not self.recorded_rate:
            return
        observed = seconds / cost
        low, high = self.recorded_rate / SPEED_BOUNDS, self.recorded_rate * SPEED_BOUNDS
        rate = 0.8 * self.seconds_per_megapixel + 0.2 * observed
        self.seconds_per_megapixel = min(max(rate, low), high)
        if self.worker_info is not None and time.monotonic() > self._published_at + 10.0:
            self._published_at = time.monotonic()  # at most every 10 s: a manager round trip
            self.worker_info[self.worker_key] = {**self.worker_info[self.worker_key],
                                                 "seconds_per_megapixel":
                                                     self.seconds_per_megapixel}

    def encode_response(self, output: np.ndarray) -> np.ndarray:
        return output  # encoded for the client's Accept by the HTTP process

    def run(self, jobs: list[Job]) -> list[np.ndarray]:
        """The results of `jobs`, which share a shape and a tiler (predict groups them)."""
        raise NotImplementedError

    def _observe_forward_passes(self, n: int) -> None:
        for start in range(0, n, self.max_batch_size):
            metrics.BATCH_SIZE.labels(self.api_path).observe(min(self.max_batch_size, n - start))

    def _slices(self, n: int):
        return (slice(s, s + self.max_batch_size) for s in range(0, n, self.max_batch_size))

    def _encode(self, maps: torch.Tensor, tiler: Optional[Tiler]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [self.backend.encode(maps[s], tiler) for s in self._slices(len(maps))]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def _decode(self, latents: torch.Tensor, tiler: Optional[Tiler]) -> torch.Tensor:
        return torch.cat([self.backend.decode(latents[s], tiler)
                          for s in self._slices(len(latents))])

    def _latents(self, jobs: list[Job]) -> list[torch.Tensor]:
        """Per job: the posterior mean, or a sample drawn with the job's own seeded generator."""
        mean, logvar = self._encode(to_model(np.concatenate([job.x for job in jobs])),
                                    jobs[0].tiler)
        latents, start = [], 0
        for job in jobs:
            part = slice(start, start + len(job.x))
            start += len(job.x)
            if job.mode == "sample":
                posterior = DiagonalGaussianDistribution(torch.cat([mean[part], logvar[part]], 1))
                generator = None if job.seed is None else torch.Generator().manual_seed(job.seed)
                latents.append(posterior.sample(generator))
            else:
                latents.append(mean[part])
        return latents


class EncodeAPI(RadioAPI):
    name = "encode"

    def run(self, jobs: list[Job]) -> list[np.ndarray]:
        scale = self.model_spec.scale_factor
        return [(z * scale if job.scaled else z).numpy()
                for job, z in zip(jobs, self._latents(jobs))]


class DecodeAPI(RadioAPI):
    name = "decode"

    @property
    def factor(self) -> int:
        return self.model_spec.downsample_factor

    def warmup_job(self, scale: float = 1.0) -> Job:
        h, w = self._scaled(scale)
        f = self.model_spec.downsample_factor
        return Job(np.zeros((1, self.model_spec.latent_channels, h // f, w // f), np.float32))

    def run(self, jobs: list[Job]) -> list[np.ndarray]:
        scale = self.model_spec.scale_factor
        latents = torch.cat([torch.from_numpy(job.x / scale if job.scaled else job.x)
                             for job in jobs])
        return _split(from_model(self._decode(latents, jobs[0].tiler)).numpy(), jobs)


class ReconstructAPI(RadioAPI):
    name = "reconstruct"

    def run(self, jobs: list[Job]) -> list[np.ndarray]:
        maps = from_model(self._decode(torch.cat(self._latents(jobs)), jobs[0].tiler))
        return _split(maps.numpy(), jobs)


def _finite(value: float) -> Optional[float]:
    """`value`, or None (JSON's "unknown") when it is infinite."""
    return None if value == float("inf") else value


def _groups_by_shape(jobs: list[Job]) -> list[list[int]]:
    """Indices of the jobs that run together: the same map shape and the same tiler."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, job in enumerate(jobs):
        groups[job.x.shape[1:], job.tiler].append(i)
    return list(groups.values())


def _split(batch: np.ndarray, jobs: list[Job]) -> list[np.ndarray]:
    bounds = np.cumsum([len(job.x) for job in jobs])[:-1]
    return np.split(batch, bounds)


def build_apis(spec: ModelSpec, settings: Settings) -> list[RadioAPI]:
    """One LitAPI per endpoint, configured from the server settings."""
    budget = BudgetPolicy.of(settings)
    return [cls(spec, settings.max_batch_size, settings.batch_timeout, settings.precision,
                settings.device == "cuda", settings.log_level, settings.threads,
                settings.resolution, budget=budget, max_queue=settings.queue_capacity,
                path=settings.path, autotune_budget=settings.autotune_budget,
                allow_inaccurate=settings.allow_inaccurate_path,
                max_queue_bytes=settings.max_queue_mb * 2**20,
                largest_pass=settings.max_pixels)
            for cls in (EncodeAPI, DecodeAPI, ReconstructAPI)]
