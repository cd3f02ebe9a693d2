"""A worker that dies is restarted, and the request it was running is answered 500 at once, on a
real `python -m server` (tiny model, CPU): the worker is killed with SIGKILL mid-batch, which
is what the kernel's OOM killer does."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import requests

from model.io import encode_npy
from tests.conftest import LIMITS_SERVER, LIMITS_TIMEOUT
from tests.test_server import NPY, running_server, save_tiny_checkpoint
from tests.test_server_queue import Server

pytestmark = pytest.mark.server
TIMEOUT = 60.0
RESTARTS = 'radiodiff_worker_restarts_total{endpoint="/reconstruct"}'
CRASHED = 'radiodiff_rejections_total{endpoint="/reconstruct",reason="worker_crashed"}'


def _cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _kill_mid_batch(server: Server, pool: ThreadPoolExecutor, size: int):
    """Send a /reconstruct that takes seconds, SIGKILL its worker once it computes; the future
    of the answer and the time of the kill."""
    body = encode_npy(np.random.default_rng(0).random((1, 1, size, size), np.float32))
    before = _cpu_seconds(server.worker)
    answer = pool.submit(requests.post, server.url + "/reconstruct", data=body,
                         headers={"Content-Type": NPY}, timeout=TIMEOUT + 10)
    deadline = time.monotonic() + 60
    while _cpu_seconds(server.worker) < before + 0.3:  # it is running the batch
        assert time.monotonic() < deadline and not answer.done(), "the batch never started"
        time.sleep(0.02)
    os.kill(server.worker, signal.SIGKILL)
    return answer, time.monotonic()


def _wait_healthy(url: str, limit: float = 120.0) -> None:
    deadline = time.monotonic() + limit
    while requests.get(url + "/health", timeout=5).status_code != 200:
        assert time.monotonic() < deadline, "the server never became ready again"
        time.sleep(0.2)


@pytest.fixture
def model(tmp_path):
    save_tiny_checkpoint(tmp_path)
    return tmp_path


def _metric(url: str, name: str) -> float:
    text = requests.get(url + "/metrics", timeout=30).text
    return float(text.split(name + " ")[1].split()[0]) if name + " " in text else 0.0


def _reconstruct_workers(url: str) -> list[int]:
    workers = requests.get(url + "/info", timeout=30).json()["workers"]
    return [w["pid"] for w in workers if w["endpoint"] == "/reconstruct"]


def test_a_killed_worker_answers_500_at_once_and_is_restarted(shared_server):
    """On the session's LIMITS_SERVER (tests/conftest.py: --timeout 5), shared with the budget
    and queue tests, which the restarted worker serves afterwards."""
    _, url, port, proc, log = shared_server(LIMITS_SERVER)
    with ThreadPoolExecutor(2) as pool:
        server = Server(url, port)
        before = {name: _metric(url, name) for name in (RESTARTS, CRASHED)}
        side, cost, rate = server.sized(0.8 * LIMITS_TIMEOUT)  # seconds of work, within budget
        answer, killed = _kill_mid_batch(server, pool, side)
        response = answer.result()
        # at once: before the restarted worker is up (it loads the model and warms up, seconds
        # of work), and before the request's deadline (which would answer 504)
        assert _reconstruct_workers(url) == [], "answered only once the new worker was up"
        waited = time.monotonic() - killed
        assert response.status_code == 500, response.text
        assert "worker running this request died" in response.json()["detail"]
        print(f"\n500 {waited:.2f} s after the kill of a {side}x{side} batch ({cost * rate:.1f} s)")
        _wait_healthy(url)
        again = Server(url, port)
        assert again.worker != server.worker
        assert _reconstruct_workers(url) == [again.worker]
        assert again.reconstruct(2).status_code == 200
        assert {name: _metric(url, name) - before[name] for name in (RESTARTS, CRASHED)} == {
            RESTARTS: 1, CRASHED: 1}
        assert proc.poll() is None


@pytest.mark.slow  # kills workers until the server gives up (~11 s on 2 idle cores)
def test_past_max_worker_restarts_the_server_stops_saying_why(model):
    args = ["--timeout", str(TIMEOUT), "--max-worker-restarts", "0"]
    with running_server(model, args, {}) as (url, port, proc, log):
        worker = Server(url, port).worker
        os.kill(worker, signal.SIGKILL)
        assert proc.wait(120) == 1
        text = log.read_text()
        assert "died (exit code -9) after 0 restarts" in text, text[-2000:]


def _spawned_children(pid: int) -> list[int]:
    """The inference workers of server `pid`: its children started by multiprocessing's spawn."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if ppid == pid and b"multiprocessing.spawn" in cmdline:
            found.append(int(entry.name))
    return found


@contextmanager
def _starting_server(model: Path):
    """`python -m server` started and not waited for: (process, log path)."""
    from tests.test_server import AUTOTUNE_CACHE, REPO, _free_port
    log = model / "server.log"
    env = {**os.environ, "PYTHONPATH": str(REPO), "RADIODIFF_CACHE_DIR": str(AUTOTUNE_CACHE)}
    cmd = [sys.executable, "-m", "server", "--model", str(model), "--host", "127.0.0.1",
           "--port", str(_free_port()), "--threads", "1", "--path", "default"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        yield proc, log
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def _workers_of(proc: subprocess.Popen, count: int = 3) -> list[int]:
    deadline = time.monotonic() + 60
    while len(workers := _spawned_children(proc.pid)) < count:
        assert time.monotonic() < deadline and proc.poll() is None, "no workers were started"
        time.sleep(0.02)
    return workers


def test_every_worker_killed_during_start_up_exits_1_saying_so(model):
    """Before: the server never opened its port, never exited and ignored SIGTERM."""
    with _starting_server(model) as (proc, log):
        for pid in _workers_of(proc):
            os.kill(pid, signal.SIGKILL)
        assert proc.wait(120) == 1
        assert "every inference worker died during start-up" in log.read_text()


def test_sigterm_during_start_up_stops_the_server(model):
    with _starting_server(model) as (proc, log):
        _workers_of(proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0, log.read_text()[-2000:]


@pytest.mark.parametrize("victim", ["http", "queue"])
def test_a_dead_http_or_queue_process_stops_the_server_with_exit_1(model, victim):
    """Before: with its HTTP process dead the main process kept the socket, accepted
    connections and answered none, and SIGTERM then exited 0."""
    with running_server(model, [], {}) as (url, port, proc, log):
        pid = requests.get(url + "/info", timeout=10).json()["processes"][victim]
        os.kill(pid, signal.SIGKILL)
        assert proc.wait(120) == 1, log.read_text()[-2000:]
        expected = "HTTP process" if victim == "http" else "the queue process died"
        assert expected in log.read_text()
