"""An expensive, admitted request on one replica does not take the balancer down.

deploy/nginx.conf resends only connection errors and 502/503, never a timeout, and waits
longer than a replica takes to answer what it admits: while one replica computes a request
near its budget, the other keeps serving small requests, and nginx never runs out of live
upstreams (the cascade of issue 14: a timeout resent to the next replica, both marked down).
"""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import requests

from model.io import encode_npy
from tests.reliability.cluster import Cluster
from tests.reliability.load import check, post

pytestmark = pytest.mark.reliability

SIDE = 256  # the expensive request: tiny maps resized to SIDE x SIDE, just under the budget


def expensive_body(cluster: Cluster) -> tuple[bytes, int, float]:
    """A /reconstruct body of tiny maps whose ?resize=SIDE,SIDE cost is ~90% of the budget."""
    info = requests.get(cluster.replicas[0].url + "/info", timeout=10).json()
    budget = info["budget"]["endpoints"]["/reconstruct"]["budget_megapixels"]
    maps = min(int(0.9 * budget / (SIDE * SIDE / 1e6)), info["limits"]["max_request_maps"])
    assert maps >= 1, f"budget {budget} MP holds no {SIDE}x{SIDE} map"
    body = encode_npy(np.random.default_rng(2).random((maps, 1, 8, 8), dtype=np.float32))
    return body, maps, budget


def test_an_expensive_request_leaves_the_other_replica_serving(restored, figures):
    body, maps, budget = expensive_body(restored)
    nginx, offset = restored.nginx, restored.nginx.log_offset()
    error_log = nginx.dir / "error.log"
    errors_before = error_log.stat().st_size
    heavy: dict = {}

    def expensive() -> None:
        start = time.monotonic()
        r = requests.post(nginx.url + "/reconstruct", data=body,
                          params={"resize": f"{SIDE},{SIDE}"},
                          headers={"Content-Type": "application/x-npy"}, timeout=120)
        heavy.update(status=r.status_code, seconds=time.monotonic() - start)

    sender = threading.Thread(target=expensive)
    sender.start()
    time.sleep(0.5)  # let it reach a replica first
    statuses, calls = [], restored.calls
    with requests.Session() as s:
        while sender.is_alive():
            call = calls[len(statuses) % len(calls)]
            statuses.append(check(call, post(s, nginx.url + call.endpoint, call.body)))
    sender.join()
    log = nginx.access_log(offset)
    (big,) = [e for e in log if "resize=" in e["request"]]
    others = {e["upstream"] for e in log if "resize=" not in e["request"]}
    errors = error_log.read_bytes()[errors_before:].decode(errors="replace")
    figures.append(f"expensive /reconstruct ({maps} maps resized to {SIDE}x{SIDE}, "
                   f"{maps * SIDE * SIDE / 1e6:.2f} of {budget:.2f} MP): HTTP {heavy['status']} "
                   f"after {heavy['seconds']:.1f} s on {big['upstream']}; meanwhile "
                   f"{len(statuses)} small requests via nginx, "
                   f"{sum(p is not None for p in statuses)} failed")
    assert heavy["status"] == 200 and "," not in big["upstream"], big  # admitted, never resent
    assert heavy["seconds"] > 2, "the expensive request was not expensive"
    assert statuses and all(p is None for p in statuses), [p for p in statuses if p][:5]
    assert any(big["upstream"] not in upstream for upstream in others), "nothing else served"
    assert not [e for e in log if e["status"] == "502"] and "no live upstreams" not in errors
