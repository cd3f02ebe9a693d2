"""Bounded concurrent load: K client threads share a fixed request budget and a deadline.

Every answer is checked, not just its status: a 200 must carry an array of the expected shape
that matches the reference answer for that input, so a replica that answers wrongly counts
as a failure like one that does not answer.
"""
from __future__ import annotations

import io
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import requests

from model.io import encode_npy

NPY = "application/x-npy"


@dataclass(frozen=True)
class Call:
    """One request of the mix and the answer it must get."""
    endpoint: str
    body: bytes
    expected: np.ndarray


@dataclass
class LoadStats:
    sent: int = 0
    failures: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    elapsed: float = 0.0

    def ms(self, q: float) -> float:
        """The q-th latency percentile in milliseconds."""
        return float(np.percentile(self.latencies, q) * 1000) if self.latencies else float("nan")

    def summary(self) -> str:
        return (f"{self.sent} requests in {self.elapsed:.1f} s, {len(self.failures)} failed, "
                f"p50 {self.ms(50):.0f} ms, p99 {self.ms(99):.0f} ms")


def post(session: requests.Session, url: str, body: bytes, timeout: float = 60):
    return session.post(url, data=body, headers={"Content-Type": NPY, "Accept": NPY},
                        timeout=timeout)


def as_array(content: bytes) -> np.ndarray:
    return np.load(io.BytesIO(content), allow_pickle=False)


def make_calls(replica_url: str, count: int = 4, size: int = 64, seed: int = 0) -> list[Call]:
    """encode, decode and reconstruct calls on `count` random maps, with answers taken from
    one replica, one request at a time."""
    rng = np.random.default_rng(seed)
    calls = []
    with requests.Session() as s:
        for _ in range(count):
            x = encode_npy(rng.random((size, size), dtype=np.float32))
            answers = {}
            for endpoint in ("/encode", "/reconstruct"):
                r = post(s, replica_url + endpoint, x)
                r.raise_for_status()
                answers[endpoint] = as_array(r.content)
            z = encode_npy(answers["/encode"])
            r = post(s, replica_url + "/decode", z)
            r.raise_for_status()
            calls += [Call("/encode", x, answers["/encode"]),
                      Call("/reconstruct", x, answers["/reconstruct"]),
                      Call("/decode", z, as_array(r.content))]
    return calls


def check(call: Call, response: requests.Response) -> str | None:
    """What is wrong with `response` to `call`, or None."""
    if response.status_code != 200:
        return f"{call.endpoint}: HTTP {response.status_code}: {response.text[:200]}"
    try:
        got = as_array(response.content)
    except ValueError as err:
        return f"{call.endpoint}: undecodable answer: {err}"
    if got.shape != call.expected.shape:
        return f"{call.endpoint}: shape {got.shape}, expected {call.expected.shape}"
    # batched with other requests, float sums may round differently: not more than that
    if not np.allclose(got, call.expected, atol=1e-4):
        err = float(np.abs(got - call.expected).max())
        return f"{call.endpoint}: answer differs from the reference by {err:.3g}"
    return None


def run_load(base_url: str, calls: list[Call], clients: int, total: int, duration: float,
             stats: LoadStats | None = None) -> LoadStats:
    """Send up to `total` requests from `clients` threads, stopping at `duration` seconds."""
    stats, lock = stats or LoadStats(), threading.Lock()
    start = time.monotonic()
    deadline = start + duration

    def client() -> None:
        with requests.Session() as session:
            while True:
                with lock:
                    if stats.sent >= total or time.monotonic() > deadline:
                        return
                    call = calls[stats.sent % len(calls)]
                    stats.sent += 1
                t0 = time.perf_counter()
                try:
                    problem = check(call, post(session, base_url + call.endpoint, call.body))
                except requests.RequestException as err:
                    problem = f"{call.endpoint}: {type(err).__name__}: {err}"
                latency = time.perf_counter() - t0
                with lock:
                    stats.latencies.append(latency)
                    if problem:
                        stats.failures.append(problem)

    threads = [threading.Thread(target=client, name=f"client-{i}") for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(duration + 120)
    stats.elapsed = time.monotonic() - start
    return stats


class BackgroundLoad:
    """run_load in a thread, for injecting faults while it runs; `stats` fills as it goes."""

    def __init__(self, base_url: str, calls: list[Call], clients: int, total: int,
                 duration: float):
        self.stats = LoadStats()
        self._thread = threading.Thread(
            target=run_load, args=(base_url, calls, clients, total, duration, self.stats))

    def __enter__(self) -> "BackgroundLoad":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._thread.join()

    def wait_done(self, count: int, timeout: float = 60) -> None:
        """Block until `count` requests have been answered (progress before a fault)."""
        deadline = time.monotonic() + timeout
        while len(self.stats.latencies) < count:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise TimeoutError(f"the load answered {len(self.stats.latencies)} of {count} "
                                   f"requests within {timeout:.0f} s")
            time.sleep(0.02)
