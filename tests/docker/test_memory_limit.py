"""A container's memory limit, as the server sees and respects it.

The server reads the limit from the container's cgroup (server/memory.py: v2 memory.max, v1
memory.limit_in_bytes, the tightest over the cgroup and its ancestors): its request budget must
fit in that limit, and a request it admitted must either run or be refused with 503 (never
started) when the container has no room left for it, instead of the kernel's OOM killer ending
a worker (500). Sent twice: at deploy/compose.yaml's limit, then with the container brought to
its limit by `docker update --memory` (room for half of what the request needs).
"""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import requests
import yaml

from model.io import encode_npy
from server.budget import Budget
from tests.docker.engine import ROOT, Container, docker, free_port, run_server

pytestmark = pytest.mark.docker

MEMORY_FRACTION = 0.8  # server/apis.py: the share of the memory a batch may take
CACHE = "/var/cache/radiodiff-vae"  # the image's RADIODIFF_CACHE_DIR: one worker measures
READ = ("from server import memory; import json; "
        "print(json.dumps([memory.capacity_bytes(), memory.available_bytes()]))")
PEAK = ("from pathlib import Path\n"  # the container's cgroup: 'v2 PEAK' or 'v1 PEAK'
        "for v, f in (('v2', 'memory.peak'), ('v1', 'memory/memory.max_usage_in_bytes')):\n"
        "    p = Path('/sys/fs/cgroup', f)\n"
        "    if p.exists(): print(v, p.read_text().strip()); break\n")


def compose_limit() -> int:
    """deploy/compose.yaml's mem_limit of a replica, in bytes."""
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    value, unit = re.fullmatch(r"(\d+)([mg])", compose["services"]["replica-0"]["mem_limit"]).groups()
    return int(value) << {"m": 20, "g": 30}[unit]


def hungriest_request(info: dict) -> tuple[str, np.ndarray, float, float]:
    """(endpoint, body array, cost in megapixels, working bytes the server expects) of the
    admitted request that needs the most memory by the server's own measure: the endpoint with
    the largest admissible pass x bytes per megapixel, the largest map size and count that its
    budget (priced by the endpoint's cost model), its largest pass, the maps-per-request and
    the body limit allow; its working memory is its largest pass's (server/apis.py)."""
    workers = {w["endpoint"]: w for w in info["workers"]}
    per_mp = {e: w["bytes_per_megapixel"] for e, w in workers.items()}
    budgets = {e: v["budget_megapixels"] for e, v in info["budget"]["endpoints"].items()}
    largest = {e: min(budgets[e], workers[e]["max_pass_megapixels"] or budgets[e])
               for e in budgets}  # the largest pass a request may make (server/budget.py)
    endpoint = max(budgets, key=lambda e: largest[e] * per_mp[e])
    worker = workers[endpoint]
    # the endpoint's own cost model (server/budget.py): a larger pass costs more per pixel
    model_cost = Budget(budgets[endpoint], worker["cost_growth_per_megapixel"],
                        worker["warmup_megapixels"], worker["growth_measured_to_megapixels"])
    limits, model = info["limits"], info["model"]
    f, z = model["downsample_factor"], model["latent_channels"]
    for side in (512, 384, 256, 128, 64):
        if side * side > limits["max_pixels"]:
            continue
        shape = (z, side // f, side // f) if endpoint == "/decode" else (1, side, side)
        one = model_cost.pass_cost(side * side / 1e6)
        maps = min(int(budgets[endpoint] / one), limits["max_request_maps"],
                   int((limits["max_body_bytes"] - 4096) / (4 * np.prod(shape))))
        if int(largest[endpoint] / one) < worker["pass_maps"]:  # its one pass must fit
            maps = min(maps, int(largest[endpoint] / one))
        if maps >= 1:
            passed = min(maps, worker["pass_maps"]) * one  # its largest pass's megapixels
            body = np.random.default_rng(2).random((maps, *shape), dtype=np.float32)
            return endpoint, body, maps * one, passed * per_mp[endpoint]
    raise AssertionError(f"no request fits the budget: {budgets}")


def send(container: Container, endpoint: str, body: np.ndarray) -> requests.Response:
    return requests.post(container.url + endpoint, data=encode_npy(body), timeout=300,
                         headers={"Content-Type": "application/x-npy"})


def peak_mib(container: Container) -> str:
    version, peak = container.python(PEAK).split()
    return f"{int(peak) >> 20} MiB (cgroup {version})"


def test_a_container_at_its_memory_limit_refuses_the_hungriest_admitted_request(cpu_image,
                                                                               figures):
    limit = compose_limit()
    container = run_server("memory", cpu_image, free_port(), f"--memory={limit}",
                           f"--memory-swap={limit}", "--tmpfs", f"{CACHE}:mode=1777")
    try:
        container.wait_ready()
        capacity, free = json.loads(container.python(READ))
        assert capacity == limit, f"the server reads {capacity} bytes, the limit is {limit}"
        at_rest, started_peak = capacity - free, peak_mib(container)
        info = requests.get(container.url + "/info", timeout=30).json()
        endpoint, body, cost, need = hungriest_request(info)
        # the budget fits in the limit: MEMORY_FRACTION of it, less what a worker holds
        assert need <= MEMORY_FRACTION * limit, (endpoint, cost, need)
        what = f"{endpoint} of a {list(body.shape)} npy"
        first = send(container, endpoint, body)
        first_peak = peak_mib(container)

        # at the limit: room for half of what the server expects the request to need
        used = capacity - json.loads(container.python(READ))[1]
        lowered = (used + int(need / 2)) // 4096 * 4096  # the kernel keeps whole pages
        docker("update", f"--memory={lowered}", f"--memory-swap={lowered}", container.name)
        assert json.loads(container.python(READ))[0] == lowered
        second = send(container, endpoint, body)
        state = container.state()
        figures.append(
            f"memory limit: the server reads the container's {limit >> 20} MiB limit; at rest "
            f"it uses {at_rest >> 20} MiB (peak {started_peak} while starting); the hungriest "
            f"admitted request, {what} ({cost:.3f} MP of output, {need / 2**20:.1f} MiB by the "
            f"server's warm-up measure): HTTP {first.status_code} at {limit >> 20} MiB (container"
            f" peak {first_peak}); HTTP {second.status_code} with the limit lowered to "
            f"{lowered >> 20} MiB; container running {state['Running']}, restarts "
            f"{container.restart_count()}")
        assert state["Running"] and container.restart_count() == 0
        assert first.status_code in (200, 503), (first.status_code, first.text[:300])
        assert second.status_code == 503, (second.status_code, second.text[:300])
        assert "MiB of working memory" in second.json()["detail"]
        assert "Retry-After" in second.headers
        # alive and serving: a small request still gets its answer
        small = send(container, "/encode", np.zeros((64, 64), np.float32))
        assert small.status_code == 200, small.text[:300]
        assert container.serves()
    finally:
        container.remove()
