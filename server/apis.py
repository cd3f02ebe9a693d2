"""The inference-worker side: one LitAPI per endpoint, batching requests across clients.

Requests arrive already decoded and validated (server/payloads.py, in the HTTP process), as
`Job`s. A worker merges up to max_batch_size of them, and no more than its request budget's
worth of compute (server/budget.py); `predict` groups the merged jobs by map shape, runs each
group through the backend in forward passes of at most max_batch_size maps, and splits the
results back per job, so a request's answer does not depend on its neighbours.
"""
from __future__ import annotations

import logging
import os
import signal
import time
from collections import defaultdict
from queue import Queue
from typing import Optional

import litserve as ls
import numpy as np
import torch
from litserve.loops.base import _SENTINEL_VALUE, _StopLoopError
from litserve.loops.simple_loops import BatchedLoop
from litserve.transport.base import MessageTransport
from litserve.utils import LitAPIStatus, LoopResponseType

from model.distributions import DiagonalGaussianDistribution
from model.io import from_model, to_model

from . import metrics
from .backends import load_backend
from .budget import BUDGET_FRACTION, UNBOUNDED, BudgetPolicy, cost_megapixels
from .logs import LOGGER, configure_logging
from .payloads import Job
from .settings import Settings
from .spec import ModelSpec

logger = logging.getLogger(LOGGER)
REMEASURE_BELOW = 2.0  # seconds: a warm-up shorter than this is timed a second time


class BlockingBatchedLoop(BatchedLoop):
    """litserve's BatchedLoop, except that an idle worker blocks on its queue, and a batch is
    bounded by compute as well as by count.

    The stock loop polls the (manager-backed) queue every millisecond, or spins without pause
    when batch_timeout is 0, keeping a core busy per idle worker. Here the first request of a
    batch is awaited, and the batch then fills for at most batch_timeout seconds, while its
    requests' summed cost stays within the worker's request budget: the request that would
    pass it is held over to start the next batch.
    """

    def __init__(self):
        super().__init__()
        self._held = None

    def get_batch_requests(self, lit_api: "RadioAPI", request_queue: Queue,
                           transport: MessageTransport) -> tuple[list, list]:
        first, self._held = self._held or self.get_request(request_queue, timeout=1.0), None
        if first is None:
            return [], []
        items, deadline = [first], time.monotonic() + lit_api.batch_timeout
        cost = _item_cost(lit_api, first)
        while len(items) < lit_api.max_batch_size:
            remaining = deadline - time.monotonic()
            item = (self.get_request(request_queue, timeout=remaining) if remaining > 0
                    else self.get_request(request_queue, block=False))
            if item is None:
                break
            cost += _item_cost(lit_api, item)
            if cost > lit_api.budget_megapixels:
                self._held = item
                break
            items.append(item)
        return self._admit(lit_api, items, transport)

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

    def _admit(self, lit_api: ls.LitAPI, items: list, transport: MessageTransport
               ) -> tuple[list, list]:
        payloads, timed_out = [], []
        for item in items:
            if item == _SENTINEL_VALUE:
                raise _StopLoopError()
            response_queue_id, uid, timestamp, job = item
            self.put_response(transport, response_queue_id, uid, (), LitAPIStatus.START,
                              LoopResponseType.REGULAR)
            waited = time.monotonic() - timestamp
            if lit_api.request_timeout not in (-1, False) and waited > lit_api.request_timeout:
                timed_out.append((response_queue_id, uid))
            else:
                payloads.append((response_queue_id, uid, job))
        return payloads, timed_out


class RadioAPI(ls.LitAPI):
    """Shared worker logic; subclasses define `run(jobs) -> results` for one endpoint."""

    name = ""
    factor = 1  # input pixels -> output map pixels, per side (latents: the downsampling factor)

    def __init__(self, spec: ModelSpec, max_batch_size: int, batch_timeout: float,
                 precision: str = "auto", require_cuda: bool = False, log_level: str = "info",
                 threads: int = 0, warmup_size: Optional[tuple[int, int]] = None,
                 budget: BudgetPolicy = UNBOUNDED):
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout,
                         api_path=f"/{self.name}", loop=BlockingBatchedLoop())
        self.model_spec, self.precision, self.require_cuda = spec, precision, require_cuda
        self.log_level, self.threads, self.budget = log_level, threads, budget
        self.warmup_size = warmup_size or spec.config_size  # the size most requests will have
        self.worker_info: Optional[dict] = None  # a manager dict the server attaches, for /info
        self.budget_megapixels = float("inf")  # set by setup, from the timed warm-up

    def setup(self, device: str) -> None:
        configure_logging(self.log_level)  # a spawned worker starts with no logging set up
        if self.threads:
            torch.set_num_threads(self.threads)
        self.backend = load_backend(self.model_spec, device, self.precision, self.require_cuda,
                                    self.threads)
        rate = self._seconds_per_megapixel()
        self._set_budget(rate)
        described = {**self.backend.describe(), "endpoint": self.api_path, "pid": os.getpid(),
                     "seconds_per_megapixel": rate, "budget_megapixels": self.budget_megapixels}
        logger.info("%s worker ready: %s", self.api_path, described)
        if self.worker_info is not None:
            self.worker_info[f"{self.api_path}:{os.getpid()}"] = described

    def warmup_job(self) -> Job:
        h, w = self.warmup_size
        return Job(np.zeros((1, 1, h, w), np.float32))

    def job_cost(self, job: Job) -> float:
        """Megapixels of output maps (server/budget.py)."""
        return cost_megapixels(len(job.x), job.x.shape[-2:], self.factor)

    def _warmup_cost(self) -> float:
        return self.job_cost(self.warmup_job())

    def _set_budget(self, rate: float) -> None:
        one_map = self._warmup_cost()
        self.budget_megapixels = self.budget.megapixels(rate, one_map)
        logger.info("%s: %.3g s per output megapixel; request budget %.4g megapixels",
                    self.api_path, rate, self.budget_megapixels)
        if self.budget.override is None and rate * one_map > BUDGET_FRACTION * self.budget.timeout:
            logger.warning("%s: one warm-up map takes %.3g s, more than %g of --timeout; the "
                           "budget is that one map: raise --timeout", self.api_path,
                           rate * one_map, BUDGET_FRACTION)

    def _seconds_per_megapixel(self) -> float:
        """The warm-up, timed: seconds per output megapixel of this endpoint on this device. A
        short first run (one-time costs included) is timed once more and the faster run kept."""
        timings = [self._timed_warmup()]
        if timings[0] < REMEASURE_BELOW:
            timings.append(self._timed_warmup())
        return min(timings) / self._warmup_cost()

    def _timed_warmup(self) -> float:
        start = time.perf_counter()
        self.run([self.warmup_job()])
        return time.perf_counter() - start

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
        raise NotImplementedError

    def _observe_forward_passes(self, n: int) -> None:
        for start in range(0, n, self.max_batch_size):
            metrics.BATCH_SIZE.labels(self.api_path).observe(min(self.max_batch_size, n - start))

    def _slices(self, n: int):
        return (slice(s, s + self.max_batch_size) for s in range(0, n, self.max_batch_size))

    def _encode(self, maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [self.backend.encode(maps[s]) for s in self._slices(len(maps))]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.backend.decode(latents[s]) for s in self._slices(len(latents))])

    def _latents(self, jobs: list[Job]) -> list[torch.Tensor]:
        """Per job: the posterior mean, or a sample drawn with the job's own seeded generator."""
        mean, logvar = self._encode(to_model(np.concatenate([job.x for job in jobs])))
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
        return _split(from_model(self._decode(latents)).numpy(), jobs)


class ReconstructAPI(RadioAPI):
    name = "reconstruct"

    def run(self, jobs: list[Job]) -> list[np.ndarray]:
        maps = from_model(self._decode(torch.cat(self._latents(jobs))))
        return _split(maps.numpy(), jobs)


def _item_cost(lit_api: RadioAPI, item: tuple) -> float:
    """The cost of a queued (response queue, uid, timestamp, job) item; 0 for the sentinel."""
    job = item[3]
    return 0.0 if job is None else lit_api.job_cost(job)


def _groups_by_shape(jobs: list[Job]) -> list[list[int]]:
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, job in enumerate(jobs):
        groups[job.x.shape[1:]].append(i)
    return list(groups.values())


def _split(batch: np.ndarray, jobs: list[Job]) -> list[np.ndarray]:
    bounds = np.cumsum([len(job.x) for job in jobs])[:-1]
    return np.split(batch, bounds)


def build_apis(spec: ModelSpec, settings: Settings) -> list[RadioAPI]:
    """One LitAPI per endpoint, configured from the server settings."""
    budget = BudgetPolicy.of(settings)
    return [cls(spec, settings.max_batch_size, settings.batch_timeout, settings.precision,
                settings.device == "cuda", settings.log_level, settings.threads,
                settings.resolution, budget=budget)
            for cls in (EncodeAPI, DecodeAPI, ReconstructAPI)]
