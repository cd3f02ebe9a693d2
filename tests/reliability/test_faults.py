"""Replica faults under load through nginx: kill -9, SIGTERM, and the way back.

A killed replica costs only the requests it held (nginx resends what no replica saw, never a
request a replica had started: it may be what killed it); a replica sent SIGTERM must finish what it holds and end every process it started; a replica
started again must get traffic once its health check passes.
"""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import requests

from model.io import encode_npy
from tests.processes import group_pids, wait_group_gone
from tests.reliability.cluster import Cluster, Replica
from tests.reliability.load import BackgroundLoad, as_array, post

pytestmark = pytest.mark.reliability

CLIENTS, TOTAL, DURATION = 4, 120, 120.0
SHUTDOWN_BOUND = 10 + 20  # the replicas' --shutdown-timeout, plus process teardown
BACK_IN_BOUND = 10 + 20  # nginx's fail_timeout, plus margin


def rejoin(cluster: Cluster, replica: Replica) -> str:
    """Start `replica` again; once healthy, nginx must send it requests. Returns the figures."""
    replica.start()
    startup = replica.wait_healthy()
    offset, start = cluster.nginx.log_offset(), time.monotonic()
    call = cluster.calls[0]
    with requests.Session() as s:
        while True:
            r = post(s, cluster.nginx.url + call.endpoint, call.body)
            assert r.status_code == 200, r.text[:200]
            served = {e["upstream"] for e in cluster.nginx.access_log(offset)}
            if replica.address in served:
                return (f"restarted: healthy after {startup:.1f} s, served via nginx "
                        f"{time.monotonic() - start:.1f} s later")
            assert time.monotonic() - start < BACK_IN_BOUND, (
                f"{replica.name} healthy but given no traffic for {BACK_IN_BOUND} s")
            time.sleep(0.2)


def test_kill_9_mid_load_loses_only_what_the_victim_held_and_the_replica_comes_back(
        restored, figures):
    """nginx resends nothing a replica had started (a request may be what killed it): the
    requests in flight on the victim get 502, at most one per client connection; every other
    request is answered, and connection failures after the kill go to the other replica."""
    victim = restored.replicas[0]
    offset = restored.nginx.log_offset()
    with BackgroundLoad(restored.nginx.url, restored.calls, CLIENTS, TOTAL, DURATION) as load:
        load.wait_done(TOTAL // 4)
        victim.kill()
        at = len(load.stats.latencies)
    stats = load.stats
    entries = restored.nginx.access_log(offset)
    retried = [e for e in entries if "," in e["upstream"]]
    lost = [e for e in entries if e["status"] == "502"]
    figures.append(f"kill -9 of {victim.name} (all its processes) after {at} answers: "
                   f"{stats.summary()}; {len(lost)} in flight on it answered 502 (not "
                   f"replayed); {len(retried)} connection failures resent to the other replica")
    assert stats.sent == TOTAL and len(stats.failures) <= CLIENTS, stats.failures[:5]
    assert all("502" in f for f in stats.failures), stats.failures[:5]
    assert all(e["upstream"].split(", ")[0].strip() == victim.address for e in lost)
    figures.append("  " + rejoin(restored, victim))


def test_a_request_that_kills_a_replica_is_not_replayed_to_the_other(restored, figures):
    """The request in progress when its replica dies (as if it killed it: the OOM killer) gets
    502 and never reaches the other replica, which serves on."""
    victim, other = restored.replicas
    batch = np.random.default_rng(3).random((16, 1, 64, 64), np.float32)
    offset = restored.nginx.log_offset()
    answer: dict = {}

    def poison() -> None:
        r = requests.post(restored.nginx.url + "/reconstruct", data=encode_npy(batch),
                          headers={"Content-Type": "application/x-npy"}, timeout=120)
        answer.update(status=r.status_code)

    sender = threading.Thread(target=poison)
    sender.start()
    deadline = time.monotonic() + 30
    while not (_busy(victim) or _busy(other)):  # the replica nginx chose computes it
        assert time.monotonic() < deadline and sender.is_alive(), "no replica ran the request"
        time.sleep(0.01)
    served_by = victim if _busy(victim) else other
    served_by.kill()
    sender.join(60)
    entries = [e for e in restored.nginx.access_log(offset) if "/reconstruct" in e["request"]]
    figures.append(f"the request in progress on {served_by.name} when it was killed: HTTP "
                   f"{answer.get('status')}, upstreams tried: {entries[0]['upstream']}")
    assert answer.get("status") == 502 and "," not in entries[0]["upstream"]
    survivor = other if served_by is victim else victim
    with requests.Session() as s:
        r = post(s, restored.nginx.url + restored.calls[0].endpoint, restored.calls[0].body)
    assert r.status_code == 200 and survivor.healthy()


def _busy(replica: Replica) -> bool:
    """Whether a process of `replica` is running on a CPU now (its worker computing)."""
    for pid in group_pids(replica.proc.pid):
        try:
            state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state == "R":
            return True
    return False


def test_sigterm_drains_in_flight_work_and_ends_every_process(restored, figures):
    victim = restored.replicas[0]
    # ~0.5 MP: seconds of work on any CPU kind, so SIGTERM lands while it runs (16 64x64 maps
    # finished within the 0.3 s below on a fast CI machine); far under every replica's budget
    batch = np.random.default_rng(1).random((8, 1, 256, 256), dtype=np.float32)
    answer: dict = {}

    def in_flight_request() -> None:  # straight to the victim: nginx cannot resend it
        r = requests.post(victim.url + "/reconstruct", data=encode_npy(batch),
                          headers={"Content-Type": "application/x-npy"}, timeout=120)
        answer.update(status=r.status_code, body=r.content, done=time.monotonic())

    pgid = victim.proc.pid
    with BackgroundLoad(restored.nginx.url, restored.calls, 2, TOTAL, DURATION) as load:
        load.wait_done(TOTAL // 4)
        heavy = threading.Thread(target=in_flight_request)
        heavy.start()
        time.sleep(0.3)
        processes = len(group_pids(pgid))
        sent_at = time.monotonic()
        victim.terminate()
        code = victim.wait_exit(SHUTDOWN_BOUND)
        exited = time.monotonic() - sent_at
        left = wait_group_gone(pgid, 5.0)
        heavy.join(60)
    stats = load.stats
    figures.append(f"SIGTERM to {victim.name} under load: exited with {code} after {exited:.1f} "
                   f"s, {processes} processes before, {len(left)} left 5 s after; in-flight "
                   f"{len(batch)}-map {batch.shape[-1]}x{batch.shape[-1]} batch: HTTP {answer.get('status')}; load: {stats.summary()}; lost: "
                   f"{len(stats.failures) + (answer.get('status') != 200)}")
    assert code == 0 and not left, left
    assert answer.get("status") == 200, answer
    assert answer["done"] > sent_at, "the batch finished before SIGTERM: nothing was in flight"
    assert as_array(answer["body"]).shape == batch.shape
    assert stats.sent == TOTAL and not stats.failures, stats.failures[:5]
    figures.append("  " + rejoin(restored, victim))
