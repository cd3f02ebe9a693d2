"""Backpressure and deadlines on a real `python -m server` (tiny model, CPU), over real HTTP.

The /reconstruct worker is held with SIGSTOP where a test needs a busy endpoint: a stalled
worker is the slow batch that the measured speed did not foresee (a noisy neighbour, swapping),
and it makes "queued" and "running" exact instead of a race against the model's speed.
"""
from __future__ import annotations

import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from types import SimpleNamespace

import numpy as np
import pytest
import requests

from model.io import encode_npy
from server import client as client_module
from server.budget import Budget
from server.client import Client
from tests.conftest import LIMITS_MAX_QUEUE, LIMITS_MAX_SIDE, LIMITS_SERVER, LIMITS_TIMEOUT
from tests.test_server import NPY

pytestmark = pytest.mark.server
TIMEOUT = LIMITS_TIMEOUT  # --timeout: every deadline here
MAX_QUEUE = LIMITS_MAX_QUEUE  # --max-queue; and --max-batch-size 1
MAX_SIDE = LIMITS_MAX_SIDE  # --max-pixels 1024x1024: a request of one map can take seconds
DEPTH = 'radiodiff_queue_depth{endpoint="/reconstruct"}'
MAPS = 'radiodiff_maps_processed_total{endpoint="/reconstruct"}'
BATCHES = 'radiodiff_model_duration_seconds_count{endpoint="/reconstruct"}'


def _rejected(reason: str) -> str:
    return f'radiodiff_rejections_total{{endpoint="/reconstruct",reason="{reason}"}}'


class Server:
    def __init__(self, url: str, port: int):
        self.url, self.port = url, port
        info = requests.get(url + "/info", timeout=10).json()
        self.worker = next(w["pid"] for w in info["workers"] if w["endpoint"] == "/reconstruct")
        self.rate = info["budget"]["endpoints"]["/reconstruct"]["seconds_per_megapixel"]
        self.budget = info["budget"]["endpoints"]["/reconstruct"]["budget_megapixels"]

    def reconstruct(self, maps: int, side: int = 64) -> requests.Response:
        body = encode_npy(np.random.default_rng(maps).random((maps, 1, side, side), np.float32))
        return requests.post(self.url + "/reconstruct", data=body,
                             headers={"Content-Type": NPY}, timeout=60)

    def sized(self, seconds: float) -> tuple[int, float, float]:
        """The side of the largest square map whose /reconstruct takes at most `seconds` at
        the endpoint's speed now (GET /info) and fits its budget, priced by its measured cost
        model (server/budget.py); that pass's cost (megapixels) and the speed (s/MP)."""
        worker = next(w for w in requests.get(self.url + "/info", timeout=10).json()["workers"]
                      if w["endpoint"] == "/reconstruct")
        model = Budget(self.budget, worker["cost_growth_per_megapixel"],
                       worker["warmup_megapixels"], worker["growth_measured_to_megapixels"])
        rate = worker["seconds_per_megapixel"]
        fits = [side for side in range(64, MAX_SIDE + 1, 16)
                if model.pass_cost(side * side / 1e6) <= min(self.budget, seconds / rate)]
        side = max(fits, default=64)
        return side, model.pass_cost(side * side / 1e6), rate

    def metrics(self) -> dict[str, float]:
        text = requests.get(self.url + "/metrics", timeout=30).text
        return {name: float(value) for name, value in
                (line.rsplit(" ", 1) for line in text.splitlines() if line and line[0] != "#")}

    def wait_for(self, name: str, value: float, limit: float = 10.0) -> None:
        deadline = time.monotonic() + limit
        while self.metrics().get(name, 0.0) != value:
            assert time.monotonic() < deadline, f"{name} never reached {value}"
            time.sleep(0.02)

    @contextmanager
    def stalled(self):
        """The /reconstruct worker stopped (SIGSTOP) for the duration, then resumed."""
        os.kill(self.worker, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(self.worker, signal.SIGCONT)


@pytest.fixture(scope="module")
def server(shared_server):
    """The session's LIMITS_SERVER (tests/conftest.py), shared with the budget and crash
    tests."""
    running = shared_server(LIMITS_SERVER)
    return Server(running.url, running.port)


def _timed(send):
    start = time.monotonic()
    response = send()
    return response, time.monotonic() - start


def test_queue_depth_and_rejections_are_exposed_per_endpoint(server):
    text = requests.get(server.url + "/metrics", timeout=30).text
    for endpoint in ("/encode", "/decode", "/reconstruct"):
        assert f'radiodiff_queue_depth{{endpoint="{endpoint}"}} 0.0' in text
    assert "# TYPE radiodiff_rejections_total counter" in text


def test_a_full_queue_gets_429_at_once_while_the_admitted_requests_get_200(server):
    before = server.metrics()
    with ThreadPoolExecutor(MAX_QUEUE) as pool:
        with server.stalled():
            admitted = [pool.submit(server.reconstruct, 1) for _ in range(MAX_QUEUE)]
            server.wait_for(DEPTH, MAX_QUEUE)
            refused, elapsed = _timed(lambda: server.reconstruct(1))
            # at once: while the queue it found full is still full (the worker stopped, the
            # admitted requests unanswered: not even their deadline has passed)
            assert not any(f.done() for f in admitted)
            assert server.metrics()[DEPTH] == MAX_QUEUE
        assert [f.result().status_code for f in admitted] == [200] * MAX_QUEUE
    assert refused.status_code == 429, refused.text
    assert int(refused.headers["Retry-After"]) >= 1
    assert refused.json()["status"] == 429 and "queue is full" in refused.json()["detail"]
    print(f"\n429 in {elapsed * 1000:.0f} ms, Retry-After {refused.headers['Retry-After']}")
    after = server.metrics()
    assert after[_rejected("queue_full")] - before.get(_rejected("queue_full"), 0) == 1
    assert after[MAPS] - before.get(MAPS, 0) == MAX_QUEUE


def test_the_client_waits_retry_after_on_429_and_then_gets_its_answer(server, monkeypatch):
    slept = []  # what the client waited before each retry
    monkeypatch.setattr(client_module, "time",
                        SimpleNamespace(sleep=lambda s: (slept.append(s), time.sleep(s))))
    vae = Client(server.url, timeout=30, retries=3, backoff=0.05)
    maps = np.random.default_rng(5).random((1, 1, 64, 64), np.float32)
    with ThreadPoolExecutor(MAX_QUEUE + 1) as pool:
        with server.stalled():
            admitted = [pool.submit(server.reconstruct, 1) for _ in range(MAX_QUEUE)]
            server.wait_for(DEPTH, MAX_QUEUE)
            before = server.metrics().get(_rejected("queue_full"), 0)
            answer = pool.submit(vae.reconstruct, maps)
            server.wait_for(_rejected("queue_full"), before + 1)  # its first try: 429
        result = answer.result()  # retried after Retry-After, once the queue drained
        assert [f.result().status_code for f in admitted] == [200] * MAX_QUEUE
    assert result.shape == (1, 1, 64, 64)
    # slept the 429's Retry-After (whole seconds, at least 1), not its 0.05 s backoff
    assert slept and slept[0] >= 1 and slept[0] == int(slept[0]), slept


def test_requests_behind_a_stalled_batch_get_504_at_their_deadline(server):
    side, cost, rate = server.sized(1.5)  # about 1.5 s at the measured speed: stallable
    assert cost * rate >= 0.3, f"a {side}x{side} map takes {cost * rate:.2f} s only"
    before = server.metrics()
    with ThreadPoolExecutor(2) as pool:
        with server.stalled():
            running = pool.submit(_timed, lambda: server.reconstruct(1, side))
            server.wait_for(DEPTH, 1)
        server.wait_for(DEPTH, 0)  # the worker took it: stall it mid-batch
        with server.stalled():
            queued = pool.submit(_timed, lambda: server.reconstruct(1))
            server.wait_for(DEPTH, 1)
            # both answered while the worker is still stopped: by their deadlines alone
            (r1, t1), (r2, t2) = running.result(), queued.result()
            stopped = server.metrics()
        print(f"\n504 after {t1:.2f} s (running) and {t2:.2f} s (queued), deadline {TIMEOUT} s")
        for response, elapsed, where in ((r1, t1, "still running"), (r2, t2, "still queued")):
            assert response.status_code == 504, response.text
            assert where in response.json()["detail"]
            assert elapsed > TIMEOUT - 0.1  # not before the deadline
    for reason in ("deadline_running", "deadline"):
        assert stopped[_rejected(reason)] - before.get(_rejected(reason), 0) == 1, reason
    assert stopped.get(BATCHES, 0) == before.get(BATCHES, 0), "the stalled batch had ended"
    server.wait_for(BATCHES, before.get(BATCHES, 0) + 1)  # the stalled batch ended, unanswered
    assert server.reconstruct(1).status_code == 200
    assert server.metrics()[MAPS] - before.get(MAPS, 0) == 2, "the queued one ran"


def test_a_disconnected_clients_queued_request_is_never_run(server):
    before = server.metrics()
    body = encode_npy(np.zeros((3, 1, 64, 64), np.float32))
    head = (f"POST /reconstruct HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {NPY}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    with server.stalled():
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as client:
            client.sendall(head + body)
            server.wait_for(DEPTH, 1)
        gone = _rejected("disconnected")
        server.wait_for(gone, before.get(gone, 0) + 1)
        assert server.metrics()[DEPTH] == 0
    assert server.reconstruct(1).status_code == 200
    assert server.metrics()[MAPS] - before.get(MAPS, 0) == 1, "the disconnected client's maps ran"


def test_a_batch_that_would_end_after_the_deadline_is_not_started(server):
    # as much as the budget allows: the budget is the work of half the deadline at the
    # recorded speed, and the speed deadline checks use stays within SPEED_BOUNDS (1.5x) of
    # that, so this batch needs at least a third of the deadline by the server's own figures
    side, cost, rate = server.sized(TIMEOUT)
    assert cost >= 0.9 * server.budget, (side, cost, server.budget)
    left = 0.25 * TIMEOUT  # less than the batch needs, more than a resumed worker takes
    before = server.metrics()
    result: dict = {}
    sender = threading.Thread(target=lambda: result.update(r=_timed(
        lambda: server.reconstruct(1, side))))
    with server.stalled():
        sender.start()
        server.wait_for(DEPTH, 1)
        time.sleep(TIMEOUT - left)  # the deadline, from the server's clock, is near
    sender.join(60)
    response, elapsed = result["r"]
    assert response.status_code == 504, response.text
    assert "not started" in response.json()["detail"]  # the worker's answer, before the
    after = server.metrics()                            # deadline's ("still queued")
    assert after[_rejected("deadline_unreachable")] - before.get(
        _rejected("deadline_unreachable"), 0) == 1
    for reason in ("deadline", "deadline_running"):
        assert after.get(_rejected(reason), 0) == before.get(_rejected(reason), 0), reason
    assert after.get(MAPS, 0) == before.get(MAPS, 0)
