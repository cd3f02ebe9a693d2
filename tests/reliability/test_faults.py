"""Replica faults under load through nginx: kill -9, SIGTERM, and the way back.

A killed replica must cost no client request (nginx resends what failed to the other one); a
replica sent SIGTERM must finish what it holds and end every process it started; a replica
started again must get traffic once its health check passes.
"""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import requests

from model.io import encode_npy
from tests.reliability.cluster import Cluster, Replica, group_pids
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


def test_kill_9_mid_load_costs_no_request_and_the_replica_comes_back(restored, figures):
    victim = restored.replicas[0]
    offset = restored.nginx.log_offset()
    with BackgroundLoad(restored.nginx.url, restored.calls, CLIENTS, TOTAL, DURATION) as load:
        load.wait_done(TOTAL // 4)
        victim.kill()
        at = len(load.stats.latencies)
    stats = load.stats
    retried = [e for e in restored.nginx.access_log(offset) if "," in e["upstream"]]
    figures.append(f"kill -9 of {victim.name} (all its processes) after {at} answers: "
                   f"{stats.summary()}; {len(retried)} requests resent by nginx to the other "
                   "replica; lost: " + str(len(stats.failures)))
    assert stats.sent == TOTAL and not stats.failures, stats.failures[:5]
    assert retried, "no request was resent: the kill did not hit a replica under traffic"
    figures.append("  " + rejoin(restored, victim))


def test_sigterm_drains_in_flight_work_and_ends_every_process(restored, figures):
    victim = restored.replicas[0]
    batch = np.random.default_rng(1).random((16, 1, 64, 64), dtype=np.float32)
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
        heavy.join(60)
    stats = load.stats
    figures.append(f"SIGTERM to {victim.name} under load: exited with {code} after {exited:.1f} "
                   f"s, {processes} processes before, {len(group_pids(pgid))} after; in-flight "
                   f"16-map batch: HTTP {answer.get('status')}; load: {stats.summary()}; lost: "
                   f"{len(stats.failures) + (answer.get('status') != 200)}")
    assert code == 0 and not group_pids(pgid)
    assert answer.get("status") == 200, answer
    assert answer["done"] > sent_at, "the batch finished before SIGTERM: nothing was in flight"
    assert as_array(answer["body"]).shape == batch.shape
    assert stats.sent == TOTAL and not stats.failures, stats.failures[:5]
    figures.append("  " + rejoin(restored, victim))
