"""Watching every process of the server from the main process, in place of litserve's monitor.

An HTTP (uvicorn) process or the queue (manager) process that dies stops the server with exit
code 1 at once: the main process would otherwise keep the listening socket, accept connections
and answer none. Docker's restart policy or Kubernetes then starts it afresh.

A worker that dies after it was ready (the kernel's OOM killer, a segfault in a native
library, kill -9) is restarted, and every request of the batch it was running is answered
500 at once, saying so, instead of waiting for its deadline; the crash and those requests are
counted (radiodiff_worker_restarts_total, radiodiff_rejections_total{reason="worker_crashed"}).
Restarting cannot help a worker that dies before it is ready (its model does not load, its
warm-up does not fit), nor one that keeps dying: those stop the server, with the reason
logged, and an orchestrator decides (docs/server.md).

litserve's own monitor (LitServer(restart_workers=True)) restarts workers too, but answers the
dead worker's requests from the main process's response buffer, which is empty when the HTTP
servers are separate processes, and counts worker ids per endpoint as if they were global.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from typing import TYPE_CHECKING

from . import metrics
from .litserve_adapter import WORKER_READY
from .logs import LOGGER

if TYPE_CHECKING:
    from .app import RadioDiffServer

logger = logging.getLogger(LOGGER)
RESTART_WINDOW = 600.0  # seconds: --max-worker-restarts counts the restarts in this window
POLL_SECONDS = 0.5  # how often the processes are checked


class WorkerSupervisor:
    def __init__(self, server: "RadioDiffServer", max_restarts: int, http_processes: list):
        self.server, self.max_restarts = server, max_restarts
        self.http_processes = http_processes
        self.restarts: deque[float] = deque()  # when each restart happened

    def watch(self) -> None:
        """Poll the processes until the server stops; runs in a thread of the main process."""
        server = self.server
        try:
            while not server.stopping():
                self._check_http()
                for index, process in enumerate(server.worker_processes()):
                    if not process.is_alive() and not server.stopping():
                        self._died(index, process)
                time.sleep(POLL_SECONDS)
        except (OSError, EOFError) as err:  # the manager (queue process) is gone
            if not server.stopping_locally():
                server.fail(f"the queue process died ({type(err).__name__}: {err})")
        except Exception:  # noqa: BLE001 - a monitor that dies silently would hide every crash
            logger.exception("worker supervisor failed; stopping the server")
            server.fail("the worker supervisor failed")

    def _check_http(self) -> None:
        for process in self.http_processes:
            if not process.is_alive() and not self.server.stopping():
                self.server.fail(f"HTTP process pid {process.pid} died (exit code "
                                 f"{process.exitcode}); nothing answers requests without it")

    def _died(self, index: int, process) -> None:
        server = self.server
        lit_api, worker_id = self._slot(index)
        key = f"{lit_api.name}_{worker_id}"
        status = server.worker_states().get(key)
        metrics.mark_process_dead(process.pid)
        server.worker_info.pop(key, None)
        if status != WORKER_READY:
            server.fail(f"inference worker {key} (pid {process.pid}) died before it was ready "
                        f"(setup status {status}, exit code {process.exitcode}); see the log "
                        "above")
            return
        lost = self._answer_lost(lit_api.api_path, key, worker_id, process)
        metrics.WORKER_RESTARTS.labels(lit_api.api_path).inc()
        if not self._may_restart():
            server.fail(f"inference worker {key} died (exit code {process.exitcode}) after "
                        f"{self.max_restarts} restarts in the last {RESTART_WINDOW:.0f} s")
            return
        logger.error("inference worker %s (pid %s) died (exit code %s) running %d request(s), "
                     "answered 500; restarting it", key, process.pid, process.exitcode, lost)
        server.restart_worker(index, lit_api, worker_id)

    def _slot(self, index: int):
        """The LitAPI and per-endpoint worker id of worker_processes()[index], listed
        endpoint by endpoint, in worker-id order."""
        for lit_api in self.server.endpoint_apis():
            count = len(self.server.worker_devices(lit_api.api_path))
            if index < count:
                return lit_api, index
            index -= count
        raise IndexError("no inference worker at that index")

    def _answer_lost(self, path: str, key: str, worker_id: int, process) -> int:
        """Answer 500 to the requests the dead worker was running; how many."""
        requests = self.server.running.pop(key, [])
        detail = (f"the inference worker running this request died (exit code "
                  f"{process.exitcode}: killed by the system, often for lack of memory, or "
                  "crashed); it is being restarted; the request was not completed")
        for response_queue_id, uid in requests:
            self.server.answer_error(response_queue_id, uid, 500, detail, worker_id)
            metrics.reject(path, "worker_crashed")
        return len(requests)

    def _may_restart(self) -> bool:
        now = time.monotonic()
        while self.restarts and now - self.restarts[0] > RESTART_WINDOW:
            self.restarts.popleft()
        if len(self.restarts) >= self.max_restarts:
            return False
        self.restarts.append(now)
        return True
