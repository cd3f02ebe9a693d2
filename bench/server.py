"""`python -m bench.server`: HTTP throughput (maps/s) and latency (p50/p99) of `python -m server`
on POST /encode at several client concurrencies, with cross-request batching off
(--max-batch-size 1) and on, against the direct in-process call of the same backend in the
same run (the server's overhead as a ratio).

Each request carries one map as application/x-npy float32 [1, 1, H, W] in [0, 1]. The client
threads run on the same machine as the server (and share its CPU).
"""
from __future__ import annotations

import argparse
import http.client
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from model.autoencoder import AutoencoderKL
from model.checkpoint import save_checkpoint
from model.config import to_dict
from model.io import encode_npy, to_model
from train.config import load_config

from .common import (MEASUREMENTS, machine, markdown_table, median_time, parse_ints,
                     synthetic_maps, write_json)

COLUMNS = ["batching", "concurrency", "requests", "maps_per_s", "p50_ms", "p99_ms",
           "direct_ms_per_map", "overhead"]
READY_TIMEOUT_S = 600


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.server", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint or export directory to serve (default: the "
                                   "--config network with random weights, written to a temp dir)")
    p.add_argument("--config", help="model YAML when --model is not given "
                                    "(default quickstart.yaml, the tiny model)")
    p.add_argument("--backend", choices=["torch", "onnx"], default="torch")
    p.add_argument("--size", type=int, help="map height = width (default: the config's)")
    p.add_argument("--concurrency", type=parse_ints, default=[1, 8, 32],
                   help="client threads, comma-separated (default 1,8,32)")
    p.add_argument("--requests", type=int, default=64,
                   help="timed requests per concurrency level (default %(default)s)")
    p.add_argument("--max-batch-size", type=int, default=32,
                   help="the server's batch size with batching on (default %(default)s)")
    p.add_argument("--batch-timeout", type=float, default=0.01,
                   help="seconds a batch waits to fill with batching on (default %(default)s)")
    p.add_argument("--port", type=int, default=0, help="default: a free port")
    p.add_argument("--json", type=Path, default=MEASUREMENTS / "server.json")
    return p


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _checkpoint(config: str | None, workdir: Path) -> tuple[Path, str]:
    """A checkpoint (with its config) of the config's network with seeded random weights."""
    config = config or "quickstart.yaml"
    cfg = load_config(config).model
    torch.manual_seed(0)
    model = AutoencoderKL.from_config(cfg)
    payload = {"model": model.state_dict(), "config": {"model": to_dict(cfg)}}
    return save_checkpoint(workdir / "model-0.pt", payload), f"{config}, random weights (seed 0)"


def _export(ckpt: Path, workdir: Path) -> Path:
    out = workdir / "export"
    subprocess.run([sys.executable, "-m", "export", "--ckpt", str(ckpt), "--out", str(out)],
                   check=True, stdout=subprocess.DEVNULL)
    return out


class Server:
    """`python -m server` in a child process, stopped with SIGTERM on exit."""

    def __init__(self, model: Path, backend: str, max_batch: int, timeout: float, port: int):
        self.port = port or _free_port()
        self.args = [sys.executable, "-m", "server", "--model", str(model), "--backend", backend,
                     "--device", "cpu", "--host", "127.0.0.1", "--port", str(self.port),
                     "--max-batch-size", str(max_batch), "--batch-timeout", str(timeout),
                     "--log-level", "warning"]

    def __enter__(self) -> Server:
        self.proc = subprocess.Popen(self.args, start_new_session=True)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.args}")
            if _get(self.port, "/health") == 200:
                return self
            time.sleep(0.5)
        raise RuntimeError(f"server not ready after {READY_TIMEOUT_S} s")

    def __exit__(self, *exc: object) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def _get(port: int, path: str) -> int | None:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", path)
        status = conn.getresponse().status
        conn.close()
        return status
    except OSError:
        return None


def _client(port: int, body: bytes, count: int, latencies: list[float],
            errors: list[str]) -> None:
    """Send `count` POST /encode requests on one keep-alive connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    headers = {"Content-Type": "application/x-npy", "Accept": "application/x-npy"}
    for _ in range(count):
        start = time.perf_counter()
        conn.request("POST", "/encode", body=body, headers=headers)
        response = conn.getresponse()
        payload = response.read()
        if response.status != 200:
            errors.append(f"{response.status}: {payload[:200]!r}")
        latencies.append(time.perf_counter() - start)
    conn.close()


def load(port: int, body: bytes, concurrency: int, requests: int) -> dict:
    """`requests` requests from `concurrency` threads: maps/s and latency percentiles."""
    per_thread = max(requests // concurrency, 1)
    latencies: list[float] = []
    errors: list[str] = []
    threads = [threading.Thread(target=_client, args=(port, body, per_thread, latencies, errors))
               for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, first: {errors[0]}")
    ms = sorted(1e3 * v for v in latencies)
    return {"concurrency": concurrency, "requests": len(ms), "maps_per_s": len(ms) / wall,
            "p50_ms": statistics.median(ms), "p99_ms": ms[min(len(ms) - 1, int(0.99 * len(ms)))]}


def direct(model: Path, backend: str, x: np.ndarray, batches: list[int]) -> dict[int, dict]:
    """The same backend the server loads, called in this process: ms per map per batch size."""
    from server.backends import load_backend

    engine = load_backend(_spec(model, backend), "cpu")
    runs = {}
    for batch in batches:
        maps = to_model(np.repeat(x, batch, axis=0))
        run = median_time(lambda: engine.encode(maps), warmup=1, repeats=5)
        runs[batch] = {"batch": batch, "ms_per_map": 1e3 * run["median_s"] / batch}
    del engine
    return runs


def run(args: argparse.Namespace) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="radiodiff-bench-server-"))
    source = f"--model {args.model}"
    model = Path(args.model) if args.model else None
    if model is None:
        model, source = _checkpoint(args.config, workdir)
        if args.backend == "onnx":
            model = _export(model, workdir)
    size = args.size or _spec(model, args.backend).config_size[0]
    x = (synthetic_maps(1, size, size).numpy() + 1) / 2
    body = encode_npy(x.astype(np.float32))
    batches = sorted({1} | {min(c, args.max_batch_size) for c in args.concurrency})
    direct_runs = direct(model, args.backend, x, batches)
    rows = []
    for label, max_batch in (("off", 1), ("on", args.max_batch_size)):
        with Server(model, args.backend, max_batch, args.batch_timeout, args.port) as server:
            load(server.port, body, 1, 2)  # warm-up: first requests pay one-off costs
            for c in args.concurrency:
                print(f"batching {label}, concurrency {c} ...", file=sys.stderr, flush=True)
                row = {"batching": label, **load(server.port, body, c, args.requests)}
                row.update(_overhead(row, direct_runs, c, max_batch))
                rows.append(row)
    return {"machine": machine(), "model": source, "backend": args.backend, "size": size,
            "max_batch_size": args.max_batch_size, "batch_timeout": args.batch_timeout,
            "direct": list(direct_runs.values()), "results": rows}


def _overhead(row: dict, direct_runs: dict, concurrency: int, max_batch: int) -> dict:
    """Server time per map over the direct call's at the largest batch the server could form
    (min(concurrency, max batch size))."""
    batch = min(concurrency, max_batch)
    ref = direct_runs[batch]["ms_per_map"]
    served = 1e3 / row["maps_per_s"]
    return {"direct_ms_per_map": ref, "direct_batch": batch, "overhead": served / ref - 1}


def _spec(model: Path, backend: str):
    """What the server will load (server.spec reads it without building the network)."""
    from server.settings import parse_settings
    from server.spec import describe_model

    return describe_model(parse_settings(["--model", str(model), "--backend", backend,
                                          "--device", "cpu"]))


def report(result: dict) -> str:
    m = result["machine"]
    head = (f"# server: {result['model']}, backend {result['backend']}, {result['size']}x"
            f"{result['size']} maps, max batch {result['max_batch_size']}, timeout "
            f"{result['batch_timeout']} s\n{m['date']}  {m['cpu']} ({m['cpu_count']} CPUs, load "
            f"{m['load_average'][0]:.2f})\ndirect: " +
            ", ".join(f"batch {d['batch']}: {d['ms_per_map']:.2f} ms/map" for d in result["direct"]))
    return head + "\n\n" + markdown_table(result["results"], COLUMNS)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = run(args)
    print(report(result))
    print(f"\nwrote {write_json(args.json, result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
