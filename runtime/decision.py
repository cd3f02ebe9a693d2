"""The inference path decision, made once per (machine, weights, size, request) and shared:
`choose(model, device, PathRequest(size, ...)) -> Decision` is the one place a path is chosen.
The server's torch backend, the latents job and the benchmarks call it; no other module holds a
policy of its own (tests/test_decision.py checks).

A decision names the path each operation runs (encode: the encoder's, decode: the decoder's;
reconstruct runs the encoder's path then the decoder's, so /encode then /decode gives the same
bits as /reconstruct), the per-layer Winograd kernel choices those paths measured, and the
accuracy each path showed on the served weights. It is a JSON file in the cache directory
(RADIODIFF_CACHE_DIR, else ~/.cache/radiodiff-vae): the first process to need it measures under
a lock, every other worker, replica and job on the machine reads it, so two processes serving
one model compute with the same kernels and return identical bytes. A container keeps it on a
volume or bakes it into the image.

Requests (`PathRequest`):
- path 'auto' measures every candidate (runtime/autotune.py) and takes, per operation, the
  fastest accurate one. Which path is fastest is a fact of the machine: it comes only from this
  measurement, recorded in the file, never from a constant in code.
- path 'default' is the neutral baseline: the plain fp32 network, eager, contiguous NCHW, no
  machine-tuned toggle (the same on every machine; nothing to measure or record).
- any other path name pins that path ('bf16+channels_last').
- precision 'fp32' / 'bf16' / 'fp16' (with path 'auto'): the fastest measured path computing in
  that precision (bf16 and fp16 need a GPU, or for bf16 a CPU with native bf16).
- reproducible: no path whose kernels are chosen by timing (Winograd), for jobs whose bytes
  must not depend on which process timed what (the latents job).
Every path other than plain fp32 must pass the accuracy gate (>= 50 dB against fp32 for the
posterior mean, its logvar and the decoded maps, on every probe map at the served size, with the
served weights) or is refused, unless the caller allows inaccurate paths explicitly.

`decide(model, device, size, name)` is the primitive under choose() for one resolved name;
callers outside runtime/ use choose().
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
from typing import Any, Iterator, Optional

import torch

from model.autoencoder import AutoencoderKL
from model.manifest import write_json_atomic

from . import machine
from .autotune import (ACCURATE_DB, REFERENCE, Choice, Measured, autotune, candidates, log_row,
                       measure, options_for, path_precision, reference_outputs,
                       timing_dependent)
from .fast_layers import WinogradPlan, apply_winograd_plan
from .inference import PRECISIONS, InferenceModel, InferenceOptions, prepare_for_inference

logger = logging.getLogger(__name__)
CACHE_ENV = "RADIODIFF_CACHE_DIR"
VERSION = 4  # bump when a decision's content changes meaning (3: attention always fused; 4: timed
# by CPU time on a CPU)
OPERATIONS = ("encode", "decode")  # reconstruct = the encoder's path, then the decoder's


class PathRefused(ValueError):
    """A pinned path failed the accuracy gate on the served weights."""


class PathRequestError(ValueError):
    """A request that names no valid path here (an unknown part, a contradiction, a precision
    this device cannot run); the message names the command-line option (--path, --precision),
    as the server and the latents job spell it."""


@dataclass(frozen=True)
class PathRequest:
    """What a caller asks for; choose() turns it into a Decision (see the module)."""
    size: tuple[int, int]  # the served map size (H, W): what the paths are measured at
    path: str = "auto"  # 'auto' (measured), 'default' (plain fp32), or a path name
    precision: str = "auto"  # 'auto', or with path 'auto': 'fp32', 'bf16', 'fp16'
    allow_inaccurate: bool = False  # serve a path below the accuracy gate
    reproducible: bool = False  # never a path whose kernels are chosen by timing (Winograd)
    budget_s: float = 60.0  # the most seconds 'auto' spends measuring when nothing is recorded
    calls: int = 3  # timed calls per candidate and operation
    record: bool = True  # read and write the decision file (False: measure afresh, keep none)

    def name(self, device: str | torch.device) -> Optional[str]:
        """The path this request pins, checked ('default' -> 'fp32'; a name as given: the
        decision file is keyed by its canonical form); None where it is measured (path 'auto').
        Raises PathRequestError for a request that cannot be served on `device`."""
        device = torch.device(device)
        if self.precision != "auto":
            if self.precision not in PRECISIONS:
                raise PathRequestError(f"--precision {self.precision}: expected auto or one of "
                                       f"{list(PRECISIONS)}")
            if self.path != "auto":
                raise PathRequestError(f"--path {self.path} and --precision {self.precision} "
                                       f"both choose the precision: give one of them")
            native = self.precision == "bf16" and machine.native_bf16()
            if device.type == "cpu" and self.precision != "fp32" and not native:
                raise PathRequestError(
                    f"--precision {self.precision} needs a CUDA device (on this CPU it is "
                    f"emulated, far slower than fp32"
                    + ("; bf16 also runs on CPUs with AVX512-BF16 or AMX)"
                       if self.precision == "bf16" else ")"))
        if self.path == "auto":
            return None
        if self.path == "default":
            return REFERENCE
        try:
            options_for(self.path)
        except ValueError as err:
            raise PathRequestError(f"--path {self.path}: {err}") from None
        if self.reproducible and timing_dependent(self.path):
            raise PathRequestError(f"--path {self.path}: Winograd picks its kernel per layer by "
                                   f"timing, so outputs would depend on timing; name a path "
                                   f"without winograd")
        return self.path

    def describe(self) -> str:
        """The request as /info and the logs show it: 'auto', 'default', a path name,
        'precision bf16'; ', reproducible' when asked."""
        text = self.path if self.precision == "auto" else f"precision {self.precision}"
        return text + (", reproducible" if self.reproducible else "")


@dataclass
class Decision:
    """Which path each operation runs, and everything needed to run it identically elsewhere."""
    request: str
    paths: dict[str, str]  # "encode" / "decode" -> path name
    rows: dict[str, Measured]  # path name -> its timing, accuracy and Winograd plan
    key: dict[str, Any] = field(default_factory=dict)
    table: Optional[list[Measured]] = None  # every candidate, for 'auto'
    seconds: float = 0.0  # spent measuring (0 when read from the file)
    file: Optional[str] = None  # the file it was read from or written to
    read: bool = False  # read from the file (another process measured)
    allow_inaccurate: bool = False
    measured_on: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S"))

    def path(self, op: str) -> str:
        return self.paths[op]

    def plan(self, path: str) -> Optional[WinogradPlan]:
        row = self.rows.get(path)
        return row.winograd_plan if row else None

    def table_choice(self) -> Choice:
        """The measured candidates as an autotune Choice (empty for a pinned path)."""
        return Choice(self.table or [], self.key)

    def prepare(self, model: AutoencoderKL, device: str | torch.device, op: str
                ) -> InferenceModel:
        """`model` (in place) on the path `op` runs, with its recorded kernel choices."""
        path = self.paths[op]
        engine = prepare_for_inference(model, device, **options_for(path))
        plan = self.plan(path)
        if plan is not None:
            apply_winograd_plan(engine.model, plan)
        return engine

    def report(self) -> dict[str, Any]:
        """For /info and logs: what each operation computes in, and how that was decided."""
        paths = {**self.paths, "reconstruct": f"{self.paths['encode']} -> {self.paths['decode']}"}
        return {"request": self.request, "paths": paths, "file": self.file,
                "read_from_file": self.read, "seconds": round(self.seconds, 2),
                "measured_on": self.measured_on, "accurate_db": ACCURATE_DB,
                "allow_inaccurate": self.allow_inaccurate,
                "accuracy": {p: {"encode_db": r.encode_psnr_db, "decode_db": r.decode_psnr_db,
                                 "accurate": r.accurate} for p, r in self.rows.items()},
                "table": None if self.table is None else [_row_report(m) for m in self.table]}


def _row_report(row: Measured) -> dict[str, Any]:
    return {k: v for k, v in asdict(row).items() if k != "winograd_plan"}


def cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV) or os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    base = Path(root).expanduser()
    return (base if os.environ.get(CACHE_ENV) else base / "radiodiff-vae") / "decisions"


def weights_sha256(model: AutoencoderKL) -> str:
    """SHA-256 of the network's weights as served (names, dtypes, shapes, bytes): what the
    accuracy of a reduced precision depends on, whichever file or EMA choice they came from."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def resolve_request(request: str, device: torch.device) -> str:
    """'auto' stays; 'default' -> plain fp32 (the reference, the same on every machine); a name
    is checked and put in canonical order ('channels_last+bf16' -> 'bf16+channels_last'), the
    order autotune's candidate names are in."""
    if request == "auto":
        return request
    if request == "default":
        return REFERENCE
    return InferenceOptions(**options_for(request)).describe()


def decision_key(model: AutoencoderKL, device: torch.device, size: tuple[int, int],
                 request: str) -> dict[str, Any]:
    return {"version": VERSION, **machine.describe(device), "weights_sha256": weights_sha256(model),
            "model": {"ddconfig": asdict(model.ddconfig), "embed_dim": model.embed_dim},
            "size": list(size), "request": request,
            "candidates": candidates(device) if request == "auto" else None}


def choose(model: AutoencoderKL, device: str | torch.device, request: PathRequest) -> Decision:
    """The path `model` runs on `device` for `request` (see the module): the one entry every
    caller uses. Raises PathRequestError for a request that cannot be served here, PathRefused
    for a path below the accuracy gate unless `request.allow_inaccurate`."""
    device = torch.device(device)
    name = request.name(device)
    size = tuple(request.size)
    if name is not None:
        decision = _recorded(model, device, size, resolve_request(name, device), request)
    else:
        decision = _recorded(model, device, size, "auto", request)
        if request.precision != "auto" or request.reproducible:
            decision = _narrowed(decision, request) or _recorded(
                model, device, size, resolve_request(request.precision, device), request)
    decision.request, decision.allow_inaccurate = request.describe(), request.allow_inaccurate
    _gate(decision)
    _log(decision)
    return decision


def decide(model: AutoencoderKL, device: str | torch.device, size: tuple[int, int],
           request: str = "auto", allow_inaccurate: bool = False, budget_s: float = 60.0,
           calls: int = 3, use_file: bool = True) -> Decision:
    """The recorded decision for one request name ('auto', 'default' or a path name) at `size`
    on `device`: read from its file, or measured and written under the file's lock. Raises
    PathRefused for a pinned path below the accuracy gate unless `allow_inaccurate`. The
    primitive under choose(), which callers use."""
    device = torch.device(device)
    settings = PathRequest(tuple(size), allow_inaccurate=allow_inaccurate, budget_s=budget_s,
                           calls=calls, record=use_file)
    decision = _recorded(model, device, tuple(size), resolve_request(request, device), settings)
    decision.request, decision.allow_inaccurate = request, allow_inaccurate
    _gate(decision)
    _log(decision)
    return decision


def _recorded(model: AutoencoderKL, device: torch.device, size: tuple[int, int], name: str,
              request: PathRequest) -> Decision:
    """The decision for resolved name `name` ('auto' or a canonical path name): read from its
    file, or measured and written under the file's lock (neither with `request.record` off);
    plain fp32 is the reference, with nothing to measure or to share."""
    if name == REFERENCE:
        row = Measured(REFERENCE, accurate=True, note="the reference")
        return Decision(name, dict.fromkeys(OPERATIONS, REFERENCE), {REFERENCE: row})
    key = decision_key(model, device, size, name)
    with _locked(key) if request.record else contextlib.nullcontext():
        decision = _read(key) if request.record else None
        if decision is None:
            decision = _measure(model, device, size, name, key, request.budget_s, request.calls)
            if request.record:
                _write(decision)
    return decision


def _narrowed(measured: Decision, request: PathRequest) -> Optional[Decision]:
    """`measured` ('auto') restricted to the paths `request` admits (its precision; no
    timing-dependent kernels when reproducible): per operation the fastest admitted path
    accurate for it, else (for the gate to refuse, or to serve when allowed) the fastest
    admitted one. None when no admitted path of a pinned bf16 / fp16 precision was measured
    (not a candidate here, or past the budget): the caller pins the plain path in it."""
    def admits(path: str) -> bool:
        return ((request.precision == "auto" or path_precision(path) == request.precision)
                and not (request.reproducible and timing_dependent(path)))

    table = measured.table or []
    paths = {}
    for op in OPERATIONS:
        timed = [m for m in table if admits(m.path) and m.ms(op) is not None]
        pool = [m for m in timed if m.accurate_for(op)] or timed
        if pool:
            paths[op] = min(pool, key=lambda m: m.ms(op)).path
        elif request.precision in ("auto", REFERENCE):
            paths[op] = REFERENCE  # always admitted: plain fp32, fixed kernels
        else:
            return None
    reference = Measured(REFERENCE, accurate=True, note="the reference")
    rows = {p: measured.rows.get(p) or next((m for m in table if m.path == p), reference)
            for p in set(paths.values())}
    return Decision(measured.request, paths, rows, measured.key, table=measured.table,
                    seconds=measured.seconds, file=measured.file, read=measured.read,
                    measured_on=measured.measured_on)


def _log(decision: Decision) -> None:
    logger.info("inference path (%s): encode %s, decode %s (%s)", decision.request,
                decision.paths["encode"], decision.paths["decode"],
                f"read from {decision.file}" if decision.read else
                "plain fp32: nothing measured" if decision.key == {} else
                f"measured in {decision.seconds:.1f} s")


def _measure(model: AutoencoderKL, device: torch.device, size: tuple[int, int], name: str,
             key: dict[str, Any], budget_s: float, calls: int) -> Decision:
    start = time.monotonic()
    if name == "auto":
        choice = autotune(model, device, size, calls, budget_s)
        paths = {op: choice.path_for(op) for op in OPERATIONS}
        rows = {p: choice.row(p) or Measured(p) for p in set(paths.values())}
        return Decision(name, paths, rows, key, table=choice.table, seconds=choice.seconds)
    row = measure(name, model, device, reference_outputs(model, device, size), calls=1)
    log_row(row)
    return Decision(name, dict.fromkeys(OPERATIONS, name), {name: row}, key,
                    seconds=time.monotonic() - start)


def _gate(decision: Decision) -> None:
    """Refuse a pinned path that is not accurate on the served weights (unless allowed)."""
    for op, path in decision.paths.items():
        row = decision.rows[path]
        if row.accurate_for(op) or decision.allow_inaccurate:
            continue
        raise PathRefused(
            f"path {path} is not accurate for {op} on these weights: encode "
            f"{row.encode_psnr_db} dB, decode {row.decode_psnr_db} dB against plain fp32 on "
            f"the probe maps, below the {ACCURATE_DB:g} dB gate; choose another path, "
            f"'auto', or allow it explicitly (server: --allow-inaccurate-path)")


def _file(key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    return cache_dir() / f"{digest[:24]}.json"


def _read(key: dict[str, Any]) -> Optional[Decision]:
    path = _file(key)
    try:
        doc = json.loads(path.read_text())
        if doc.get("key") != json.loads(json.dumps(key, default=str)):
            return None  # a hash collision or a hand-edited file: measure again
        rows = {p: Measured(**r) for p, r in doc["rows"].items()}
        table = None if doc["table"] is None else [Measured(**r) for r in doc["table"]]
        return Decision(doc["request"], doc["paths"], rows, key, table=table, file=str(path),
                        read=True, measured_on=doc["measured_on"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # absent, unreadable or from another version: measure again


def _write(decision: Decision) -> None:
    path = _file(decision.key)
    doc = {"key": json.loads(json.dumps(decision.key, default=str)), "request": decision.request,
           "paths": decision.paths, "measured_on": decision.measured_on,
           "seconds": decision.seconds, "rows": {p: asdict(r) for p, r in decision.rows.items()},
           "table": None if decision.table is None else [asdict(m) for m in decision.table]}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, doc)
        decision.file = str(path)
    except OSError as err:  # read-only: the decision holds for this process only
        logger.warning("inference path: cannot record the decision in %s: %s (other processes "
                       "will measure their own, and may compute other bits)", path.parent, err)


def _locked(key: dict[str, Any]) -> contextlib.AbstractContextManager:
    """Processes starting together (one server worker per endpoint, replicas) measure one at
    a time, so the first measures on quiet cores and the rest read."""
    path = _file(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        pass  # an unwritable cache: file_lock goes without
    return file_lock(path.with_suffix(".lock"))


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on `path` for the duration (without one where it cannot be
    opened: an unwritable cache then has no lock and no shared record either)."""
    try:
        handle = open(path, "w")
    except OSError:
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def engines(decision: Decision, model: AutoencoderKL, device: str | torch.device,
            ops: tuple[str, ...] = OPERATIONS) -> dict[str, InferenceModel]:
    """One InferenceModel per operation in `ops` (encode, decode), sharing one where both run
    the same path; `model` is used in place for the first."""
    distinct = list(dict.fromkeys(decision.paths[op] for op in ops))
    # preparing swaps layers in place: every path but the last gets its own copy
    models = [copy.deepcopy(model) for _ in distinct[:-1]] + [model]
    by_path = {path: decision.prepare(m, device, next(op for op in ops
                                                      if decision.paths[op] == path))
               for path, m in zip(distinct, models)}
    return {op: by_path[decision.paths[op]] for op in ops}

