"""Backpressure and deadlines on a real `python -m server` (tiny model, CPU), over real HTTP.

The /reconstruct worker is held with SIGSTOP where a test needs a busy endpoint: a stalled
worker is the slow batch that the measured speed did not foresee (a noisy neighbour, swapping),
and it makes "queued" and "running" exact instead of a race against the model's speed.
"""
from __future__ import annotations

import math
import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import pytest
import requests

from model.io import encode_npy
from server.client import Client
from tests.test_server import NPY, running_server, save_tiny_checkpoint

TIMEOUT = 4.0  # --timeout: every deadline here
MAX_QUEUE = 2
ONE_MAP = 64 * 64 / 1e6  # megapixels of one 64x64 map
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

    def reconstruct(self, maps: int) -> requests.Response:
        body = encode_npy(np.random.default_rng(maps).random((maps, 1, 64, 64), np.float32))
        return requests.post(self.url + "/reconstruct", data=body,
                             headers={"Content-Type": NPY}, timeout=60)

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
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("queue")
    save_tiny_checkpoint(root)
    args = ["--timeout", str(TIMEOUT), "--max-queue", str(MAX_QUEUE), "--max-batch-size", "1"]
    with running_server(root, args, {}) as (url, port, *_):
        yield Server(url, port)


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
        assert [f.result().status_code for f in admitted] == [200] * MAX_QUEUE
    assert refused.status_code == 429, refused.text
    assert int(refused.headers["Retry-After"]) >= 1
    assert refused.json()["status"] == 429 and "queue is full" in refused.json()["detail"]
    print(f"\n429 in {elapsed * 1000:.0f} ms, Retry-After {refused.headers['Retry-After']}")
    assert elapsed < 1.0
    after = server.metrics()
    assert after[_rejected("queue_full")] - before.get(_rejected("queue_full"), 0) == 1
    assert after[MAPS] - before.get(MAPS, 0) == MAX_QUEUE


def test_the_client_waits_retry_after_on_429_and_then_gets_its_answer(server):
    vae = Client(server.url, timeout=30, retries=3, backoff=0.05)
    maps = np.random.default_rng(5).random((1, 1, 64, 64), np.float32)
    with ThreadPoolExecutor(MAX_QUEUE + 1) as pool:
        with server.stalled():
            admitted = [pool.submit(server.reconstruct, 1) for _ in range(MAX_QUEUE)]
            server.wait_for(DEPTH, MAX_QUEUE)
            before = server.metrics().get(_rejected("queue_full"), 0)
            answer = pool.submit(_timed, lambda: vae.reconstruct(maps))
            server.wait_for(_rejected("queue_full"), before + 1)  # its first try: 429
        result, elapsed = answer.result()  # retried after Retry-After, once the queue drained
        assert [f.result().status_code for f in admitted] == [200] * MAX_QUEUE
    assert result.shape == (1, 1, 64, 64) and elapsed >= 1.0  # Retry-After is at least 1 s


def test_requests_behind_a_stalled_batch_get_504_at_their_deadline(server):
    maps = min(math.ceil(1.5 / (server.rate * ONE_MAP)),  # about 1.5 s at the measured speed
               math.floor(server.budget / ONE_MAP), 64)
    if maps * ONE_MAP * server.rate < 0.3:
        pytest.skip("this device runs the largest admitted request too fast to stall it")
    before = server.metrics()
    with ThreadPoolExecutor(2) as pool:
        with server.stalled():
            running = pool.submit(_timed, lambda: server.reconstruct(maps))
            server.wait_for(DEPTH, 1)
        server.wait_for(DEPTH, 0)  # the worker took it: stall it mid-batch
        with server.stalled():
            queued = pool.submit(_timed, lambda: server.reconstruct(1))
            server.wait_for(DEPTH, 1)
            (r1, t1), (r2, t2) = running.result(), queued.result()
        print(f"\n504 after {t1:.2f} s (running) and {t2:.2f} s (queued), deadline {TIMEOUT} s")
        for response, elapsed, where in ((r1, t1, "still running"), (r2, t2, "still queued")):
            assert response.status_code == 504, response.text
            assert where in response.json()["detail"]
            assert TIMEOUT - 0.1 < elapsed < TIMEOUT + 1
    after = server.metrics()
    for reason in ("deadline_running", "deadline"):
        assert after[_rejected(reason)] - before.get(_rejected(reason), 0) == 1, reason
    server.wait_for(BATCHES, before.get(BATCHES, 0) + 1)  # the stalled batch ended, unanswered
    assert server.reconstruct(1).status_code == 200
    assert server.metrics()[MAPS] - before.get(MAPS, 0) == maps + 1, "the queued one ran"


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
    maps = min(math.floor(0.45 * TIMEOUT / (server.rate * ONE_MAP)),  # within the budget
               math.floor(server.budget / ONE_MAP), 64)
    needs = maps * ONE_MAP * server.rate
    if needs < 0.5:
        pytest.skip("this device runs the largest admitted request too fast")
    before = server.metrics()
    result: dict = {}
    sender = threading.Thread(target=lambda: result.update(r=_timed(
        lambda: server.reconstruct(maps))))
    with server.stalled():
        sender.start()
        server.wait_for(DEPTH, 1)
        time.sleep(TIMEOUT - needs + 0.2)  # less time left than the batch needs
    sender.join(30)
    response, elapsed = result["r"]
    assert response.status_code == 504, response.text
    assert "not started" in response.json()["detail"]
    assert elapsed < TIMEOUT, "answered at the deadline, not when it was found too late"
    after = server.metrics()
    assert after[_rejected("deadline_unreachable")] - before.get(
        _rejected("deadline_unreachable"), 0) == 1
    assert after.get(MAPS, 0) == before.get(MAPS, 0)
