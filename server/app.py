"""The LitServer: three LitAPIs (/encode, /decode, /reconstruct), /health, /info, /metrics.

`RadioDiffServer` subclasses litserve 0.2.19's LitServer (pinned in pyproject.toml; every private
litserve name used is listed in server/litserve_private.py and checked by a test) and
replaces five of its steps:
- routes: payloads are decoded and validated in the HTTP process (server/routes.py), so a bad
  request never reaches a worker, where one failure would fail every request batched with it;
- request handling: a request waits for its answer until its deadline or until its client
  goes away, not indefinitely (QueuedRequestHandler; the policy is in server/queueing.py and
  server/routes.py);
- internal endpoints: /health (ready once every worker has loaded the model and run a
  warm-up), /info (model, shapes, limits, request budgets, provider per worker, versions),
  /metrics;
- middleware: request metrics; no gzip (float32 npy barely compresses, and gzip level 9 on a
  batch costs more than the network);
- shutdown: HTTP processes drain in-flight requests first, then the workers stop, each step
  bounded; a worker that dies stops the whole server (an orchestrator restarts it).
"""
from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import platform
import signal
import threading
from importlib import metadata
from collections.abc import Awaitable, Callable
from typing import Any, Optional

import litserve as ls
from fastapi import Request
from fastapi.responses import JSONResponse, Response
from litserve.callbacks.base import EventTypes
from litserve.loops.base import _SENTINEL_VALUE
from litserve.server import RegularRequestHandler
from litserve.utils import LitAPIStatus, ResponseBufferItem, WorkerSetupStatus
from starlette.concurrency import run_in_threadpool

from . import metrics
from .apis import build_apis
from .budget import BudgetPolicy, budget_report
from .logs import LOGGER
from .payloads import Job
from .protocol import OPERATIONS
from .queueing import Abandoned, QueueSlots
from .docs import install_offline_docs
from .routes import (HEALTH_RESPONSES, INFO_RESPONSES, METRICS_RESPONSES, Context,
                     MetricsMiddleware, add_operation_route, authorize, install_error_handlers)
from .settings import Settings, resolve_accelerator
from .spec import Limits, ModelSpec

logger = logging.getLogger(LOGGER)
WORKER_STOP_TIMEOUT = 5.0


class RadioDiffServer(ls.LitServer):
    def __init__(self, settings: Settings, spec: ModelSpec, limits: Limits,
                 api_key: Optional[str] = None):
        self.settings = settings
        self.context = Context(spec, limits, api_key, self._published)
        self.stop_reason: Optional[str] = None
        self._stopped = self._stop_requested = False
        self._stop_lock = threading.Lock()
        accelerator = resolve_accelerator(settings.device)
        apis = build_apis(spec, settings)
        super().__init__(apis, accelerator=accelerator,
                         workers_per_device=settings.workers_per_device, timeout=settings.timeout,
                         middlewares=[(MetricsMiddleware, {})])
        self.uvicorn_graceful_timeout = settings.shutdown_timeout
        self.monitor_internal = 0.5  # litserve's worker-liveness poll period (its spelling)
        self.app.title = "radiodiff-vae"
        self.app.version = _version("radiodiff-vae") or "dev"
        self.app.description = ("RadioDiff's first-stage VAE: radio maps <-> latents for a latent "
                                "diffusion model.")
        install_error_handlers(self.app)
        install_offline_docs(self.app)

    # litserve hooks -----------------------------------------------------------------------

    def _register_api_endpoints(self, lit_api, request_type, response_type) -> None:
        op = OPERATIONS[lit_api.api_path.strip("/")]
        add_operation_route(self.app, op, QueuedRequestHandler(lit_api, self), self.context)

    def _register_internal_endpoints(self) -> None:
        self.app.add_api_route("/health", self._health, methods=["GET"],
                               summary="200 once every worker has loaded the model and warmed up",
                               response_class=JSONResponse, responses=HEALTH_RESPONSES)
        self.app.add_api_route("/info", self._info, methods=["GET"],
                               summary="Model, accepted shapes, limits, backend, versions",
                               response_class=JSONResponse, responses=INFO_RESPONSES)
        self.app.add_api_route("/metrics", self._metrics, methods=["GET"], response_class=Response,
                               summary="Prometheus metrics of all server processes",
                               responses=METRICS_RESPONSES)

    def _register_middleware(self) -> None:
        for middleware, kwargs in self.middlewares:
            if middleware.__name__ != "GZipMiddleware":
                self.app.add_middleware(middleware, **kwargs)

    def _init_manager(self, num_api_servers: int):
        # The manager process (forked here) inherits SIG_IGN: a SIGTERM sent to the whole process
        # group (systemd, `timeout`) must not kill the queues before in-flight requests finish.
        previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            manager = super()._init_manager(num_api_servers)
        finally:
            signal.signal(signal.SIGTERM, previous)
        self.worker_info = manager.dict()
        for api in self.litapi_connector:
            api.worker_info = self.worker_info
        return manager

    def request_stop(self) -> None:
        """Ask the main thread (waiting in LitServer.run) to shut down; callable from any thread
        but the main one, whose manager connection is busy with that wait."""
        self._stop_requested = True
        if self._shutdown_event is not None:
            _quietly(self._shutdown_event.set)

    def _perform_graceful_shutdown(self, manager, uvicorn_workers, shutdown_reason="normal"):
        if threading.current_thread() is not threading.main_thread():
            # litserve's worker monitor saw a worker die. Unless we are stopping anyway, that is
            # a failure: record it and wake the main thread, which stops everything.
            if not (self._stop_requested or self._stopped):
                self.stop_reason = shutdown_reason
            self.request_stop()
            return
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
        logger.info("shutting down: in-flight requests get up to %.0f s",
                    self.uvicorn_graceful_timeout)
        for process in uvicorn_workers.values():  # SIGTERM: uvicorn stops accepting and drains
            _stop(process, self.uvicorn_graceful_timeout + 2)
        for api in self.litapi_connector:
            queue = self._get_request_queue(api.api_path)
            for _ in self._inference_workers_config_for_api(api.api_path):
                _quietly(queue.put, _SENTINEL_VALUE)
        for process in getattr(self, "inference_workers", []):
            process.join(WORKER_STOP_TIMEOUT)  # they ignore SIGTERM: the sentinel stops them
            if process.is_alive():
                logger.warning("worker pid %s did not stop; killing it", process.pid)
                process.kill()
                process.join(1.0)
        for thread in threading.enumerate():  # its next check must not meet a dead manager
            if thread.name == "litserve-monitoring":
                thread.join(self.monitor_internal + 1.0)
        _quietly(manager.shutdown)
        for process in [*uvicorn_workers.values(), *getattr(self, "inference_workers", [])]:
            metrics.mark_process_dead(process.pid)
        logger.info("shut down")

    # internal endpoints ---------------------------------------------------------------------

    async def _health(self) -> JSONResponse:
        statuses = await run_in_threadpool(lambda: dict(self.workers_setup_status))
        ready = bool(statuses) and all(s == WorkerSetupStatus.READY for s in statuses.values())
        body = {"status": "ready" if ready else "starting",
                "workers": {k: str(v) for k, v in sorted(statuses.items())}}
        return JSONResponse(body, status_code=200 if ready else 503)

    async def _info(self, request: Request) -> JSONResponse:
        authorize(request, self.context.api_key)
        workers = await run_in_threadpool(self._published)
        return JSONResponse(info_document(self.settings, self.context, workers))

    def _published(self) -> list[dict]:
        """What each ready inference worker published (backend, speed, budget); blocking."""
        return list(self.worker_info.values())

    async def _metrics(self) -> Response:
        depths = {api.api_path: api.slots.waiting()[0] for api in self.litapi_connector}
        content, media_type = await run_in_threadpool(metrics.render, depths)
        return Response(content, media_type=media_type)


class QueuedRequestHandler(RegularRequestHandler):
    """litserve's handler of one endpoint, except that the wait for the worker's answer ends
    at the request's deadline or when its client goes away, whichever comes first."""

    @property
    def slots(self) -> QueueSlots:
        return self.lit_api.slots

    @property
    def timeout(self) -> float:
        return self.lit_api.request_timeout

    async def answer(self, job: Job, gone: Callable[[], Awaitable[None]]) -> Any:
        """Queue `job` and return the worker's result; raises the worker's HTTPException, or
        Abandoned when the deadline passes or `gone()` returns first."""
        uid, _ = await self._submit_request(job)
        answered = asyncio.Event()
        self.server.response_buffer[uid] = ResponseBufferItem(answered)
        try:
            abandoned = await _first_of(answered, gone, self.timeout)
        finally:
            item = self.server.response_buffer.pop(uid)  # a late answer finds no entry: dropped
        if abandoned:
            raise Abandoned(abandoned)
        response, status = item.response
        if status == LitAPIStatus.ERROR:
            self._handle_error_response(response)
        self.server._callback_runner.trigger_event(EventTypes.ON_RESPONSE.value,
                                                   litserver=self.server)
        return response


async def _first_of(answered: asyncio.Event, gone: Callable[[], Awaitable[None]],
                    timeout: float) -> Optional[str]:
    """None once `answered` is set; 'disconnected' when `gone()` returns first; 'deadline'
    after `timeout` seconds."""
    answer, left = asyncio.ensure_future(answered.wait()), asyncio.ensure_future(gone())
    try:
        done, _ = await asyncio.wait((answer, left), timeout=timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
    finally:
        answer.cancel()
        left.cancel()
    if answered.is_set():
        return None
    return "disconnected" if left in done else "deadline"


def info_document(settings: Settings, ctx: Context, workers: list[dict]) -> dict:
    spec, limits = ctx.spec, ctx.limits
    f, z = spec.downsample_factor, spec.latent_channels
    return {
        "model": {"backend": spec.backend, "source": spec.path, "precision": spec.precision,
                  "downsample_factor": f, "latent_channels": z,
                  **spec.scaling(), "config": spec.model_config},
        "shapes": {"map": "[H, W], [1, H, W] or [N, 1, H, W] float32 in [0, 1], or a PNG",
                   "latent": f"[{z}, H/{f}, W/{f}] or [N, {z}, H/{f}, W/{f}] float32",
                   "accepted_sizes": limits.accepted()},
        "limits": {"resolution": list(limits.resolution) if limits.resolution else None,
                   "max_pixels": limits.max_pixels, "max_request_maps": limits.max_request_maps,
                   "max_body_bytes": limits.max_body_bytes,
                   "max_tiled_pixels": limits.max_tiled_pixels, "tile": limits.tiler.tile,
                   "tile_overlap": limits.tiler.overlap},
        "budget": budget_report(workers, BudgetPolicy.of(settings)),
        "batching": {"max_batch_size": settings.max_batch_size,
                     "batch_timeout": settings.batch_timeout,
                     "workers_per_device": settings.workers_per_device},
        "workers": sorted(workers, key=lambda w: (w["endpoint"], w["pid"])),
        "auth": ctx.api_key is not None,
        "versions": {"python": platform.python_version(),
                     **{name: _version(name) for name in
                        ("radiodiff-vae", "torch", "numpy", "litserve", "onnxruntime",
                         "onnxruntime-gpu")}},
    }


def _version(name: str) -> Optional[str]:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _stop(process: mp.Process, timeout: float) -> None:
    """SIGTERM, wait up to `timeout` seconds, then SIGKILL."""
    if process.is_alive():
        process.terminate()
        process.join(timeout)
    if process.is_alive():
        logger.warning("process %s (pid %s) ignored SIGTERM; killing it", process.name,
                       process.pid)
        process.kill()
        process.join(1.0)


def _quietly(fn, *args) -> None:
    try:
        fn(*args)
    except (OSError, EOFError) as err:  # the manager or a queue is already gone
        logger.debug("during shutdown: %s", err)
