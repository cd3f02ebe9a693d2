"""How much the request budgets move between server starts, idle and beside a busy job.

`python -m bench.budget_stability --model reference --starts 5` starts `python -m server` that
many times on an idle machine and as many beside a busy 2-thread job, in two modes: `recorded`
(one cache directory: the first start measures the inference decision and the speed, the others
read them, as replicas and restarts on one machine do) and `fresh` (a new cache directory per
start: every start measures, under whatever load there is). Per start it reads each endpoint's
budget from GET /info and sends a 1024x1024 `?tiled=true` /reconstruct, noting whether it is
admitted (no 413 within 3 s; the client then leaves and the request is dropped). Prints a table
and the max/min budget ratio per mode; writes bench/measurements/budget-stability-*.json.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import requests

from bench.common import MEASUREMENTS, machine
from model.io import encode_npy
from server.client import Client

ROOT = Path(__file__).resolve().parents[1]
BUSY = ("import torch, time\ntorch.set_num_threads({threads})\na = torch.randn(1024, 1024)\n"
        "end = time.time() + 3600\nwhile time.time() < end:\n    a @ a\n")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _busy(threads: int, on: bool):
    proc = subprocess.Popen([sys.executable, "-c", BUSY.format(threads=threads)]) if on else None
    try:
        yield
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()


def _start(model: str, cache: Path) -> dict:
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RADIODIFF_CACHE_DIR": str(cache)}
    cmd = [sys.executable, "-m", "server", "--model", model, "--host", "127.0.0.1", "--port",
           str(port), "--log-level", "warning"]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    client = Client(url, timeout=2)
    try:
        while not client.ready():
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode}")
            time.sleep(0.5)
        ready = time.monotonic() - start
        info = requests.get(url + "/info", timeout=10).json()
        return {"ready_s": round(ready, 1), "tiled_1024": _admitted(url),
                "budgets": {k: v["budget_megapixels"]
                            for k, v in info["budget"]["endpoints"].items()},
                "paths": {w["endpoint"]: w["precision"] for w in info["workers"]}}
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)


def _admitted(url: str) -> str:
    body = encode_npy(np.random.default_rng(0).random((1, 1, 1024, 1024), np.float32))
    try:
        r = requests.post(url + "/reconstruct", params={"tiled": "true"}, data=body, timeout=3,
                          headers={"Content-Type": "application/x-npy"})
    except requests.Timeout:
        return "admitted"
    return "admitted" if r.status_code == 200 else f"{r.status_code}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--model", default="reference")
    p.add_argument("--starts", type=int, default=5)
    p.add_argument("--busy-threads", type=int, default=2)
    p.add_argument("--modes", default="recorded,fresh")
    args = p.parse_args()
    rows = []
    for mode in args.modes.split(","):
        shared = Path(tempfile.mkdtemp(prefix="budget-recorded-"))
        for load in ("idle", "busy"):
            with _busy(args.busy_threads, load == "busy"):
                for i in range(args.starts):
                    cache = shared if mode == "recorded" else Path(tempfile.mkdtemp())
                    row = {"mode": mode, "load": load, "start": i,
                           "loadavg_1min_before": round(os.getloadavg()[0], 2),
                           **_start(args.model, cache)}
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    summary = {}
    for mode in args.modes.split(","):
        mine = [r for r in rows if r["mode"] == mode]
        ratios = {ep: max(r["budgets"][ep] for r in mine) / min(r["budgets"][ep] for r in mine)
                  for ep in mine[0]["budgets"]}
        summary[mode] = {"max_over_min_budget": ratios,
                         "tiled_1024_admitted": sum(r["tiled_1024"] == "admitted" for r in mine),
                         "starts": len(mine)}
        print(f"{mode}: budget max/min per endpoint {ratios}; 1024x1024 tiled admitted "
              f"{summary[mode]['tiled_1024_admitted']}/{len(mine)}")
    MEASUREMENTS.mkdir(exist_ok=True)
    out = MEASUREMENTS / f"budget-stability-{int(time.time())}.json"
    out.write_text(json.dumps({"machine": machine(), "args": vars(args), "rows": rows,
                               "summary": summary}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
