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
from queue import Queue
from typing import NamedTuple, Optional

import litserve as ls
import numpy as np
import torch
from litserve.loops.simple_loops import BatchedLoop
from litserve.transport.base import MessageTransport
from litserve.utils import LitAPIStatus, LoopResponseType, PickleableHTTPException

from model.distributions import DiagonalGaussianDistribution
from model.io import from_model, to_model
from runtime.tiling import Tiler

from . import memory, metrics
from .backends import load_backend
from .budget import BUDGET_FRACTION, UNBOUNDED, BudgetPolicy, cost_megapixels
from .litserve_adapter import STOP_SENTINEL, StopLoop
from .logs import LOGGER, configure_logging
from .payloads import Job
from .queueing import QueueSlots, default_queue
from .settings import Settings
from .spec import ModelSpec

logger = logging.getLogger(LOGGER)
REMEASURE_BELOW = 2.0  # seconds: a warm-up shorter than this is timed a second time
# The share of the memory a worker may still use (server/memory.py) that a batch may plan to
# take at the warm-up's measured bytes per megapixel: the rest covers what the estimate misses.
MEMORY_FRACTION = 0.8


class Queued(NamedTuple):
    """A request as litserve queues it; `timestamp` is when its HTTP handler queued it."""
    response_queue_id: int
    uid: str
    timestamp: float
    job: Job


class BlockingBatchedLoop(BatchedLoop):
    """litserve's BatchedLoop, except that an idle worker blocks on its queue, a batch is
    bounded by compute as well as by count, and deadlines hold (server/queueing.py).

    The stock loop polls the (manager-backed) queue every millisecond, or spins without pause
    when batch_timeout is 0, keeping a core busy per idle worker. Here the first request of a
    batch is awaited, and the batch then fills for at most batch_timeout seconds, while its
    requests' summed cost stays within the worker's request budget: the request that would
    pass it is held over to start the next batch. A request that nobody waits for any more is
    dropped unrun; one that the batch, at the measured speed, would finish after its deadline
    gets 504 before the batch starts; a result finished after its deadline is not sent.
    """

    def __init__(self):
        super().__init__()
        self._held = None
        self._deadlines: dict[str, float] = {}  # of the running batch's requests, by uid
        self._published = False  # whether the supervisor holds a list of running requests

    def get_batch_requests(self, lit_api: "RadioAPI", request_queue: Queue,
                           transport: MessageTransport) -> tuple[list, list]:
        if self._published:  # the previous batch is answered
            lit_api.publish_running([])
            self._published = False
        batch: list[Queued] = []
        cost, fill_until, room = 0.0, None, None
        while len(batch) < lit_api.max_batch_size:
            item = self._next_item(request_queue, fill_until)
            if item is None:
                break
            if item == STOP_SENTINEL:
                raise StopLoop()
            queued = Queued(*item)
            total = cost + lit_api.job_cost(queued.job)
            room = lit_api.memory_room() if room is None else room  # read once per batch
            fits = lit_api.fits_in_memory(total, room)
            if batch and (total > lit_api.budget_megapixels or not fits):
                self._held = item
                break
            if not _take(lit_api, queued):
                continue
            if not fits:  # alone, and more than the memory left: refused, not run
                self._refuse_for_memory(lit_api, queued, room, transport)
                continue
            batch.append(queued)
            cost = total
            fill_until = fill_until or time.monotonic() + lit_api.batch_timeout
        return self._startable(lit_api, batch, cost, transport), []

    def _refuse_for_memory(self, lit_api: "RadioAPI", queued: Queued, room: float,
                           transport: MessageTransport) -> None:
        need = lit_api.bytes_per_megapixel * lit_api.job_cost(queued.job)
        detail = (f"{lit_api.api_path}: not started: this request needs about "
                  f"{need / memory.MIB:.0f} MiB of working memory (measured at the warm-up) "
                  f"and the worker can use {MEMORY_FRACTION * room / memory.MIB:.0f} MiB now "
                  "(the machine's or container's free memory); retry later, or send fewer or "
                  "smaller maps")
        logger.warning("%s", detail)
        self.put_response(transport, queued.response_queue_id, queued.uid,
                          PickleableHTTPException(503, detail), LitAPIStatus.ERROR,
                          LoopResponseType.REGULAR)

    def _next_item(self, request_queue: Queue, fill_until: Optional[float]):
        """The held-over request, else the next queued one: awaited (for up to a second) while
        the batch is empty, then until `fill_until`; None when none came."""
        if self._held is not None:
            item, self._held = self._held, None
            return item
        if fill_until is None:
            return self.get_request(request_queue, timeout=1.0)
        remaining = fill_until - time.monotonic()
        return (self.get_request(request_queue, timeout=remaining) if remaining > 0
                else self.get_request(request_queue, block=False))

    def _startable(self, lit_api: "RadioAPI", batch: list[Queued], cost: float,
                   transport: MessageTransport) -> list:
        """The batch's requests that it finishes by their deadlines at the measured speed, as
        (response queue, uid, job); the others get 504 now, never started."""
        now = time.monotonic()
        needs = lit_api.seconds_per_megapixel * cost
        on_time = []
        for queued in batch:
            deadline = queued.timestamp + lit_api.request_timeout
            if now + needs <= deadline:
                on_time.append(queued)
                continue
            detail = (f"{lit_api.api_path}: not started: its batch needs about {needs:.1f} s at "
                      f"the measured speed and {max(deadline - now, 0):.1f} s of its deadline "
                      f"(--timeout {lit_api.request_timeout:g} s) are left; retry later, or "
                      "send a smaller request")
            self.put_response(transport, queued.response_queue_id, queued.uid,
                              PickleableHTTPException(504, detail), LitAPIStatus.ERROR,
                              LoopResponseType.REGULAR)
        self._deadlines = {q.uid: q.timestamp + lit_api.request_timeout for q in on_time}
        if on_time:
            lit_api.publish_running([(q.response_queue_id, q.uid) for q in on_time])
            self._published = True
        for queued in on_time:
            self.put_response(transport, queued.response_queue_id, queued.uid, (),
                              LitAPIStatus.START, LoopResponseType.REGULAR)
        return [(q.response_queue_id, q.uid, q.job) for q in on_time]

    def put_response(self, transport: MessageTransport, response_queue_id: int, uid: str,
                     response_data, status: LitAPIStatus, response_type: LoopResponseType
                     ) -> None:
        late = time.monotonic() - self._deadlines.get(uid, float("inf"))
        if status == LitAPIStatus.OK and late > 0:
            # Its HTTP handler answered 504 at the deadline: nobody waits for this result.
            logger.info("request %s finished %.1f s after its deadline; result discarded", uid,
                        late)
            return
        super().put_response(transport, response_queue_id, uid, response_data, status,
                             response_type)

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


def _take(lit_api: "RadioAPI", queued: Queued) -> bool:
    """Claim a queued request for the batch; False (it is dropped unrun) when nobody waits."""
    if time.monotonic() >= queued.timestamp + lit_api.request_timeout:
        # Left unclaimed: its HTTP handler answers 504 at the deadline and takes the ticket
        # back itself, so that the request is counted once, as never run.
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
                 allow_inaccurate: bool = False):
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout,
                         api_path=f"/{self.name}", loop=BlockingBatchedLoop())
        self.model_spec, self.precision, self.require_cuda = spec, precision, require_cuda
        self.log_level, self.threads, self.budget = log_level, threads, budget
        # the torch backend's inference path, and what measuring it may cost (runtime/autotune.py)
        self.path, self.autotune_budget = path, autotune_budget
        self.allow_inaccurate = allow_inaccurate
        self.warmup_size = warmup_size or spec.config_size  # the size most requests will have
        # Manager dicts the server attaches: what each worker published (for /info), and the
        # requests each worker is running (for the supervisor, should the worker die).
        self.worker_info: Optional[dict] = None
        self.running: Optional[dict] = None
        self.budget_megapixels = float("inf")  # set by setup, from the timed warm-up
        self.seconds_per_megapixel = 0.0  # likewise
        self.bytes_per_megapixel = 0.0  # likewise: peak resident memory a megapixel adds
        self.base_resident = 0  # resident bytes once the model is loaded, before any batch
        # Made here, in the main process: the HTTP processes fork with it, the workers get it
        # pickled at spawn.
        self.slots = QueueSlots(max_queue or default_queue(max_batch_size, 1))

    def setup(self, device: str) -> None:
        configure_logging(self.log_level)  # a spawned worker starts with no logging set up
        if self.threads:
            torch.set_num_threads(self.threads)
        self.backend = load_backend(self.model_spec, device, self.precision, self.require_cuda,
                                    self.threads, self.path, self.warmup_size,
                                    self.autotune_budget, self.name, self.allow_inaccurate)
        self.base_resident = memory.resident_bytes() or 0
        rate, self.bytes_per_megapixel = self._measure_warmup()
        self.seconds_per_megapixel = rate
        self._set_budget(rate)
        described = {**self.backend.describe(), "endpoint": self.api_path, "pid": os.getpid(),
                     "seconds_per_megapixel": rate, "budget_megapixels": self.budget_megapixels,
                     "bytes_per_megapixel": round(self.bytes_per_megapixel)}
        logger.info("%s worker ready: %s", self.api_path, described)
        if self.worker_info is not None:
            self.worker_info[self.worker_key] = described

    @property
    def worker_key(self) -> str:
        """litserve's name of this worker process, as in /health: "<endpoint>_<worker id>"."""
        return f"{self.name}_{os.environ.get('LITSERVE_WORKER_ID', '0')}"

    def publish_running(self, requests: list[tuple[int, str]]) -> None:
        """Tell the supervisor which requests (response queue id, uid) this worker runs now, so
        that they are answered should it die running them (server/supervisor.py)."""
        if self.running is not None:
            self.running[self.worker_key] = requests

    def warmup_job(self) -> Job:
        h, w = self.warmup_size
        return Job(np.zeros((1, 1, h, w), np.float32))

    def job_cost(self, job: Job) -> float:
        """Megapixels of output maps (server/budget.py)."""
        return cost_megapixels(len(job.x), job.x.shape[-2:], self.factor, job.tiler)

    def _warmup_cost(self) -> float:
        return self.job_cost(self.warmup_job())

    def _set_budget(self, rate: float) -> None:
        one_map = self._warmup_cost()
        self.budget_megapixels = self.budget.megapixels(rate, one_map)
        if self.budget.override is None:  # and no more than fits in memory (it fit one map)
            self.budget_megapixels = min(self.budget_megapixels,
                                         max(self._memory_megapixels(), one_map))
        logger.info("%s: %.3g s per output megapixel; request budget %.4g megapixels",
                    self.api_path, rate, self.budget_megapixels)
        if self.budget.override is None and rate * one_map > BUDGET_FRACTION * self.budget.timeout:
            logger.warning("%s: one warm-up map takes %.3g s, more than %g of --timeout; the "
                           "budget is that one map: raise --timeout", self.api_path,
                           rate * one_map, BUDGET_FRACTION)

    def _measure_warmup(self) -> tuple[float, float]:
        """The warm-up, measured: seconds and peak resident bytes per output megapixel of this
        endpoint on this device. A short first run (one-time costs included) is timed once more
        and the faster run kept; the memory is the first run's (nothing reused yet)."""
        seconds, grown = self._measured_warmup()
        if seconds < REMEASURE_BELOW:
            seconds = min(seconds, self._measured_warmup()[0])
        return seconds / self._warmup_cost(), grown / self._warmup_cost()

    def _measured_warmup(self) -> tuple[float, int]:
        """Seconds of one warm-up run and the resident memory it added at its peak (0 where
        the peak cannot be measured)."""
        base = memory.resident_bytes() if memory.reset_peak() else None
        start = time.perf_counter()
        self.run([self.warmup_job()])
        seconds = time.perf_counter() - start
        peak = memory.peak_resident_bytes()
        return seconds, 0 if base is None or peak is None else max(peak - base, 0)

    def _memory_megapixels(self) -> float:
        """The largest cost whose measured working memory fits in this process's share of all
        the memory there is (the machine's, or its container's limit); inf where unknown."""
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
        metrics.MODEL_SECONDS.labels(endpoint).observe(time.perf_counter() - start)
        metrics.BATCH_REQUESTS.labels(endpoint).observe(len(jobs))
        metrics.MAPS.labels(endpoint).inc(sum(len(job.x) for job in jobs))
        return results

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

    def warmup_job(self) -> Job:
        h, w = self.warmup_size
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
                allow_inaccurate=settings.allow_inaccurate_path)
            for cls in (EncodeAPI, DecodeAPI, ReconstructAPI)]
