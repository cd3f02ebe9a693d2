"""The request budget the server measures for itself (no --max-request-cost), over real HTTP.

A real `python -m server` (tiny model, CPU or whatever it finds) times each endpoint at start;
its default budget is what that endpoint computes in half of --timeout. --timeout is short
here (tests/conftest.py LIMITS_SERVER) so that the budget stays well below what --max-pixels
and --max-request-maps allow.
"""
from __future__ import annotations

import math
import time

import numpy as np
import pytest
import requests

from model.io import encode_npy
from server.budget import Budget
from tests.conftest import LIMITS_MAX_MAPS, LIMITS_MAX_SIDE, LIMITS_SERVER, LIMITS_TIMEOUT
from tests.test_server import NPY

pytestmark = pytest.mark.server
TIMEOUT, MAX_SIDE, MAX_MAPS = LIMITS_TIMEOUT, LIMITS_MAX_SIDE, LIMITS_MAX_MAPS


@pytest.fixture(scope="module")
def server_url(shared_server):
    """The session's LIMITS_SERVER (the crash and queue tests use it too), before it has run
    any batch: /info's speeds are then the recorded ones the budgets come from."""
    return shared_server(LIMITS_SERVER, unused=True).url


def _post(url: str, body: bytes, params=None) -> requests.Response:
    return requests.post(url, data=body, params=params, headers={"Content-Type": NPY},
                         timeout=60)


def _budget(url: str) -> dict:
    return requests.get(url + "/info", timeout=10).json()["budget"]


def test_the_default_budget_is_half_the_deadline_at_the_measured_speed(server_url):
    budget = _budget(server_url)
    assert budget["max_request_cost"] is None and budget["timeout"] == TIMEOUT
    one_map = 64 * 64 / 1e6  # the warm-up map: the model's configured size
    for name, endpoint in budget["endpoints"].items():
        rate = endpoint["seconds_per_megapixel"]
        assert rate > 0, name
        expected = max(budget["fraction_of_timeout"] * TIMEOUT / rate, one_map)
        assert endpoint["budget_megapixels"] == pytest.approx(expected), name
    for name, endpoint in budget["endpoints"].items():  # the figures, with pytest -s
        print(f"{name}: {endpoint['seconds_per_megapixel']:.3g} s/MP, budget "
              f"{endpoint['budget_megapixels']:.3g} MP")


def test_tiny_maps_with_a_large_resize_are_refused_in_milliseconds(server_url):
    budget = _budget(server_url)["endpoints"]["/reconstruct"]["budget_megapixels"]
    # one pass as the endpoint's measured cost model prices it (server/budget.py)
    worker = next(w for w in requests.get(server_url + "/info", timeout=10).json()["workers"]
                  if w["endpoint"] == "/reconstruct")
    one = Budget(budget, worker["cost_growth_per_megapixel"], worker["warmup_megapixels"],
                 worker["growth_measured_to_megapixels"]).pass_cost(MAX_SIDE * MAX_SIDE / 1e6)
    maps = math.floor(budget / one) + 1
    if maps > MAX_MAPS:
        pytest.skip(f"this device's budget ({budget:.0f} MP) holds the largest request")
    body = encode_npy(np.random.default_rng(0).random((maps, 1, 4, 4), dtype=np.float32))
    start = time.perf_counter()
    r = _post(server_url + "/reconstruct", body, {"resize": f"{MAX_SIDE},{MAX_SIDE}"})
    elapsed = time.perf_counter() - start
    assert r.status_code == 413, r.text
    doc = r.json()
    assert doc["budget_megapixels"] == pytest.approx(budget, rel=1e-5)
    assert doc["cost_megapixels"] == pytest.approx(maps * one, rel=1e-5)
    print(f"\n{len(body)}-byte request costing {doc['cost_megapixels']:.1f} MP refused in "
          f"{elapsed * 1000:.1f} ms (budget {budget:.2f} MP)")


def test_a_request_within_the_measured_budget_is_served(server_url):
    maps = np.random.default_rng(1).random((2, 1, 64, 64), dtype=np.float32)
    r = _post(server_url + "/reconstruct", encode_npy(maps))
    assert r.status_code == 200, r.text
