"""Choosing the inference path by measurement, on this machine, for this model and resolution.

`autotune(model, device, size)` times every candidate path (runtime/inference.py options,
named like 'winograd+matmul_1x1+fused_attention+reuse_memory') for a few calls of encode and
of decode at the served resolution, checks each against the plain fp32 network on synthetic
radio maps, and picks per operation the fastest whose output stays >= 50 dB PSNR from fp32
(encode: the posterior mean, over its range; decode: the maps; reconstruct: both), since an
encoder can stay accurate in bf16 where its decoder does not. Which path wins is a fact of the machine
(an AVX2-only EPYC, an AMX-BF16 Xeon and a GPU each pick differently), so it is never a
constant in code: the choice and its table are cached in the user cache directory, keyed by the
CPU model and kernel flags, usable cores and threads, torch version, device, model config and
resolution, and a later start with the same key reads it instead of measuring.

Start-up cost: each candidate takes one warm-up call and `calls` timed calls per operation;
candidates are measured in order until `budget_s` seconds have passed, and those left are
listed as not measured. On a CPU, the tiny test model at 64x64 takes about a second in all;
the full first_radio network at 320x320 several seconds per candidate.
"""
from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from model.autoencoder import AutoencoderKL
from model.metrics import psnr

from . import machine
from .fast_layers import median_seconds, winograd_available
from .inference import InferenceModel, InferenceOptions, prepare_for_inference
from .malloc import glibc, malloc_reuse

logger = logging.getLogger(__name__)
ACCURATE_DB = 50.0
MAX_DB = 200.0  # reported for outputs identical to the reference's
REFERENCE = "fp32"  # the plain network, every path's accuracy reference
CACHE_ENV = "RADIODIFF_CACHE_DIR"
CACHE_VERSION = 1  # bump when the measurement changes meaning
PROBE_MAPS = 2


def options_for(name: str) -> dict[str, object]:
    """A path name -> InferenceOptions fields, every other option off: 'fp32' is the plain
    network, 'bf16+channels_last' = {'precision': 'bf16', 'channels_last': True, ...}."""
    options: dict[str, object] = {f: False for f in InferenceOptions.__dataclass_fields__}
    options["precision"] = "fp32"
    for part in name.split("+"):
        if part in ("fp32", "bf16", "fp16"):
            options["precision"] = part
        elif part in options:
            options[part] = True
        else:
            raise ValueError(f"unknown path part {part!r} in {name!r}; expected fp32, bf16, "
                             f"fp16 or one of {sorted(set(options) - {'precision'})}")
    return options


def timing_dependent(name: str) -> bool:
    """Whether the path's output depends on timing: Winograd races NNPACK against oneDNN per
    layer and size (runtime/fast_layers.py), and the two round differently, so two processes
    may write different bits. A dataset job must not depend on that."""
    return bool(options_for(name)["winograd"])


def candidates(device: torch.device) -> list[str]:
    """The paths worth measuring on `device`, the likeliest winners first (a spent budget cuts
    the tail), the plain network last."""
    if device.type == "cuda":
        return ["fp16+channels_last+fused_attention", "bf16+channels_last+fused_attention",
                "fp32+channels_last+fused_attention", REFERENCE]
    reuse = "+reuse_memory" if glibc() is not None else ""
    names = []
    if machine.native_bf16():  # emulated bf16 is far slower than fp32: never a candidate
        names += [f"bf16+channels_last+fused_attention{reuse}", f"bf16+fused_attention{reuse}",
                  f"onednn_bf16+channels_last+fused_attention{reuse}"]
    if winograd_available():
        names.append(f"winograd+matmul_1x1+fused_attention{reuse}")
    names += [f"matmul_1x1+fused_attention{reuse}", f"channels_last+fused_attention{reuse}",
              REFERENCE]
    return names


@dataclass
class Measured:
    path: str
    encode_ms: Optional[float] = None  # median per call of one map
    decode_ms: Optional[float] = None
    encode_psnr_db: Optional[float] = None  # against the plain fp32 network
    decode_psnr_db: Optional[float] = None
    accurate: bool = False  # for encode and decode alike
    note: str = ""

    def ms(self, op: str) -> Optional[float]:
        """Milliseconds per map of `op` (reconstruct: encode + decode); None if unmeasured."""
        times = {"encode": [self.encode_ms], "decode": [self.decode_ms],
                 "reconstruct": [self.encode_ms, self.decode_ms]}[op]
        return None if None in times else sum(times)

    def accurate_for(self, op: str) -> bool:
        if self.path == REFERENCE:
            return True
        dbs = {"encode": [self.encode_psnr_db], "decode": [self.decode_psnr_db],
               "reconstruct": [self.encode_psnr_db, self.decode_psnr_db]}[op]
        return all(db is not None and db >= ACCURATE_DB for db in dbs)


OPS = ("encode", "decode", "reconstruct")


@dataclass
class Choice:
    """The measured table, and per operation the fastest path accurate for it: an encoder
    can stay accurate in bf16 where the decoder does not."""
    table: list[Measured]
    key: dict[str, Any]
    seconds: float = 0.0  # spent measuring (0 when read from the cache)
    cached: Optional[str] = None  # the cache file read, if any
    measured_on: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S"))

    def path_for(self, op: str = "reconstruct", reproducible: bool = False) -> str:
        """The fastest path accurate for `op` (encode, decode, or reconstruct: both);
        `reproducible`: only paths whose kernels do not depend on timing (timing_dependent)."""
        fit = [m for m in self.table if m.ms(op) is not None and m.accurate_for(op)
               and not (reproducible and timing_dependent(m.path))]
        return min(fit, key=lambda m: m.ms(op)).path if fit else REFERENCE

    def options(self, op: str = "reconstruct") -> dict[str, object]:
        return options_for(self.path_for(op))

    def report(self) -> dict[str, Any]:
        """For /info and logs."""
        return {"paths": {op: self.path_for(op) for op in OPS}, "from_cache": self.cached,
                "seconds": round(self.seconds, 2), "measured_on": self.measured_on,
                "accurate_db": ACCURATE_DB, "table": [asdict(m) for m in self.table]}


def probe_maps(count: int, size: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """[count, 1, H, W] radio-map-like probes in the network's [-1, 1]: log-distance path gain
    from a transmitter, dark rectangular buildings (0), as the synthetic data has them."""
    gen = torch.Generator().manual_seed(seed)
    h, w = size
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32),
                            torch.arange(w, dtype=torch.float32), indexing="ij")
    maps = []
    for _ in range(count):
        ty, tx = (torch.rand(2, generator=gen) * torch.tensor([h, w])).tolist()
        distance = ((ys - ty) ** 2 + (xs - tx) ** 2).sqrt() + 1.0
        gain = (1.0 - torch.log10(distance) / torch.log10(torch.tensor(float(h + w)))).clamp(0, 1)
        for _ in range(max(1, h * w // 512)):
            y0, x0 = (torch.rand(2, generator=gen) * torch.tensor([h, w])).long().tolist()
            dy, dx = (torch.randint(4, max(5, h // 8), (2,), generator=gen)).tolist()
            gain[y0:y0 + dy, x0:x0 + dx] = 0.0
        maps.append(gain * 2.0 - 1.0)
    return torch.stack(maps)[:, None]


def cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV) or os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    base = Path(root).expanduser()
    return (base if os.environ.get(CACHE_ENV) else base / "radiodiff-vae") / "autotune"


def cache_key(model: AutoencoderKL, device: torch.device, size: tuple[int, int]
              ) -> dict[str, Any]:
    return {"version": CACHE_VERSION, **machine.describe(device),
            "model": {"ddconfig": asdict(model.ddconfig), "embed_dim": model.embed_dim},
            "size": list(size), "candidates": candidates(device)}


def _cache_file(key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    return cache_dir() / f"{digest[:20]}.json"


def _read_cache(key: dict[str, Any]) -> Optional[Choice]:
    path = _cache_file(key)
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if doc.get("key") != json.loads(json.dumps(key, default=str)):
        return None  # a hash collision or a hand-edited file: measure again
    table = [Measured(**row) for row in doc["table"]]
    return Choice(table, key, cached=str(path), measured_on=doc["measured_on"])


def _write_cache(choice: Choice) -> None:
    path = _cache_file(choice.key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"key": choice.key,
                                   "paths": {op: choice.path_for(op) for op in OPS},
                                   "measured_on": choice.measured_on,
                                   "table": [asdict(m) for m in choice.table]},
                                  indent=2, default=str) + "\n")
        tmp.replace(path)
    except OSError as err:  # a read-only home: the choice still holds for this process
        logger.warning("autotune: cannot cache the choice in %s: %s", path.parent, err)


def _measure(name: str, model: AutoencoderKL, device: torch.device, probes: torch.Tensor,
             ref_mean: torch.Tensor, ref_maps: torch.Tensor, calls: int) -> Measured:
    options = options_for(name)
    engine = prepare_for_inference(copy.deepcopy(model), device, **options)
    if glibc() is not None:
        malloc_reuse(bool(options["reuse_memory"]))  # process-wide: as this path would run
    latents = ref_mean.to(device)
    one_map, one_latent = probes[:1].to(device), latents[:1]
    result = Measured(name)
    result.encode_ms = 1000.0 * median_seconds(lambda: engine.encode(one_map).mean.cpu(), calls)
    result.decode_ms = 1000.0 * median_seconds(lambda: engine.decode(one_latent).cpu(), calls)
    if name == REFERENCE:
        result.accurate, result.note = True, "the reference"
        return result
    mean = engine.encode(probes.to(device)).mean.cpu()
    maps = engine.decode(latents).cpu()
    span = float(ref_mean.max() - ref_mean.min()) or 1.0
    # identical outputs give inf dB, which JSON cannot hold: capped
    result.encode_psnr_db = min(float(psnr(mean, ref_mean, data_range=span).min()), MAX_DB)
    result.decode_psnr_db = min(float(psnr(maps, ref_maps, data_range=2.0).min()), MAX_DB)
    result.accurate = min(result.encode_psnr_db, result.decode_psnr_db) >= ACCURATE_DB
    return result


@contextlib.contextmanager
def _exclusive(key: dict[str, Any]):
    """Hold the key's lock file: processes starting together (one server worker per endpoint)
    measure one at a time, so the first measures on quiet cores and the others read its
    choice."""
    path = _cache_file(key).with_suffix(".lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "w")
    except OSError:
        yield  # an unwritable cache: no lock and no cache
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def autotune(model: AutoencoderKL, device: str | torch.device, size: tuple[int, int],
             calls: int = 3, budget_s: float = 60.0, use_cache: bool = True) -> Choice:
    """The fastest accurate path for `model` at `size` on `device` (cached; see the module)."""
    device = torch.device(device)
    key = cache_key(model, device, size)
    if not use_cache:
        return _tune(model, device, size, key, calls, budget_s)
    with _exclusive(key):
        cached = _read_cache(key)
        if cached is not None:
            logger.info("autotune: %s (cached %s in %s)", cached.report()["paths"],
                        cached.measured_on, cached.cached)
            return cached
        choice = _tune(model, device, size, key, calls, budget_s)
        _write_cache(choice)
        return choice


def _tune(model: AutoencoderKL, device: torch.device, size: tuple[int, int],
          key: dict[str, Any], calls: int, budget_s: float) -> Choice:
    start = time.monotonic()
    probes = probe_maps(PROBE_MAPS, size)
    reference = InferenceModel(copy.deepcopy(model).eval().to(device), device,
                               InferenceOptions())
    ref_mean = reference.encode(probes.to(device)).mean.cpu()
    ref_maps = reference.decode(ref_mean.to(device)).cpu()
    table = []
    for name in candidates(device):
        if time.monotonic() - start > budget_s:
            table.append(Measured(name, note=f"not measured: the {budget_s:g} s budget was spent"))
            continue
        try:
            table.append(_measure(name, model, device, probes, ref_mean, ref_maps, calls))
        except (RuntimeError, ValueError) as err:  # a path this build cannot run
            table.append(Measured(name, note=f"failed: {err}"))
    choice = Choice(table, key, seconds=time.monotonic() - start)
    for row in table:
        logger.info("autotune: %-52s encode %8s ms %7s dB  decode %8s ms %7s dB  %s", row.path,
                    _fmt(row.encode_ms), _fmt(row.encode_psnr_db), _fmt(row.decode_ms),
                    _fmt(row.decode_psnr_db), row.note)
    logger.info("autotune: chose %s in %.1f s", choice.report()["paths"], choice.seconds)
    return choice


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.1f}"
