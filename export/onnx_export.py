"""Trace the autoencoder's encode and decode halves into two ONNX graphs.

Both graphs take and return float32; with fp16 the weights and activations are half precision
and Cast nodes at the boundary keep the interface float32 (GroupNorm statistics are float64 in
either case: see precise_norm.py). Batch, height and width are dynamic (the network is fully
convolutional; H and W must be multiples of the downsampling factor).
"""
from __future__ import annotations

import contextlib
import copy
import io
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from model.autoencoder import AutoencoderKL

from .precise_norm import PreciseNormError, precise_instance_norms

EXPORTERS = ("dynamo", "torchscript")
DEFAULT_OPSET = 18
ENCODER_FILE, DECODER_FILE = "encoder.onnx", "decoder.onnx"
_EXAMPLE_LATENT = (8, 12)


class ExportError(RuntimeError):
    """The exporter or onnx.checker rejected a graph; the message names which and why."""


class EncoderGraph(nn.Module):
    """image [N, 1, H, W] -> posterior (mean, logvar) [N, z, H/f, W/f], logvar clamped."""

    def __init__(self, ae: AutoencoderKL, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.ae, self.dtype = ae, dtype

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.ae.encode(image.to(self.dtype))
        return posterior.mean.float(), posterior.logvar.float()


class DecoderGraph(nn.Module):
    """latent [N, z, h, w] -> image [N, 1, h*f, w*f]."""

    def __init__(self, ae: AutoencoderKL, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.ae, self.dtype = ae, dtype

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.ae.decode(latent.to(self.dtype)).float()


def io_spec(ae: AutoencoderKL) -> dict[str, dict[str, list]]:
    """Per graph, the symbolic shape of each input and output tensor (manifest + ONNX dims)."""
    f, z = ae.downsample_factor, ae.embed_dim
    c_in, c_out = ae.ddconfig.in_channels, ae.ddconfig.out_ch
    latent = ["N", z, f"H/{f}", f"W/{f}"]
    return {
        "encoder": {"image": ["N", c_in, "H", "W"], "mean": latent, "logvar": latent},
        "decoder": {"latent": ["N", z, "h", "w"], "image": ["N", c_out, f"h*{f}", f"w*{f}"]},
    }


def _dynamo_shapes(name: str, f: int) -> dict:
    batch, h, w = torch.export.Dim("N"), torch.export.Dim("h"), torch.export.Dim("w")
    if name == "encoder":
        return {"image": {0: batch, 2: f * h, 3: f * w}}
    return {"latent": {0: batch, 2: h, 3: w}}


def _torchscript_axes(spec: dict[str, list]) -> dict[str, dict[int, str]]:
    return {tensor: {i: d for i, d in enumerate(shape) if isinstance(d, str)}
            for tensor, shape in spec.items()}


def _run_exporter(module: nn.Module, example: torch.Tensor, path: Path, name: str,
                  spec: dict[str, list], exporter: str, opset: int, f: int) -> None:
    inputs, outputs = list(spec)[:1], list(spec)[1:]
    common = dict(input_names=inputs, output_names=outputs, opset_version=opset)
    # The exporters narrate every pass on stdout and warn about tracing internals;
    # the CLI reports results itself.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            torch.onnx.export(module, (example,), str(path), dynamo=True, external_data=False,
                              dynamic_shapes=_dynamo_shapes(name, f), **common)
        else:
            torch.onnx.export(module, (example,), str(path), dynamo=False,
                              dynamic_axes=_torchscript_axes(spec), **common)


def _finalise(path: Path, spec: dict[str, list]) -> None:
    """Precise GroupNorm statistics, and the manifest's dim names on the graph inputs/outputs
    (the exporters invent their own)."""
    proto = onnx.load(str(path))
    try:
        precise_instance_norms(proto)
    except PreciseNormError as err:
        raise ExportError(f"{path}: {err}") from None
    for value in list(proto.graph.input) + list(proto.graph.output):
        dims = value.type.tensor_type.shape.dim
        for dim, want in zip(dims, spec[value.name]):
            if isinstance(want, str):
                dim.dim_param = want
    onnx.save(proto, str(path))


def export_graph(ae: AutoencoderKL, name: str, out_dir: Path, exporter: str = "dynamo",
                 opset: int = DEFAULT_OPSET, fp16: bool = False) -> Path:
    """Export the `encoder` or `decoder` half to `out_dir`, check it with onnx.checker."""
    if exporter not in EXPORTERS:
        raise ExportError(f"exporter must be one of {list(EXPORTERS)}, got {exporter!r}")
    dtype = torch.float16 if fp16 else torch.float32
    net = copy.deepcopy(ae).to(dtype) if fp16 else ae
    f = ae.downsample_factor
    # A small, non-square example keeps TorchScript tracing cheap and height/width distinct.
    h, w = _EXAMPLE_LATENT
    if name == "encoder":
        module = EncoderGraph(net.eval(), dtype)
        example = torch.zeros(2, ae.ddconfig.in_channels, h * f, w * f)
    else:
        module, example = DecoderGraph(net.eval(), dtype), torch.zeros(2, ae.embed_dim, h, w)
    path = out_dir / (ENCODER_FILE if name == "encoder" else DECODER_FILE)
    spec = io_spec(ae)[name]
    try:
        _run_exporter(module, example, path, name, spec, exporter, opset, f)
    except Exception as err:  # the exporters raise many unrelated types; name the step
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ExportError(f"{exporter} exporter failed on the {name} (opset {opset}): "
                          f"{type(err).__name__}: {first}") from err
    _finalise(path, spec)
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as err:
        raise ExportError(f"onnx.checker rejected {path}: {err}") from None
    return path
