"""Shared benchmark plumbing: the machine record, timing, FLOP counts, peak FLOP/s, tables, JSON,
synthetic inputs and the benchmarked model."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from model.autoencoder import AutoencoderKL
from model.config import ModelConfig
from model.loading import load
from model.run_config import load_config
from runtime.machine import cpu_flags, cpu_model

MEASUREMENTS = Path(__file__).resolve().parent / "measurements"
# Dense (no sparsity) tensor-core peaks from the vendors' datasheets, FLOP/s.
GPU_PEAKS = {"H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
             "H100 PCIe": {"bf16": 756e12, "fp16": 756e12, "fp32": 51e12},
             "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
             "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12}}


def _cpu_mhz() -> float | None:
    """The clock the kernel reports (a VM reports its nominal clock, not the boost)."""
    try:
        values = [float(line.split(":", 1)[1]) for line in
                  Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("cpu MHz")]
    except (OSError, ValueError):
        return None
    return max(values) if values else None


# FLOP per cycle per core of the widest native unit for each reduced precision, per Intel's
# figures: an AMX tile unit does 1024 bf16 (Sapphire Rapids: AMX-BF16) or fp16 (AMX-FP16)
# operations per cycle; AVX512-BF16's dot products and AVX512-FP16's FMAs do twice the fp32
# vector rate. A precision with neither is emulated: no peak.
AMX_FLOP_PER_CYCLE = 1024
NATIVE_UNITS = {"bf16": ("amx_bf16", "avx512_bf16"), "fp16": ("amx_fp16", "avx512_fp16")}


def _reduced_per_cycle(flags: set[str], fp32_per_cycle: int, precision: str
                       ) -> tuple[int | None, str]:
    matrix, vector = NATIVE_UNITS[precision]
    if matrix in flags:
        return AMX_FLOP_PER_CYCLE, f"{matrix}: {AMX_FLOP_PER_CYCLE} FLOP/cycle"
    if vector in flags:
        return 2 * fp32_per_cycle, f"{vector}: 2 x fp32"
    return None, "emulated: no peak"


def cpu_peak(threads: int) -> dict[str, Any]:
    """Assumed peak FLOP/s of `threads` cores per precision (cores x clock x FLOP/cycle of the
    widest native unit), with the derivation; None where a precision is emulated."""
    flags = cpu_flags()
    lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
    fma = 2 if "fma" in flags or "avx512f" in flags else 1
    pipes = 2  # two FMA pipes per core (Zen 2/3/4, Skylake-SP and later)
    mhz = _cpu_mhz() or 0.0
    per_cycle = lanes * fma * pipes
    peaks: dict[str, float | None] = {"fp32": threads * mhz * 1e6 * per_cycle}
    units = []
    for precision in NATIVE_UNITS:
        cycle, unit = _reduced_per_cycle(flags, per_cycle, precision)
        peaks[precision] = None if cycle is None else threads * mhz * 1e6 * cycle
        units.append(f"{precision} {unit}")
    return {"flops": peaks, "derivation":
            f"{threads} cores x {mhz:.0f} MHz x {per_cycle} fp32 FLOP/cycle "
            f"({lanes} lanes x {fma} (FMA) x {pipes} pipes); " + ", ".join(units)}


def gpu_peak(name: str, precision: str) -> float | None:
    """The datasheet dense peak of a known GPU for `precision`, else None."""
    for key, peaks in GPU_PEAKS.items():  # longest names first where they overlap
        if key in name:
            return peaks.get(precision)
    return None


def measured_gemm_rate(threads: int, n: int = 2048, repeats: int = 5) -> float:
    """fp32 FLOP/s of a square matmul on this CPU now: the practical ceiling."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    run = median_time(lambda: a @ b, warmup=1, repeats=repeats)
    return 2 * n ** 3 / run["median_s"]


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine() -> dict[str, Any]:
    """Where and when a benchmark ran: CPU, GPU, load, thread count, library versions."""
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": platform.node(), "python": sys.version.split()[0],
            "cpu": cpu_model(), "cpu_count": os.cpu_count(),
            "cpu_mhz_reported": _cpu_mhz(), "torch_threads": torch.get_num_threads(),
            "load_average": os.getloadavg(),
            "isa": sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma"))),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "versions": {p: _version(p) for p in
                         ("torch", "onnxruntime", "onnxruntime-gpu", "diffusers", "litserve",
                          "numpy")}}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], Any], warmup: int, repeats: int,
                device: torch.device = torch.device("cpu")) -> dict[str, float]:
    """Median (and min/max) wall seconds of `fn` over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "repeats": repeats}


def model_flops(model: AutoencoderKL, op: str, height: int, width: int) -> float:
    """Model FLOPs (a multiply-add = 2) of one map through `op`, counted on the meta device."""
    f = model.downsample_factor
    with torch.device("meta"):
        meta = AutoencoderKL(model.ddconfig, model.embed_dim, model.scale_factor)
        x = torch.empty(1, model.ddconfig.in_channels, height, width)
        z = torch.empty(1, model.embed_dim, height // f, width // f)
    with FlopCounterMode(display=False) as counter:
        if op in ("encode", "reconstruct"):
            meta.encode(x)
        if op in ("decode", "reconstruct"):
            meta.decode(z)
    return float(counter.get_total_flops())


DEFAULT_CONFIG = "first_radio.yaml"


def build_model(config: str | None, ckpt: str | None, seed: int = 0
                ) -> tuple[AutoencoderKL, str]:
    """The benchmarked network: a checkpoint's weights (its stored config unless `config` is
    given), else the config's network with seeded random weights (speed does not depend on
    the values). Returns it and a line saying where it came from."""
    if ckpt:
        return load(ckpt, config=config).model, f"checkpoint {ckpt}"
    config = config or DEFAULT_CONFIG
    cfg: ModelConfig = load_config(config).model
    torch.manual_seed(seed)
    return AutoencoderKL.from_config(cfg).eval(), f"{config}, random weights (seed {seed})"


def synthetic_maps(count: int, height: int, width: int, seed: int = 42) -> torch.Tensor:
    """[count, 1, H, W] synthetic radio maps in the network's [-1, 1] (radiomaps.synthetic)."""
    from radiomaps.synthetic import SyntheticRadioMaps

    maps = SyntheticRadioMaps(list(range(1, count + 1)), num_tx=1, image_size=[height, width],
                              seed=seed)
    return torch.stack([maps[i]["image"] for i in range(count)])


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A Markdown table of `rows` restricted to `columns` (floats to 4 significant digits)."""
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def bench_parser(module: str, doc: str | None) -> argparse.ArgumentParser:
    """The parser of `python -m bench.<module>`: its docstring as help, no abbreviations."""
    return argparse.ArgumentParser(prog=f"python -m bench.{module}", description=doc,
                                   allow_abbrev=False,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def print_and_write(report: str, path: str | Path, result: dict[str, Any]) -> int:
    """Print a benchmark's report, write its result as JSON to `path`; the exit code."""
    print(report)
    print(f"\nwrote {write_json(path, result)}")
    return 0


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def parse_ints(text: str) -> list[int]:
    """'1,4,16' -> [1, 4, 16] (for argparse `type=`)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, "
                                         f"got {text!r}")
    return values
