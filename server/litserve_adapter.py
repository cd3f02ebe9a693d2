"""The one module that uses litserve beyond its public API (litserve 0.2.19, pinned).

litserve's public surface (LitAPI hooks, LitServer arguments, `loop=`, middlewares, callbacks)
does not cover deciding a request before it is queued, waiting for it only until its deadline
or its client's departure, a blocking batch loop bounded by compute, restarting a crashed
worker while answering the requests it held, or a bounded shutdown. The three classes below map
those litserve steps and members onto hook methods and members with names of our own, which
server/app.py, server/apis.py and server/supervisor.py use. Every litserve name used here that
is not public API is listed in server/litserve_private.py; tests/test_litserve_private.py fails,
naming the entry, when an installed litserve lacks one, and, listing them, when any other server
module uses a litserve name outside its public API.
"""
from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from queue import Queue
from typing import Any, Optional

import litserve as ls
from litserve.callbacks.base import EventTypes
from litserve.loops.base import _SENTINEL_VALUE, _StopLoopError
from litserve.loops.simple_loops import BatchedLoop
from litserve.server import RegularRequestHandler
from litserve.utils import (LitAPIStatus, LoopResponseType, PickleableHTTPException,
                            ResponseBufferItem, WorkerSetupStatus)

from .queueing import Abandoned

STOP_SENTINEL = _SENTINEL_VALUE  # put on a worker's queue, it ends the worker's loop
WORKER_READY, WORKER_FAILED = WorkerSetupStatus.READY, WorkerSetupStatus.ERROR


class AdaptedLitServer(ls.LitServer):
    """LitServer whose private steps call the hooks a subclass defines."""

    # litserve steps -> hooks ------------------------------------------------------------------

    def _register_api_endpoints(self, lit_api, request_type, response_type) -> None:
        self.register_endpoint(lit_api)

    def _register_internal_endpoints(self) -> None:
        self.register_internal_endpoints()

    def _register_middleware(self) -> None:
        self.register_middleware(self.middlewares)

    def _init_manager(self, num_api_servers: int):
        return self.init_manager(functools.partial(super()._init_manager, num_api_servers))

    def verify_worker_status(self) -> None:  # litserve's wait for a first ready worker
        self.wait_for_workers()

    def _start_worker_monitoring(self, manager, uvicorn_workers) -> None:
        self.start_worker_monitor(manager, uvicorn_workers)

    def _perform_graceful_shutdown(self, manager, uvicorn_workers,
                                   shutdown_reason: str = "normal") -> None:
        self.graceful_shutdown(manager, uvicorn_workers, shutdown_reason)

    # hooks, implemented by the subclass -------------------------------------------------------

    def register_endpoint(self, lit_api: ls.LitAPI) -> None:
        raise NotImplementedError

    def register_internal_endpoints(self) -> None:
        raise NotImplementedError

    def register_middleware(self, middlewares: list) -> None:
        raise NotImplementedError

    def init_manager(self, make_manager: Callable[[], Any]):
        """Return litserve's manager, made by calling `make_manager()`."""
        raise NotImplementedError

    def wait_for_workers(self) -> None:
        """Return once the server may open its port; raise to stop it."""
        raise NotImplementedError

    def start_worker_monitor(self, manager, uvicorn_workers: dict) -> None:
        raise NotImplementedError

    def graceful_shutdown(self, manager, uvicorn_workers: dict, reason: str) -> None:
        raise NotImplementedError

    # litserve members, under names of our own -------------------------------------------------

    def endpoint_apis(self) -> list[ls.LitAPI]:
        return list(self.litapi_connector)

    def set_drain_timeout(self, seconds: float) -> None:
        """How long uvicorn lets in-flight requests finish after SIGTERM."""
        self.uvicorn_graceful_timeout = seconds

    def drain_timeout(self) -> float:
        return self.uvicorn_graceful_timeout

    def worker_states(self) -> dict[str, str]:
        """Each worker's setup state ("starting", WORKER_READY, WORKER_FAILED, ...) by its
        litserve name "<endpoint>_<worker id>"; a manager round trip."""
        return dict(self.workers_setup_status)

    def worker_processes(self) -> list:
        """The inference worker processes, endpoint by endpoint, in worker-id order."""
        return list(getattr(self, "inference_workers", []))

    def restart_worker(self, index: int, lit_api: ls.LitAPI, worker_id: int) -> None:
        """Start worker `worker_id` of `lit_api` again, as worker_processes()[index]."""
        self.inference_workers[index] = self.launch_single_inference_worker(lit_api, worker_id)

    def request_queue(self, api_path: str):
        """The queue the HTTP handlers of `api_path` submit to and its workers read."""
        return self._get_request_queue(api_path)

    def worker_devices(self, api_path: str) -> list:
        """One entry per inference worker of `api_path`, in worker-id order."""
        return self._inference_workers_config_for_api(api_path)

    def wake_main_thread(self) -> None:
        """Wake the main thread waiting in LitServer.run, so that it shuts down."""
        if self._shutdown_event is not None:
            self._shutdown_event.set()

    def started(self) -> bool:
        """Whether LitServer.run has made its manager (and the shutdown event) yet."""
        return self._shutdown_event is not None

    def shutting_down(self) -> bool:
        return self._shutdown_event is not None and self._shutdown_event.is_set()

    def answer_error(self, response_queue_id: int, uid: str, status_code: int, detail: str,
                     worker_id: int) -> None:
        """Answer request `uid` with an HTTP error, as a worker would."""
        error = PickleableHTTPException(status_code, detail)
        self._transport.send((uid, (error, LitAPIStatus.ERROR, LoopResponseType.REGULAR,
                                    worker_id)), consumer_id=response_queue_id)


class AdaptedRequestHandler(RegularRequestHandler):
    """litserve's handler of one endpoint, except that the wait for the worker's answer ends
    at the request's deadline or when its client goes away, whichever comes first."""

    async def answer(self, payload: Any, gone: Callable[[], Awaitable[None]],
                     timeout: float) -> Any:
        """Queue `payload` and return the worker's result; raises the worker's HTTPException,
        or Abandoned when `timeout` seconds pass or `gone()` returns first."""
        uid, _ = await self._submit_request(payload)
        answered = asyncio.Event()
        self.server.response_buffer[uid] = ResponseBufferItem(answered)
        try:
            abandoned = await _first_of(answered, gone, timeout)
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


class AdaptedBatchLoop(BatchedLoop):
    """litserve's batched worker loop; a subclass forms each batch (next_batch) and says which
    finished results are still wanted (deliver)."""

    def get_batch_requests(self, lit_api: ls.LitAPI, request_queue: Queue, transport
                           ) -> tuple[list, list]:
        self.outbox = transport  # the same for every batch: where answers go
        return self.next_batch(lit_api, request_queue), []

    def put_response(self, transport, response_queue_id: int, uid: str, response_data,
                     status: LitAPIStatus, response_type: LoopResponseType) -> None:
        if status == LitAPIStatus.OK and not self.deliver(uid):
            return
        super().put_response(transport, response_queue_id, uid, response_data, status,
                             response_type)

    # hooks, implemented by the subclass -------------------------------------------------------

    def next_batch(self, lit_api: ls.LitAPI, request_queue: Queue) -> list[tuple]:
        """The next batch, as (response queue id, uid, payload); raise StopLoop to end."""
        raise NotImplementedError

    def deliver(self, uid: str) -> bool:
        """Whether the finished result of `uid` is still wanted."""
        return True

    # litserve members, under names of our own -------------------------------------------------

    def take(self, request_queue: Queue, block: bool = True,
             timeout: Optional[float] = None) -> Any:
        """The next queued item ((response queue id, uid, timestamp, payload), or
        STOP_SENTINEL); None when none came."""
        return self.get_request(request_queue, block=block, timeout=timeout)

    def send_error(self, response_queue_id: int, uid: str, status_code: int,
                   detail: str) -> None:
        self.put_response(self.outbox, response_queue_id, uid,
                          PickleableHTTPException(status_code, detail), LitAPIStatus.ERROR,
                          LoopResponseType.REGULAR)


StopLoop = _StopLoopError  # raised inside next_batch to end the worker's loop
