"""`python -m bench.server`: HTTP throughput (maps/s) and latency (p50/p99) of `python -m server`
on POST /encode at several client concurrencies, with cross-request batching off
(--max-batch-size 1) and on, against the direct in-process call of the same backend in the
same run (the server's overhead as a ratio).

Each row also says where the served time per map went: the inference workers' own model time
(from the server's /metrics), the rest (HTTP, payload decoding, queues, waiting for a batch),
and the CPU time of the busiest server process (the encode worker) and of all the others.
The paired table times direct calls and HTTP requests alternately at concurrency 1, the fairest
overhead figure on a machine whose speed drifts.

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
from model.run_config import load_config

from .common import (MEASUREMENTS, bench_parser, machine, markdown_table, median_time, parse_ints,
                     print_and_write, synthetic_maps)

COLUMNS = ["batching", "concurrency", "requests", "maps_per_s", "p50_ms", "p99_ms",
           "direct_ms_per_map", "overhead", "mean_batch", "model_ms_per_map", "http_overhead",
           "outside_model_ms_per_map", "worker_cpu_ms_per_map", "other_cpu_ms_per_map"]
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
READY_TIMEOUT_S = 600


def build_parser() -> argparse.ArgumentParser:
    p = bench_parser("server", __doc__)
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
    p.add_argument("--paired-rounds", type=int, default=8,
                   help="rounds of (direct call, HTTP request) at concurrency 1 for the paired "
                        "overhead, per server (default %(default)s; 0: skip)")
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

    def __init__(self, model: Path, backend: str, max_batch: int, timeout: float, port: int,
                 max_queue: int):
        self.port = port or _free_port()
        self.args = [sys.executable, "-m", "server", "--model", str(model), "--backend", backend,
                     "--device", "cpu", "--host", "127.0.0.1", "--port", str(self.port),
                     "--max-batch-size", str(max_batch), "--batch-timeout", str(timeout),
                     # every client may wait at once: the bench measures throughput, not
                     # backpressure (the default queue is 2 batches: 429 past it)
                     "--max-queue", str(max_queue), "--log-level", "warning"]

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


# The /metrics samples `profile` reads, all for POST /encode.
SAMPLES = ("radiodiff_model_duration_seconds_sum", "radiodiff_maps_processed_total",
           "radiodiff_batch_size_count")


def _samples(port: int, endpoint: str = "/encode") -> dict[str, float]:
    """SAMPLES from one scrape of the server's /metrics (0 before a first observation)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/metrics")
    lines = conn.getresponse().read().decode().splitlines()
    conn.close()
    prefixes = {name: f'{name}{{endpoint="{endpoint}"}} ' for name in SAMPLES}
    return {name: sum(float(line[len(prefix):]) for line in lines if line.startswith(prefix))
            for name, prefix in prefixes.items()}


def _cpu_seconds(session: int) -> dict[int, float]:
    """CPU seconds (user + system) used so far by each process of the server's session."""
    usage = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process ended
        if int(fields[3]) == session:  # field 6 of stat(5), the session id
            usage[int(stat.parent.name)] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return usage


def profile(port: int, session: int, body: bytes, concurrency: int, requests: int) -> dict:
    """`load`, the mean maps per forward pass, and where the served time per map went: the
    workers' model time (from /metrics), the rest (HTTP, payloads, queues), and the CPU time of
    the busiest server process (the encode worker) and of all its other processes (which compete
    with it for the cores)."""
    before, cpu = _samples(port), _cpu_seconds(session)
    row = load(port, body, concurrency, requests)
    used = {pid: s - cpu.get(pid, 0.0) for pid, s in _cpu_seconds(session).items()}
    model_s, n, passes = (v - before[k] for k, v in _samples(port).items())
    if n <= 0:
        raise RuntimeError("the server's /metrics counted no maps for /encode during the load: "
                           "its metric names no longer match bench/server.py")
    model_ms = 1e3 * model_s / n
    worker = max(used.values())
    return {**row, "mean_batch": n / passes, "model_ms_per_map": model_ms,
            "outside_model_ms_per_map": 1e3 / row["maps_per_s"] - model_ms,
            "worker_cpu_ms_per_map": 1e3 * worker / n,
            "other_cpu_ms_per_map": 1e3 * (sum(used.values()) - worker) / n}


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


def _engine(model: Path, backend: str):
    """The same backend the server loads, in this process."""
    from server.backends import load_backend

    return load_backend(_spec(model, backend), "cpu")


def direct(engine, x: np.ndarray, batches: list[int]) -> dict[int, float]:
    """The direct call's ms per map per batch size."""
    runs = {}
    for batch in batches:
        maps = to_model(np.repeat(x, batch, axis=0))
        run = median_time(lambda: engine.encode(maps), warmup=1, repeats=5)
        runs[batch] = 1e3 * run["median_s"] / batch
    return runs


def paired(port: int, body: bytes, engine, x: np.ndarray, rounds: int) -> dict:
    """Concurrency 1, round-robin: each round one direct call, then one HTTP request of the same
    map, so drift in the machine's speed hits both alike; overhead = median of per-round ratios."""
    maps = to_model(x)
    direct_s, served_s, errors = [], [], []
    for _ in range(rounds):
        start = time.perf_counter()
        engine.encode(maps)
        direct_s.append(time.perf_counter() - start)
        _client(port, body, 1, served_s, errors)
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, first: {errors[0]}")
    ratios = [s / d for s, d in zip(served_s, direct_s)]
    return {"rounds": rounds, "direct_ms": 1e3 * statistics.median(direct_s),
            "served_ms": 1e3 * statistics.median(served_s),
            "overhead": statistics.median(ratios) - 1}


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
    engine = _engine(model, args.backend)
    before = direct(engine, x, batches)
    rows, pairs = [], []
    for label, max_batch in (("off", 1), ("on", args.max_batch_size)):
        with Server(model, args.backend, max_batch, args.batch_timeout, args.port,
                    max(args.concurrency)) as server:
            load(server.port, body, 1, 2)  # warm-up: first requests pay one-off costs
            if args.paired_rounds:
                print(f"batching {label}, paired ...", file=sys.stderr, flush=True)
                pairs.append({"batching": label,
                              **paired(server.port, body, engine, x, args.paired_rounds)})
            for c in args.concurrency:
                print(f"batching {label}, concurrency {c} ...", file=sys.stderr, flush=True)
                row = {"batching": label,
                       **profile(server.port, server.proc.pid, body, c, args.requests)}
                rows.append({**row, "direct_batch": min(c, max_batch)})
    # Timed before and after the servers: this machine's speed drifts by up to ~10% over
    # minutes, and their mean is the fairer reference for the runs in between.
    after = direct(engine, x, batches)
    direct_runs = {b: {"batch": b, "ms_per_map_before": before[b], "ms_per_map_after": after[b],
                       "ms_per_map": (before[b] + after[b]) / 2} for b in batches}
    for row in rows:
        row.update(_overhead(row, direct_runs[row["direct_batch"]]["ms_per_map"]))
    return {"machine": machine(), "model": source, "backend": args.backend, "size": size,
            "max_batch_size": args.max_batch_size, "batch_timeout": args.batch_timeout,
            "direct": list(direct_runs.values()), "paired": pairs, "results": rows}


def _overhead(row: dict, direct_ms: float) -> dict:
    """Server time per map over the direct call's at the largest batch the server could form
    (min(concurrency, max batch size)); `http_overhead`: the time outside the workers' model
    calls (HTTP, payloads, queues, the batch window) over the model time; at concurrency > 1
    HTTP work overlaps model time, so there it is a lower bound."""
    served = 1e3 / row["maps_per_s"]
    return {"direct_ms_per_map": direct_ms, "overhead": served / direct_ms - 1,
            "http_overhead": row["outside_model_ms_per_map"] / row["model_ms_per_map"]}


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
            ", ".join(f"batch {d['batch']}: {d['ms_per_map']:.2f} ms/map (before "
                      f"{d['ms_per_map_before']:.2f}, after {d['ms_per_map_after']:.2f})"
                      for d in result["direct"]))
    table = markdown_table(result["results"], COLUMNS)
    if result["paired"]:
        table = (markdown_table(result["paired"], ["batching", "rounds", "direct_ms", "served_ms",
                                                    "overhead"]) + "\n\n" + table)
    return head + "\n\n" + table


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = run(args)
    return print_and_write(report(result), args.json, result)


if __name__ == "__main__":
    sys.exit(main())
