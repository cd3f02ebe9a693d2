"""The most expensive requests a server admits, timed against their share of the deadline.

`python -m bench.worst_requests --model reference` starts `python -m server`, reads each
endpoint's budget and cost model from GET /info, builds per endpoint the largest request the
server admits (one map, and two maps, of the largest side whose cost fits the budget, sent as a
tiny npy with `?resize=`, or as latents for /decode; tiled where the side passes --max-pixels, as
the server does), sends it and times it. An admitted request should finish within
BUDGET_FRACTION of --timeout (server/budget.py). Extra server options follow `--`.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import requests

from model.io import encode_npy
from runtime.tiling import Tiler
from server.budget import BUDGET_FRACTION, Budget, cost_megapixels
from server.client import Client

ROOT = Path(__file__).resolve().parents[1]
STEP = 16  # sides searched, a multiple of every factor the bundled models have


def largest_side(info: dict, endpoint: str, maps: int) -> int:
    """The largest square side whose cost for `maps` maps fits the endpoint's budget."""
    worker = next(w for w in info["workers"] if w["endpoint"] == endpoint)
    budget = Budget(worker["budget_megapixels"], worker["cost_growth_per_megapixel"],
                    worker["warmup_megapixels"])
    limits = info["limits"]
    tiler = Tiler(limits["tile"], limits["tile_overlap"], info["model"]["downsample_factor"])
    best = 0
    for side in range(STEP, int(limits["max_tiled_pixels"] ** 0.5) + 1, STEP):
        tiles = tiler if side * side > limits["max_pixels"] else None
        if cost_megapixels(maps, (side, side), 1, tiles, budget) <= budget.megapixels:
            best = side
    return best


def request(info: dict, endpoint: str, maps: int, side: int) -> tuple[bytes, dict]:
    if endpoint == "/decode":
        f, z = info["model"]["downsample_factor"], info["model"]["latent_channels"]
        return encode_npy(np.zeros((maps, z, side // f, side // f), np.float32)), {}
    tiny = np.random.default_rng(0).random((maps, 1, 4, 4), np.float32)
    return encode_npy(tiny), {"resize": f"{side},{side}"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--model", default="reference")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("server_args", nargs="*", help="more `python -m server` options, after --")
    args = p.parse_args()
    url = f"http://127.0.0.1:{args.port}"
    cmd = [sys.executable, "-m", "server", "--model", args.model, "--host", "127.0.0.1",
           "--port", str(args.port), "--log-level", "warning", *args.server_args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        client = Client(url, timeout=2)
        while not client.ready():
            if proc.poll() is not None:
                sys.exit(f"the server exited with {proc.returncode}")
            time.sleep(1)
        info = client.info()
        share = BUDGET_FRACTION * info["budget"]["timeout"]
        for w in sorted(info["workers"], key=lambda w: w["endpoint"]):
            print(f"{w['endpoint']}: {w['seconds_per_megapixel']:.3g} s/MP, budget "
                  f"{w['budget_megapixels']:.3g} MP, growth {w['cost_growth_per_megapixel']:.3g}"
                  f"/MP ({w['speed_source']})")
        for endpoint, maps in (("/reconstruct", 1), ("/reconstruct", 2), ("/encode", 1),
                               ("/decode", 1)):
            side = largest_side(info, endpoint, maps)
            body, params = request(info, endpoint, maps, side)
            start = time.perf_counter()
            r = requests.post(url + endpoint, data=body, params=params, timeout=300,
                              headers={"Content-Type": "application/x-npy"})
            took = time.perf_counter() - start
            verdict = "within" if took <= share else "OVER"
            print(f"{endpoint} {maps} x {side}x{side} ({len(body)} B): HTTP {r.status_code} in "
                  f"{took:.1f} s; its share of the deadline {share:.0f} s: {verdict}")
    finally:
        proc.terminate()
        proc.wait(60)


if __name__ == "__main__":
    main()
