"""The LitServer: three LitAPIs (/encode, /decode, /reconstruct), /health, /info, /metrics.

`RadioDiffServer` subclasses litserve's LitServer through server/litserve_adapter.py, the one
module that uses litserve beyond its public API, and replaces six of its steps:
- routes: payloads are decoded and validated in the HTTP process (server/routes.py), so a bad
  request never reaches a worker, where one failure would fail every request batched with it;
- request handling: a request waits for its answer until its deadline or until its client
  goes away, not indefinitely (the adapter's handler; the policy is in server/queueing.py and
  server/routes.py);
- internal endpoints: /health (ready once every worker has loaded the model and run a
  warm-up), /info (model, shapes, limits, request budgets, provider per worker, versions),
  /metrics;
- middleware: request metrics; no gzip (float32 npy barely compresses, and gzip level 9 on a
  batch costs more than the network);
- worker monitoring: a worker that dies after it was ready is restarted, and the requests of
  the batch it was running are answered 500 at once (server/supervisor.py);
- shutdown: HTTP processes drain in-flight requests first, then the workers stop, each step
  bounded.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import platform
import signal
import socket
import threading
import time
from importlib import metadata
from typing import Optional

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from . import metrics
from .apis import build_apis
from .budget import BudgetPolicy, budget_report
from .logs import LOGGER
from .protocol import OPERATIONS
from .queueing import trusted_networks
from .docs import install_offline_docs
from .litserve_adapter import (STOP_SENTINEL, WORKER_FAILED, WORKER_READY, AdaptedLitServer,
                               AdaptedRequestHandler)
from .routes import (HEALTH_RESPONSES, INFO_RESPONSES, METRICS_RESPONSES, Context,
                     MetricsMiddleware, add_operation_route, authorize, install_error_handlers)
from .settings import Settings, resolve_accelerator
from .spec import Limits, ModelSpec
from .supervisor import POLL_SECONDS, WorkerSupervisor

logger = logging.getLogger(LOGGER)
WORKER_STOP_TIMEOUT = 5.0


class RadioDiffServer(AdaptedLitServer):
    def __init__(self, settings: Settings, spec: ModelSpec, limits: Limits,
                 api_key: Optional[str] = None):
        self.settings = settings
        self.context = Context(spec, limits, api_key, self._published,
                               trusted_networks(settings.trusted_proxies),
                               settings.body_timeout)
        self.stop_reason: Optional[str] = None
        self._stopped = self._stop_requested = False
        self._stop_lock = threading.Lock()
        self._monitor: Optional[threading.Thread] = None
        self.queue_pid: Optional[int] = None
        accelerator = resolve_accelerator(settings.device)
        apis = build_apis(spec, settings)
        super().__init__(apis, accelerator=accelerator,
                         workers_per_device=settings.workers_per_device, timeout=settings.timeout,
                         middlewares=[(MetricsMiddleware, {})])
        self.set_drain_timeout(settings.shutdown_timeout)
        self.app.title = "radiodiff-vae"
        self.app.version = _version("radiodiff-vae") or "dev"
        self.app.description = ("RadioDiff's first-stage VAE: radio maps <-> latents for a latent "
                                "diffusion model.")
        install_error_handlers(self.app)
        install_offline_docs(self.app)

    # litserve hooks (server/litserve_adapter.py) -------------------------------------------

    def register_endpoint(self, lit_api) -> None:
        op = OPERATIONS[lit_api.api_path.strip("/")]
        add_operation_route(self.app, op, QueuedRequestHandler(lit_api, self), self.context)

    def register_internal_endpoints(self) -> None:
        self.app.add_api_route("/health", self._health, methods=["GET"],
                               summary="200 once every worker has loaded the model and warmed up",
                               response_class=JSONResponse, responses=HEALTH_RESPONSES)
        self.app.add_api_route("/info", self._info, methods=["GET"],
                               summary="Model, accepted shapes, limits, backend, versions",
                               response_class=JSONResponse, responses=INFO_RESPONSES)
        self.app.add_api_route("/metrics", self._metrics, methods=["GET"], response_class=Response,
                               summary="Prometheus metrics of all server processes",
                               responses=METRICS_RESPONSES)

    def register_middleware(self, middlewares: list) -> None:
        for middleware, kwargs in middlewares:
            if middleware.__name__ != "GZipMiddleware":
                self.app.add_middleware(middleware, **kwargs)

    def init_manager(self, make_manager):
        # The manager process (forked here) inherits SIG_IGN: a SIGTERM sent to the whole process
        # group (systemd, `timeout`) must not kill the queues before in-flight requests finish.
        previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
        before = {p.pid for p in mp.active_children()}
        try:
            manager = make_manager()
        finally:
            signal.signal(signal.SIGTERM, previous)
        started = [p.pid for p in mp.active_children() if p.pid not in before]
        self.queue_pid = started[0] if started else None  # for /info: the manager's process
        self.worker_info = manager.dict()
        self.running = manager.dict()  # worker key -> [(response queue, uid)] of its batch
        for api in self.endpoint_apis():
            api.worker_info, api.running = self.worker_info, self.running
        return manager

    def wait_for_workers(self) -> None:
        """Until one worker is ready (litserve then opens the port): a worker that reports a
        failed setup, the death of every worker (kill -9, the OOM killer: no status is ever
        reported) or a stop request ends the wait, so a start that cannot succeed exits."""
        while True:
            states = self.worker_states().values()
            if WORKER_READY in states:
                return
            if WORKER_FAILED in states:
                raise RuntimeError("an inference worker failed to start; see the log above")
            workers = self.worker_processes()
            if workers and not any(p.is_alive() for p in workers):
                codes = ", ".join(str(p.exitcode) for p in workers)
                raise RuntimeError(f"every inference worker died during start-up (exit codes "
                                   f"{codes}: killed, often for lack of memory, or crashed)")
            if self._stop_requested:
                raise KeyboardInterrupt
            time.sleep(0.05)

    def start_worker_monitor(self, manager, uvicorn_workers: dict) -> None:
        supervisor = WorkerSupervisor(self, self.settings.max_worker_restarts,
                                      list(uvicorn_workers.values()))
        self._monitor = threading.Thread(target=supervisor.watch, daemon=True,
                                         name="worker-supervisor")
        self._monitor.start()

    def stopping(self) -> bool:
        return self.stopping_locally() or self.shutting_down()

    def stopping_locally(self) -> bool:
        """A stop was asked for or has run (known without asking the queue process)."""
        return self._stop_requested or self._stopped

    def request_stop(self) -> None:
        """Ask the main thread (waiting in LitServer.run) to shut down; callable from any thread
        but the main one, whose manager connection is busy with that wait."""
        self._stop_requested = True
        _quietly(self.wake_main_thread)

    def fail(self, reason: str) -> None:
        """Stop the server because of `reason` (a worker that cannot be restarted), unless it
        is stopping anyway; callable from any thread but the main one."""
        if not (self._stop_requested or self._stopped):
            self.stop_reason = reason
        self.request_stop()

    def graceful_shutdown(self, manager, uvicorn_workers: dict, reason: str) -> None:
        if threading.current_thread() is not threading.main_thread():
            self.fail(reason)
            return
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
        # Without the queue process no answer can reach a client: nothing to drain for.
        drain = self.drain_timeout() if _alive(self.queue_pid) else 0.0
        logger.info("shutting down: in-flight requests get up to %.0f s", drain)
        stop_listening(self.settings.port)
        for process in uvicorn_workers.values():  # SIGTERM: uvicorn stops accepting and drains
            _stop(process, drain + 2)
        for api in self.endpoint_apis():
            queue = self.request_queue(api.api_path)
            for _ in self.worker_devices(api.api_path):
                _quietly(queue.put, STOP_SENTINEL)
        for process in self.worker_processes():
            # they ignore SIGTERM: the sentinel stops them (none reaches them without a queue)
            process.join(WORKER_STOP_TIMEOUT if drain else 0.1)
            if process.is_alive():
                logger.warning("worker pid %s did not stop; killing it", process.pid)
                process.kill()
                process.join(1.0)
        if self._monitor is not None:  # its next check must not meet a dead manager
            self._monitor.join(POLL_SECONDS + 1.0)
        _quietly(manager.shutdown)
        for process in [*uvicorn_workers.values(), *self.worker_processes()]:
            metrics.mark_process_dead(process.pid)
        logger.info("shut down")

    # internal endpoints ---------------------------------------------------------------------

    async def _health(self) -> JSONResponse:
        statuses = await run_in_threadpool(self.worker_states)
        ready = bool(statuses) and all(s == WORKER_READY for s in statuses.values())
        body = {"status": "ready" if ready else "starting",
                "workers": {k: str(v) for k, v in sorted(statuses.items())}}
        return JSONResponse(body, status_code=200 if ready else 503)

    async def _info(self, request: Request) -> JSONResponse:
        authorize(request, self.context.api_key)
        workers = await run_in_threadpool(self._published)
        processes = {"main": os.getppid(), "queue": self.queue_pid, "http": os.getpid()}
        return JSONResponse({**info_document(self.settings, self.context, workers),
                             "processes": processes})

    def _published(self) -> list[dict]:
        """What each ready inference worker published (backend, speed, budget); blocking."""
        return list(self.worker_info.values())

    async def _metrics(self) -> Response:
        depths = {api.api_path: api.slots.waiting()[0] for api in self.endpoint_apis()}
        content, media_type = await run_in_threadpool(metrics.render, depths)
        return Response(content, media_type=media_type)


class QueuedRequestHandler(AdaptedRequestHandler):
    """The handler of one endpoint: its queue's slots, its clients' shares, its deadline."""

    def __init__(self, lit_api, server: RadioDiffServer):
        super().__init__(lit_api, server)
        self.slots, self.in_flight = lit_api.slots, lit_api.in_flight
        self.timeout = lit_api.deadline_s


def info_document(settings: Settings, ctx: Context, workers: list[dict]) -> dict:
    spec, limits = ctx.spec, ctx.limits
    f, z = spec.downsample_factor, spec.latent_channels
    return {
        "model": {"backend": spec.backend, "source": spec.path,
                  "precision": _precisions(spec, workers),
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


def _precisions(spec: ModelSpec, workers: list[dict]) -> dict[str, str]:
    """What each endpoint computes in, as its workers report it (an export: as exported)."""
    served = {w["endpoint"].strip("/"): w["precision"] for w in workers if "precision" in w}
    return served or {"all": spec.precision}


def _version(name: str) -> Optional[str]:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _alive(pid: Optional[int]) -> bool:
    """Whether process `pid` (a child of this one) still runs; True when unknown."""
    if pid is None:
        return True
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return not os.path.isdir("/proc/self")  # no /proc: unknown
    return state != "Z"


def stop_listening(port: int) -> None:
    """Shut the listening socket on `port` down for every process that holds it. The main
    process binds it before it forks the queue process and the HTTP processes, so after the HTTP
    process stops accepting, the kernel would still complete new connections for the whole
    drain, nobody would read them, and they would be reset at exit (a lost request behind a
    balancer, which cannot tell it from a started one). Shut down, the port refuses them, and a
    balancer sends them to another replica."""
    for fd in os.listdir("/proc/self/fd") if os.path.isdir("/proc/self/fd") else []:
        try:
            sock = socket.socket(fileno=os.dup(int(fd)))
        except OSError:  # not a socket, or already closed
            continue
        with sock:
            try:
                listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
                if listening and sock.getsockname()[1] == port:
                    sock.shutdown(socket.SHUT_RDWR)
            except OSError as err:
                logger.debug("stop listening: fd %s: %s", fd, err)


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
