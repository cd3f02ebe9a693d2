"""The inference path decision, made once per (machine, weights, size, request) and shared.

A decision names the path each operation runs (encode: the encoder's, decode: the decoder's;
reconstruct runs the encoder's path then the decoder's, so /encode then /decode gives the same
bits as /reconstruct), the per-layer Winograd kernel choices those paths measured, and the
accuracy each path showed on the served weights. It is a JSON file in the cache directory
(RADIODIFF_CACHE_DIR, else ~/.cache/radiodiff-vae): the first process to need it measures under
a lock, every other worker, replica and job on the machine reads it, so two processes serving
one model compute with the same kernels and return identical bytes. A container keeps it on a
volume or bakes it into the image.

Requests: 'auto' measures every candidate (runtime/autotune.py) and takes, per operation, the
fastest accurate one; 'default' is the device's built-in path; any other name pins that path.
Every path other than plain fp32 must pass the accuracy gate (>= 50 dB against fp32 for the
posterior mean, its logvar and the decoded maps, on every probe map at the served size, with the
served weights) or is refused, unless the caller allows inaccurate paths explicitly.
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
                       measure, options_for, reference_outputs)
from .fast_layers import WinogradPlan, apply_winograd_plan
from .inference import InferenceModel, InferenceOptions, default_options, prepare_for_inference

logger = logging.getLogger(__name__)
CACHE_ENV = "RADIODIFF_CACHE_DIR"
VERSION = 2  # bump when a decision's content changes meaning
OPERATIONS = ("encode", "decode")  # reconstruct = the encoder's path, then the decoder's


class PathRefused(ValueError):
    """A pinned path failed the accuracy gate on the served weights."""


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
    """'auto' stays; 'default' -> the device's built-in path's name; a name is checked and put
    in canonical order ('fused_attention+fp32' -> 'fp32+fused_attention')."""
    if request == "auto":
        return request
    options = default_options(device) if request == "default" else \
        InferenceOptions(**options_for(request))
    return options.describe()


def decision_key(model: AutoencoderKL, device: torch.device, size: tuple[int, int],
                 request: str) -> dict[str, Any]:
    return {"version": VERSION, **machine.describe(device), "weights_sha256": weights_sha256(model),
            "model": {"ddconfig": asdict(model.ddconfig), "embed_dim": model.embed_dim},
            "size": list(size), "request": request,
            "candidates": candidates(device) if request == "auto" else None}


def decide(model: AutoencoderKL, device: str | torch.device, size: tuple[int, int],
           request: str = "auto", allow_inaccurate: bool = False, budget_s: float = 60.0,
           calls: int = 3, use_file: bool = True) -> Decision:
    """The recorded decision for serving `model` at `size` on `device` (see the module): read
    from its file, or measured and written under the file's lock. Raises PathRefused for a
    pinned path below the accuracy gate unless `allow_inaccurate`."""
    device = torch.device(device)
    name = resolve_request(request, device)
    if name == REFERENCE:  # plain fp32 is the reference: nothing to measure or to share
        row = Measured(REFERENCE, accurate=True, note="the reference")
        return Decision(request, dict.fromkeys(OPERATIONS, REFERENCE), {REFERENCE: row},
                        allow_inaccurate=allow_inaccurate)
    key = decision_key(model, device, size, name)
    with _locked(key) if use_file else contextlib.nullcontext():
        decision = _read(key) if use_file else None
        if decision is None:
            decision = _measure(model, device, size, name, key, budget_s, calls)
            if use_file:
                _write(decision)
    decision.request, decision.allow_inaccurate = request, allow_inaccurate
    _gate(decision)
    logger.info("inference path: encode %s, decode %s (%s)", decision.paths["encode"],
                decision.paths["decode"], f"read from {decision.file}" if decision.read
                else f"measured in {decision.seconds:.1f} s")
    return decision


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

