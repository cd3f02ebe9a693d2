"""The one module that touches litserve's private names (litserve 0.2.19, pinned).

litserve's public surface (LitAPI hooks, LitServer arguments, middlewares, callbacks) does not
cover deciding a request before it is queued, waiting for it only until its deadline, a
blocking batch loop, restarting a crashed worker while answering the requests it held, or a
bounded shutdown. `AdaptedLitServer`, `AdaptedRequestHandler` and the loop names below map
those private steps onto public hook methods that server/app.py and server/apis.py implement.
Every private name used here is listed in server/litserve_private.py;
tests/test_litserve_private.py fails, naming the entry, when an installed litserve lacks one,
and when any other server module uses a private litserve name.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import litserve as ls
from litserve.callbacks.base import EventTypes
from litserve.loops.base import _SENTINEL_VALUE, _StopLoopError
from litserve.server import RegularRequestHandler
from litserve.utils import LitAPIStatus, LoopResponseType

STOP_SENTINEL = _SENTINEL_VALUE  # put on a worker's queue, it ends the worker's loop
StopLoop = _StopLoopError  # raised inside a loop to end it


class AdaptedLitServer(ls.LitServer):
    """LitServer whose private steps call the public hooks a subclass defines."""

    # private steps -> hooks ------------------------------------------------------------------

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

    # hooks, implemented by the subclass -----------------------------------------------------

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

    # litserve members, under public names -----------------------------------------------------

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

    def answer_error(self, response_queue_id: int, uid: str, error: Exception,
                     worker_id: int) -> None:
        """Send `error` as the worker's answer to request `uid`, as a worker would."""
        self._transport.send((uid, (error, LitAPIStatus.ERROR, LoopResponseType.REGULAR,
                                    worker_id)), consumer_id=response_queue_id)

    def fire_on_response(self) -> None:
        self._callback_runner.trigger_event(EventTypes.ON_RESPONSE.value, litserver=self)


class AdaptedRequestHandler(RegularRequestHandler):
    """litserve's handler of one endpoint, with its private members under public names."""

    async def submit(self, payload: Any) -> str:
        """Queue `payload` for a worker; its uid."""
        uid, _ = await self._submit_request(payload)
        return uid

    def raise_error_response(self, response: Any) -> None:
        """Raise a worker's error answer as an HTTPException."""
        self._handle_error_response(response)
