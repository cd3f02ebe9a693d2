"""What machine this is, as far as choosing a fast path goes: the CPU's model and feature
flags (Linux /proc/cpuinfo), the cores this process may use, the accelerator."""
from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

# The flags that decide which kernels a CPU has (vector width, bf16/fp16 matrix units).
KERNEL_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile",
                "amx_int8", "asimd", "sve")


def _cpuinfo_lines() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def cpu_flags() -> set[str]:
    """The CPU feature flags from /proc/cpuinfo (empty where it does not exist)."""
    for line in _cpuinfo_lines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_model() -> str:
    for line in _cpuinfo_lines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def native_bf16() -> bool:
    """The CPU computes bf16 in hardware (AVX512-BF16 or AMX); elsewhere it is emulated, far
    slower than fp32."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def describe(device: torch.device) -> dict[str, object]:
    """The facts a measured choice of path depends on, for a cache key and for reports."""
    facts: dict[str, object] = {"cpu": cpu_model(),
                                "cpu_flags": sorted(cpu_flags() & set(KERNEL_FLAGS)),
                                "cores": usable_cores(), "threads": torch.get_num_threads(),
                                "torch": torch.__version__, "device": device.type}
    if device.type == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(device)
    return facts
