"""Choosing the inference path by measurement, on this machine, for this model and resolution.

`autotune(model, device, size)` times every candidate path (runtime/inference.py options,
named like 'fp32+winograd+matmul_1x1+reuse_memory') for a few calls of encode and
of decode at the served resolution, checks each against the plain fp32 network on synthetic
radio maps, and picks per operation the fastest whose output stays >= 50 dB PSNR from fp32
(encode: the posterior mean and logvar, each over its range; decode: the maps; reconstruct:
both), since an encoder can stay accurate in bf16 where its decoder does not. Which path wins is
a fact of the machine (an AVX2-only EPYC, an AMX-BF16 Xeon and a GPU each pick differently), so
it is never a constant in code: runtime/decision.py records the choice, with the per-layer
Winograd kernel choices each path measured, in one file per (machine, weights, size) that every
process serving the model loads.

Start-up cost: each candidate takes one warm-up call and `calls` timed calls per operation;
candidates are measured in order until `budget_s` seconds have passed, and those left are
listed as not measured. On a CPU, the tiny test model at 64x64 takes about a second in all;
the full first_radio network at 320x320 several seconds per candidate.
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch

from model.autoencoder import AutoencoderKL
from model.metrics import psnr

from . import machine
from .fast_layers import (WinogradPlan, measure_kernels, median_seconds, winograd_available,
                          winograd_plan)
from .inference import InferenceModel, InferenceOptions, prepare_for_inference
from .malloc import glibc, malloc_reuse

logger = logging.getLogger(__name__)
ACCURATE_DB = 50.0
MAX_DB = 200.0  # reported for outputs identical to the reference's
REFERENCE = "fp32"  # the plain network, every path's accuracy reference
PROBE_MAPS = 4  # radio-map-like probes at the served size, on the served weights


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
    """Whether the path's kernels are chosen by timing: Winograd's per-layer NNPACK-or-oneDNN
    choice is measured per machine (recorded once per machine by runtime/decision.py), and the
    two round differently, so two machines may write different bits. A dataset job sharded over
    machines must not depend on that."""
    return bool(options_for(name)["winograd"])


def path_precision(name: str) -> str:
    """The arithmetic path `name` computes its convolutions in: its autocast precision, or
    'bf16' for onednn_bf16 (fp32 tensors, bf16 multiplications)."""
    options = options_for(name)
    return "bf16" if options["onednn_bf16"] else str(options["precision"])


def path_name(**options: object) -> str:
    """The canonical name of the path with `options` on, every other off: the name
    InferenceOptions.describe() gives it, so a name printed here pins the same decision file."""
    return InferenceOptions(**options).describe()


def candidates(device: torch.device) -> list[str]:
    """The paths worth measuring on `device`, the likeliest winners first (a spent budget cuts
    the tail), the plain network last; each by its canonical name (path_name)."""
    if device.type == "cuda":
        return [path_name(precision="fp16", channels_last=True),
                path_name(precision="bf16", channels_last=True),
                path_name(channels_last=True), REFERENCE]
    reuse = glibc() is not None
    names = []
    if machine.native_bf16():  # emulated bf16 is far slower than fp32: never a candidate
        names += [path_name(precision="bf16", channels_last=True, reuse_memory=reuse),
                  path_name(precision="bf16", reuse_memory=reuse),
                  path_name(onednn_bf16=True, channels_last=True, reuse_memory=reuse)]
    if winograd_available():
        names.append(path_name(winograd=True, matmul_1x1=True, reuse_memory=reuse))
    names += [path_name(matmul_1x1=True, reuse_memory=reuse),
              path_name(channels_last=True, reuse_memory=reuse), REFERENCE]
    return names


@dataclass
class Measured:
    path: str
    encode_ms: Optional[float] = None  # median per call of one map
    decode_ms: Optional[float] = None
    encode_psnr_db: Optional[float] = None  # against the plain fp32 network: the worse of
    decode_psnr_db: Optional[float] = None    # mean and logvar for encode
    accurate: bool = False  # for encode and decode alike
    note: str = ""
    winograd_plan: Optional[WinogradPlan] = None  # the per-layer kernels measured (winograd)

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

    def row(self, path: str) -> Optional[Measured]:
        return next((m for m in self.table if m.path == path), None)

    def options(self, op: str = "reconstruct") -> dict[str, object]:
        return options_for(self.path_for(op))

    def report(self) -> dict[str, Any]:
        """For /info and logs."""
        return {"paths": {op: self.path_for(op) for op in OPS}, "from_cache": self.cached,
                "seconds": round(self.seconds, 2), "measured_on": self.measured_on,
                "accurate_db": ACCURATE_DB,
                "table": [{k: v for k, v in asdict(m).items() if k != "winograd_plan"}
                          for m in self.table]}


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


@dataclass
class Reference:
    """The plain fp32 network's outputs on the probe maps: every path's accuracy reference."""
    probes: torch.Tensor
    mean: torch.Tensor
    logvar: torch.Tensor
    maps: torch.Tensor


def reference_outputs(model: AutoencoderKL, device: torch.device, size: tuple[int, int]
                      ) -> Reference:
    probes = probe_maps(PROBE_MAPS, size)
    plain = InferenceModel(copy.deepcopy(model).eval().to(device), device, InferenceOptions())
    posterior = plain.encode(probes.to(device))
    mean, logvar = posterior.mean.cpu(), posterior.logvar.cpu()
    return Reference(probes, mean, logvar, plain.decode(mean.to(device)).cpu())


def _db(out: torch.Tensor, ref: torch.Tensor) -> float:
    """The worst probe's PSNR over the reference's range (identical outputs: MAX_DB, since
    JSON cannot hold inf)."""
    span = float(ref.max() - ref.min()) or 1.0
    return min(float(psnr(out, ref, data_range=span).min()), MAX_DB)


def measure(name: str, model: AutoencoderKL, device: torch.device, ref: Reference,
            calls: int) -> Measured:
    """Time path `name` on one map (encode, decode) and check it against `ref` on every probe;
    a Winograd path measures its per-layer kernels on its first call and keeps them."""
    options = options_for(name)
    engine = prepare_for_inference(copy.deepcopy(model), device, **options)
    if glibc() is not None:
        malloc_reuse(bool(options["reuse_memory"]))  # process-wide: as this path would run
    latents = ref.mean.to(device)
    one_map, one_latent = ref.probes[:1].to(device), latents[:1]
    result = Measured(name)
    with measure_kernels():  # the untimed warm-up call of each picks the layers' kernels
        on_cpu = device.type == "cpu"
        result.encode_ms = 1000.0 * median_seconds(lambda: engine.encode(one_map).mean.cpu(),
                                                   calls, on_cpu)
        result.decode_ms = 1000.0 * median_seconds(lambda: engine.decode(one_latent).cpu(),
                                                   calls, on_cpu)
    if options["winograd"]:
        result.winograd_plan = winograd_plan(engine.model)
    if name == REFERENCE:
        result.accurate, result.note = True, "the reference"
        return result
    posterior = engine.encode(ref.probes.to(device))
    maps = engine.decode(latents).cpu()
    result.encode_psnr_db = min(_db(posterior.mean.cpu(), ref.mean),
                                _db(posterior.logvar.cpu(), ref.logvar))
    result.decode_psnr_db = min(_db(maps, ref.maps), MAX_DB)
    result.accurate = min(result.encode_psnr_db, result.decode_psnr_db) >= ACCURATE_DB
    return result


def autotune(model: AutoencoderKL, device: str | torch.device, size: tuple[int, int],
             calls: int = 3, budget_s: float = 60.0) -> Choice:
    """Measure every candidate path for `model` at `size` on `device` (see the module); to
    record and share the result, use runtime/decision.py."""
    device = torch.device(device)
    start = time.monotonic()
    ref = reference_outputs(model, device, size)
    table, names = [], candidates(device)
    logger.info("autotune: measuring %d paths at %dx%d on %s (budget %g s), one line each",
                len(names), size[0], size[1], device, budget_s)
    for i, name in enumerate(names, 1):
        if time.monotonic() - start > budget_s:
            row = Measured(name, note=f"not measured: the {budget_s:g} s budget was spent")
        else:
            try:
                row = measure(name, model, device, ref, calls)
            except (RuntimeError, ValueError) as err:  # a path this build cannot run
                row = Measured(name, note=f"failed: {err}")
        table.append(row)
        log_row(row, f"{i}/{len(names)} {time.monotonic() - start:4.0f} s")
    choice = Choice(table, {}, seconds=time.monotonic() - start)
    paths = choice.report()["paths"]
    logger.info("autotune: chose %s in %.1f s",
                ", ".join(f"{op} {path}" for op, path in paths.items()), choice.seconds)
    return choice


def log_row(row: Measured, position: str = "") -> None:
    """One measured path as a table row (`position`: e.g. '3/7   12 s', the progress)."""
    logger.info("autotune: %s%-52s encode %8s ms %7s dB  decode %8s ms %7s dB  %s",
                f"{position}  " if position else "", row.path, _fmt(row.encode_ms),
                _fmt(row.encode_psnr_db), _fmt(row.decode_ms), _fmt(row.decode_psnr_db),
                row.note)


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.1f}"
