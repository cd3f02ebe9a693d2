"""Export end to end: load the checkpoint, write the graphs, check parity, write the manifest;
and the reverse check of an existing export directory."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import onnx
import onnxruntime
import onnxscript
import torch

from model.checkpoint import resolve_checkpoint
from model.config import to_dict
from model.io import to_model
from model.loading import Loaded, load
from model.manifest import (FORMAT_VERSION, MANIFEST_NAME, check_source_checkpoint,
                            read_manifest, sha256_file, write_manifest)

from . import diffusers_format
from .onnx_export import DEFAULT_OPSET, export_graph, io_spec
from .ort_session import make_session
from .parity import ParityReport, check_parity, synthetic_radio_maps

FORMATS = ("onnx", "diffusers")
GRAPHS = ("encoder", "decoder")


class ParityError(RuntimeError):
    """Exported weights disagree with torch beyond the bound; carries the figures."""

    def __init__(self, what: str, figures: str):
        super().__init__(f"{what}\n{figures}")


@dataclass
class ExportOptions:
    """What `python -m export` was asked for (see its --help)."""
    ckpt: str
    out: str
    config: str | None = None
    opset: int = DEFAULT_OPSET
    fp16: bool = False
    check: bool = True
    exporter: str = "dynamo"
    formats: tuple[str, ...] = ("onnx",)
    use_ema: bool = True
    provider: str = "auto"


def source_checkpoint(source: Loaded) -> dict:
    """The manifest's `source_checkpoint`: which file, which weights of it."""
    return {"path": str(source.path.resolve()), "sha256": source.sha256, "step": source.step,
            "weights": source.weights}


def _tensors(spec: dict[str, list], names: list[str]) -> list[dict]:
    return [{"name": n, "dtype": "float32", "shape": spec[n]} for n in names]


def build_manifest(source: Loaded, opts: ExportOptions, graphs: dict[str, Path],
                   seconds: dict[str, float], parity: dict, providers: list[str]) -> dict:
    """The manifest.json contents (format version 1)."""
    ae, spec = source.model, io_spec(source.model)
    entries = {name: {"file": graphs[name].name, "sha256": sha256_file(graphs[name]),
                      "bytes": graphs[name].stat().st_size,
                      "inputs": _tensors(spec[name], list(spec[name])[:1]),
                      "outputs": _tensors(spec[name], list(spec[name])[1:])} for name in GRAPHS}
    return {
        "format_version": FORMAT_VERSION, **entries,
        "downsample_factor": ae.downsample_factor, "latent_channels": ae.embed_dim,
        "in_channels": ae.ddconfig.in_channels,
        "value_range": {"image": [-1, 1], "map": [0, 1]}, **source.scaling,
        "precision": "fp16" if opts.fp16 else "fp32", "opset": opts.opset,
        "exporter": opts.exporter, "export_seconds": seconds,
        "model_config": to_dict(source.config),
        "source_checkpoint": source_checkpoint(source),
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__,
                     "onnxruntime": onnxruntime.__version__,
                     "onnxscript": onnxscript.__version__},
        "parity": parity, "providers": providers,
    }


def _sessions(out: Path, provider: str) -> tuple:
    return tuple(make_session(out / f"{name}.onnx", provider) for name in GRAPHS)


def export_onnx(source: Loaded, opts: ExportOptions, log=print) -> dict:
    """Write encoder.onnx and decoder.onnx, check them, then (only on success) the manifest."""
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_NAME).unlink(missing_ok=True)  # no stale manifest may vouch for new graphs
    graphs, seconds = {}, {}
    for name in GRAPHS:
        start = time.perf_counter()
        graphs[name] = export_graph(source.model, name, out, opts.exporter, opts.opset, opts.fp16)
        seconds[name] = round(time.perf_counter() - start, 2)
        log(f"exported {graphs[name].name} ({graphs[name].stat().st_size / 1e6:.1f} MB) in "
            f"{seconds[name]:.1f} s ({opts.exporter}, opset {opts.opset}); onnx.checker passed")
    parity, providers = {"checked": False}, []
    if opts.check:
        encoder, decoder = _sessions(out, opts.provider)
        providers = encoder.get_providers()
        report = check_parity(source.model, encoder, decoder, opts.fp16)
        log(f"parity vs torch on onnxruntime {providers[0]} ({report.bound}):\n{report.table()}")
        if not report.passed:
            raise ParityError(f"parity check FAILED ({report.bound}); no manifest written",
                              report.table())
        parity = report.to_dict()
    return build_manifest(source, opts, graphs, seconds, parity, providers)


def export_diffusers(source: Loaded, out: Path, check: bool, log=print) -> dict:
    """Write the diffusers folder. With `check`: read it back (exact, in any environment),
    and where diffusers imports, load it in diffusers and compare outputs (REL_ERR's bound)."""
    info = diffusers_format.write_diffusers(source.model, out, source.scaling)
    log(f"wrote the diffusers AutoencoderKL files ({info['config']}, {info['weights']})")
    if not check:
        return info
    wrong = diffusers_format.round_trip_mismatches(out, source.model)
    if wrong:
        raise ParityError("diffusers folder check FAILED: the weights read back differ",
                          ", ".join(wrong[:5]))
    log("diffusers folder read back: every tensor equal to the checkpoint's, bit for bit")
    info["parity"] = {"round_trip": "exact", "diffusers": _diffusers_outputs(source, out, log)}
    return info


def _diffusers_outputs(source: Loaded, out: Path, log) -> dict:
    """diffusers' own forward against ours where diffusers imports; raises beyond the bound."""
    h, w = source.model.ddconfig.size
    images = to_model(synthetic_radio_maps(2, h, w))
    try:
        report = diffusers_format.diffusers_parity(out, source.model, images)
    except diffusers_format.DiffusersUnavailable as err:
        log(f"note: diffusers' own forward not compared here (the folder's weights are checked "
            f"above): {err}")
        return {"checked": False, "reason": str(err)}
    bound = f"max_abs_err <= {diffusers_format.REL_ERR} * max(1, max|ours|)"
    figures = ", ".join(f"{k} {v['max_abs_err']:.3e} (max|ours| {v['max_abs_ref']:.3g})"
                        for k, v in report.items())
    if not all(v["passed"] for v in report.values()):
        raise ParityError(f"diffusers parity FAILED ({bound})", figures)
    log(f"diffusers parity ({bound}): {figures}")
    return {"checked": True, "bound": bound, "outputs": report}


@contextlib.contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A temp folder beside `out` that the export writes into; once everything is written and
    checked its files move into `out` (the files that mark a finished export last), and on any
    failure it is removed and `out` is left as it was: no folder looks finished that is not."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield staging
        publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


FINISHED_MARKERS = (MANIFEST_NAME, diffusers_format.CONFIG_FILE)


def publish(staging: Path, out: Path) -> None:
    """Move a finished export into `out`: a rename when `out` does not exist; else its marker
    files are removed first (nothing stale vouches for new files), then each file replaced,
    the markers last. Other files in `out` stay."""
    if not out.exists():
        staging.chmod(0o755)  # mkdtemp makes 0700; served folders are read by others
        staging.rename(out)
        return
    for name in FINISHED_MARKERS:
        (out / name).unlink(missing_ok=True)
    for path in sorted(staging.iterdir(), key=lambda p: p.name in FINISHED_MARKERS):
        os.replace(path, out / path.name)


def run_export(opts: ExportOptions, log=print) -> dict:
    """The whole `python -m export` job; returns the manifest (or the diffusers summary).
    Written into a temp folder and moved to --out only when every check passed (staged)."""
    unknown = sorted(set(opts.formats) - set(FORMATS))
    if unknown or not opts.formats:
        raise ValueError(f"--format: expected a comma-separated subset of {list(FORMATS)}, "
                         f"got {','.join(opts.formats)!r}")
    source = load(opts.ckpt, opts.config, opts.use_ema)
    log(f"loaded {source.path} (step {source.step}, {source.weights} weights, "
        f"{sum(p.numel() for p in source.model.parameters()):,} parameters)")
    result = {}
    out = Path(opts.out)
    with staged(out) as staging:
        if "diffusers" in opts.formats:
            result["diffusers"] = export_diffusers(source, staging, opts.check, log)
        if "onnx" in opts.formats:
            result = {**export_onnx(source, replace(opts, out=str(staging)), log), **result}
            write_manifest(staging, result)
    log(f"wrote {out}" + (f" ({MANIFEST_NAME})" if "onnx" in opts.formats else ""))
    return result


def verify_export(directory: str | Path, ckpt: str | Path | None = None, check: bool = True,
                  provider: str = "auto", log=print) -> ParityReport | None:
    """Re-check an export directory: manifest schema, graph SHA-256, and with `ckpt` that it is
    the source checkpoint and (with `check`) that the graphs still match it under onnxruntime."""
    manifest = read_manifest(directory)
    log(f"{Path(directory) / MANIFEST_NAME}: schema valid, graph SHA-256 match")
    if ckpt is None:
        return None
    path = resolve_checkpoint(ckpt)
    check_source_checkpoint(manifest, path)
    log(f"{path} is the source checkpoint (SHA-256 match)")
    if not check:
        return None
    source = load(path, manifest["model_config"],
                  manifest["source_checkpoint"].get("weights") == "ema")
    encoder, decoder = _sessions(Path(directory), provider)
    report = check_parity(source.model, encoder, decoder, manifest["precision"] == "fp16")
    log(f"parity vs torch on onnxruntime {encoder.get_providers()[0]} ({report.bound}):\n"
        f"{report.table()}")
    if not report.passed:
        raise ParityError(f"parity check FAILED ({report.bound})", report.table())
    return report
