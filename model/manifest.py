"""The export manifest (`DIR/manifest.json`): schema, atomic write, validated read.

`python -m export` writes it next to `encoder.onnx` and `decoder.onnx`; the server reads it
with `read_manifest` (plain json + hashlib: no onnx, onnxruntime or export import), which
checks the schema and that each graph file still has the SHA-256 the manifest recorded.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .config import ConfigError, ModelConfig, from_dict

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
PRECISIONS = ("fp32", "fp16")
# The graph contract: tensor names per graph, in order.
GRAPH_IO = {
    "encoder": (["image"], ["mean", "logvar"]),
    "decoder": (["latent"], ["image"]),
}
_REQUIRED = {
    "format_version": int, "encoder": dict, "decoder": dict, "downsample_factor": int,
    "latent_channels": int, "in_channels": int, "value_range": dict, "scale_factor": float,
    "precision": str, "opset": int, "model_config": dict, "source_checkpoint": dict,
    "versions": dict, "parity": dict, "providers": list,
}
# Optional (absent from manifests written before `python -m train latent-stats` existed): where
# scale_factor comes from, and the per-channel latent statistics (null without them).
_LATENT_STATS = ("latents_mean", "latents_std")


class ManifestError(ValueError):
    """An export directory or its manifest is missing, malformed, or does not match its files."""


class ManifestMissing(ManifestError):
    """The folder holds no manifest.json (or does not exist): bad input, not a failed check."""


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _expect(cond: bool, where: str, message: str) -> None:
    if not cond:
        raise ManifestError(f"{where}: {message}")


def _check_type(value: Any, tp: type, where: str, key: str) -> None:
    ok = isinstance(value, tp) and not isinstance(value, bool)
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    _expect(ok, where, f"{key!r} must be a JSON {tp.__name__}, got {value!r}")


def _check_graph(name: str, entry: dict, where: str) -> None:
    for key, tp in (("file", str), ("sha256", str), ("inputs", list), ("outputs", list)):
        _expect(key in entry, where, f"{name}.{key} is missing")
        _check_type(entry[key], tp, where, f"{name}.{key}")
    _expect(Path(entry["file"]).name == entry["file"] and entry["file"] not in ("", ".", ".."),
            where, f"{name}.file must be a bare file name inside the export directory, "
                   f"got {entry['file']!r}")
    digest = entry["sha256"]
    _expect(len(digest) == 64 and all(c in "0123456789abcdef" for c in digest), where,
            f"{name}.sha256 must be 64 lowercase hex digits")
    inputs, outputs = GRAPH_IO[name]
    for key, names in (("inputs", inputs), ("outputs", outputs)):
        found = [t.get("name") if isinstance(t, dict) else None for t in entry[key]]
        _expect(found == names, where, f"{name}.{key} must be tensors named {names}, got {found}")
        for tensor in entry[key]:
            _expect(tensor.get("dtype") == "float32" and isinstance(tensor.get("shape"), list),
                    where, f"{name}.{key}: each tensor needs dtype 'float32' and a shape list")


def _check_latent_stats(manifest: dict, where: str) -> None:
    """The optional scale_factor_source (a string) and latents_mean / latents_std (null, or one
    number per latent channel)."""
    if "scale_factor_source" in manifest:
        _check_type(manifest["scale_factor_source"], str, where, "scale_factor_source")
    for key in _LATENT_STATS:
        value = manifest.get(key)
        if value is not None:
            _expect(isinstance(value, list) and len(value) == manifest["latent_channels"], where,
                    f"{key!r} must be null or a list of {manifest['latent_channels']} numbers")
            for item in value:
                _check_type(item, float, where, key)


def validate_manifest(manifest: Any, where: str = MANIFEST_NAME) -> dict:
    """Check a manifest dict against format version 1; returns it, or raises ManifestError."""
    _expect(isinstance(manifest, dict), where, "expected a JSON object")
    _expect(manifest.get("format_version") == FORMAT_VERSION, where,
            f"unsupported format_version {manifest.get('format_version')!r} "
            f"(this code reads {FORMAT_VERSION}); re-export with this version")
    for key, tp in _REQUIRED.items():
        _expect(key in manifest, where, f"required key {key!r} is missing")
        _check_type(manifest[key], tp, where, key)
    for name in GRAPH_IO:
        _check_graph(name, manifest[name], where)
    _check_latent_stats(manifest, where)
    _expect(manifest["precision"] in PRECISIONS, where,
            f"precision must be one of {list(PRECISIONS)}, got {manifest['precision']!r}")
    source = manifest["source_checkpoint"]
    _expect(isinstance(source.get("sha256"), str) and source.get("weights") in ("ema", "model"),
            where, "source_checkpoint needs a sha256 string and weights 'ema' or 'model'")
    try:
        cfg = from_dict(ModelConfig, manifest["model_config"], "model_config")
    except ConfigError as err:
        raise ManifestError(f"{where}: {err}") from None
    for key, expected in (("downsample_factor", cfg.ddconfig.downsample_factor),
                          ("latent_channels", cfg.embed_dim),
                          ("in_channels", cfg.ddconfig.in_channels)):
        _expect(manifest[key] == expected, where,
                f"{key} is {manifest[key]} but model_config implies {expected}")
    return manifest


def verify_graphs(directory: str | Path, manifest: dict) -> None:
    """Each graph file exists and has the SHA-256 the manifest recorded."""
    directory = Path(directory)
    for name in GRAPH_IO:
        path = directory / manifest[name]["file"]
        if not path.is_file():
            raise ManifestError(f"{path}: the {name} graph listed in {MANIFEST_NAME} is missing")
        actual = sha256_file(path)
        if actual != manifest[name]["sha256"]:
            raise ManifestError(f"corrupted graph detected: {path} has SHA-256 {actual}, but "
                                f"{MANIFEST_NAME} records {manifest[name]['sha256']}; the file "
                                "was modified or truncated after export: re-export it")


def read_manifest(directory: str | Path, check_graphs: bool = True) -> dict:
    """Read and validate `DIR/manifest.json`; by default also verify the graphs' SHA-256."""
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise ManifestMissing(f"{directory}: no {MANIFEST_NAME}; expected an export directory "
                              "written by `python -m export --ckpt CKPT --out DIR`")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ManifestError(f"{path}: not readable JSON: {err}") from None
    validate_manifest(manifest, str(path))
    if check_graphs:
        verify_graphs(directory, manifest)
    return manifest


def check_source_checkpoint(manifest: dict, checkpoint: str | Path) -> None:
    """Raise ManifestError unless `checkpoint` is the file the graphs were exported from."""
    source = manifest["source_checkpoint"]
    actual = sha256_file(checkpoint)
    if actual != source.get("sha256"):
        raise ManifestError(f"checkpoint/manifest mismatch: {checkpoint} has SHA-256 {actual}, "
                            f"but the graphs were exported from {source.get('path')} (SHA-256 "
                            f"{source.get('sha256')}, step {source.get('step')}); re-export "
                            "from this checkpoint or use the matching one")


def write_safetensors(path: str | Path, tensors: dict, metadata: dict | None = None) -> Path:
    """Write a safetensors file whole or not at all (temp file + rename), readable by others
    (safetensors itself creates 0600 files; a server or another user reads these)."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file({name: t.contiguous() for name, t in tensors.items()}, str(tmp), metadata)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | Path, data: dict) -> None:
    """Write `data` as JSON to `path` whole or not at all (temp file in the same folder,
    then rename), readable by others."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; these files are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_manifest(directory: str | Path, manifest: dict) -> Path:
    """Validate, then write `DIR/manifest.json` atomically (temp file + rename)."""
    path = Path(directory) / MANIFEST_NAME
    validate_manifest(manifest, str(path))
    write_json_atomic(path, manifest)
    return path
