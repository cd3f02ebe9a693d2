"""The inference paths bench/model.py compares, each behind one `Runner` interface.

Every runner takes maps in [-1, 1] and returns the posterior mean (`encode`), and takes latents
and returns maps in [-1, 1] (`decode`), as CPU float32 tensors.
"""
from __future__ import annotations

import copy
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from model.autoencoder import AutoencoderKL
from runtime.autotune import options_for
from runtime.decision import Decision, PathRequest, choose, engines
from runtime.inference import InferenceModel, prepare_for_inference
from runtime.machine import native_bf16

Fn = Callable[[torch.Tensor], torch.Tensor]


class Skip(Exception):
    """This path cannot run here; the message says why."""


@dataclass
class Runner:
    name: str
    encode: Fn
    decode: Fn
    precision: str = "fp32"  # which peak FLOP/s applies
    reuse_memory: bool = False  # the process-wide malloc setting this path runs under
    toggle_malloc: bool = False  # set malloc per call (some path of the run reuses memory)
    setup_s: float = 0.0
    parts: dict[str, "Runner"] = field(default_factory=dict)  # auto: the runner of each op

    def precision_for(self, op: str) -> str | None:
        """The precision `op` runs in (None: its parts differ, no one peak applies)."""
        if op in self.parts:
            return self.parts[op].precision
        kinds = {part.precision for part in self.parts.values()} or {self.precision}
        return kinds.pop() if len(kinds) == 1 else None

    def reuse_memory_for(self, op: str) -> bool:
        """The malloc setting `op` runs under: its own part's (auto), else the runner's."""
        return self.parts[op].reuse_memory if op in self.parts else self.reuse_memory

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


def plain(model: AutoencoderKL, device: torch.device) -> Runner:
    """The baseline: the same weights in plain fp32 eager, contiguous NCHW, no tricks."""
    net = copy.deepcopy(model).eval().to(device)

    @torch.inference_mode()
    def encode(x: torch.Tensor) -> torch.Tensor:
        return net.encode(x.to(device)).mean.cpu()

    @torch.inference_mode()
    def decode(z: torch.Tensor) -> torch.Tensor:
        return net.decode(z.to(device)).cpu()

    return Runner("baseline", encode, decode)


def fast(name: str, model: AutoencoderKL, device: torch.device,
         options: dict[str, object]) -> Runner:
    """A runtime/inference.py path with exactly `options` (InferenceOptions fields)."""
    return _runner(name, prepare_for_inference(copy.deepcopy(model), device, **options))


def _runner(name: str, prepared: InferenceModel) -> Runner:
    # onednn_bf16 keeps fp32 tensors but computes its convolutions in bf16: the bf16 peak applies
    precision = "bf16" if prepared.options.onednn_bf16 else prepared.options.precision
    return Runner(name, lambda x: prepared.encode(x).mean.cpu(),
                  lambda z: prepared.decode(z).cpu(), precision,
                  prepared.options.reuse_memory)


def onnx(name: str, model: AutoencoderKL, provider: str, threads: int,
         onnx_dir: str | None, workdir: Path) -> Runner:
    """encoder.onnx / decoder.onnx in onnxruntime: from `onnx_dir` when it holds them, else
    exported now (into `onnx_dir` when given, for the next run to reuse)."""
    from export.onnx_export import DECODER_FILE, ENCODER_FILE
    from export.ort_session import make_session, provider_chain

    wanted = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
              "tensorrt": "TensorrtExecutionProvider"}[provider]
    if wanted not in provider_chain(provider):
        raise Skip(f"this onnxruntime build has no {wanted}")
    folder = _onnx_graphs(model, onnx_dir, workdir)
    enc = make_session(folder / ENCODER_FILE, provider, threads)
    dec = make_session(folder / DECODER_FILE, provider, threads)

    def encode(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(enc.run(["mean"], {"image": x.numpy()})[0])

    def decode(z: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(dec.run(["image"], {"latent": z.numpy()})[0])

    return Runner(name, encode, decode)


def _onnx_graphs(model: AutoencoderKL, onnx_dir: str | None, workdir: Path) -> Path:
    """The folder holding encoder.onnx / decoder.onnx of `model`: `onnx_dir` when it holds
    them, else exported now (into `onnx_dir` when given, for the next run to reuse)."""
    from export.onnx_export import DECODER_FILE, ENCODER_FILE, export_graph

    folder = Path(onnx_dir) if onnx_dir else workdir / "onnx"
    if not (folder / ENCODER_FILE).exists() or not (folder / DECODER_FILE).exists():
        folder.mkdir(parents=True, exist_ok=True)
        for graph in ("encoder", "decoder"):
            export_graph(model, graph, folder)
    return folder


def openvino(name: str, model: AutoencoderKL, threads: int, onnx_dir: str | None,
             workdir: Path) -> Runner:
    """The exported graphs in OpenVINO's CPU plugin (Intel's CPU runtime: fused layers, and
    on AMX CPUs bf16 inference precision): openvino-f32 or openvino-bf16. Optional: a bench
    row only, `pip install openvino`; the product does not use it."""
    from export.onnx_export import DECODER_FILE, ENCODER_FILE
    try:
        import openvino as ov
    except ModuleNotFoundError:
        raise Skip("openvino is not installed (pip install openvino)") from None
    folder = _onnx_graphs(model, onnx_dir, workdir)
    config = {"INFERENCE_PRECISION_HINT": name[len("openvino-"):],
              "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
    core = ov.Core()
    enc = core.compile_model(str(folder / ENCODER_FILE), "CPU", config)
    dec = core.compile_model(str(folder / DECODER_FILE), "CPU", config)

    def encode(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(enc({"image": x.numpy()})[enc.output("mean")].copy())

    def decode(z: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(dec({"latent": z.numpy()})[dec.output("image")].copy())

    return Runner(name, encode, decode)


def _keep_torchvision_out() -> None:
    """diffusers imports torchvision whenever it is installed, though its AutoencoderKL never
    uses it; a torchvision built for another torch (here a CUDA build next to CPU torch) fails
    to load. Marked absent in sys.modules, it is never imported, as on a machine without it."""
    if "torchvision" not in sys.modules:
        sys.modules["torchvision"] = None  # type: ignore[assignment]


def diffusers_peer(model: AutoencoderKL, device: torch.device, workdir: Path) -> Runner:
    """diffusers' AutoencoderKL with the same weights converted to its layout, fp32 eager."""
    from export.diffusers_format import DiffusersUnavailable, load_diffusers_vae, write_diffusers

    _keep_torchvision_out()
    folder = workdir / "diffusers"
    write_diffusers(model, folder)
    try:
        vae = load_diffusers_vae(folder).to(device)
    except DiffusersUnavailable as err:
        raise Skip(str(err)) from None

    @torch.inference_mode()
    def encode(x: torch.Tensor) -> torch.Tensor:
        return vae.encode(x.to(device)).latent_dist.mean.cpu()

    @torch.inference_mode()
    def decode(z: torch.Tensor) -> torch.Tensor:
        return vae.decode(z.to(device)).sample.cpu()

    return Runner("diffusers", encode, decode)


BENCH_TUNING_S = 1800.0  # a benchmark measures every candidate (a server start is bounded)

# "auto" is what runtime.decision.choose() measures as the fastest accurate path here (the
# server's --path auto), "default" its neutral baseline (plain fp32 through runtime/, as
# "baseline" but for the InferenceModel wrapper: not a row unless asked for); the others name
# their options.
CPU_PATHS = ("baseline", "auto", "channels_last", "winograd", "matmul_1x1", "reuse_memory",
             "bf16", "compile", "compile+matmul_1x1+reuse_memory", "onnx-cpu", "openvino-f32",
             "openvino-bf16", "diffusers")
GPU_PATHS = ("baseline", "auto", "channels_last", "bf16", "fp16", "bf16+channels_last",
             "fp16+channels_last", "compile", "compile+bf16+channels_last",
             "compile+fp16+channels_last", "cuda_graphs+bf16+channels_last",
             "cuda_graphs+fp16+channels_last", "onnx-cpu", "onnx-cuda", "onnx-tensorrt",
             "diffusers")


def default_paths(device: torch.device, with_compile: bool) -> list[str]:
    """Every path that makes sense here: compile only when asked; CPU bf16 only with native
    bf16 instructions (emulated bf16 is orders of magnitude slower than fp32)."""
    paths = list(GPU_PATHS if device.type == "cuda" else CPU_PATHS)
    if not with_compile:  # compiling takes tens of seconds per path
        paths = [p for p in paths if "compile" not in p and "cuda_graphs" not in p]
    if device.type == "cpu" and not native_bf16():
        paths.remove("bf16")
        paths.remove("openvino-bf16")
    if device.type == "cuda":
        paths.remove("onnx-cpu")
    return paths


def _auto(decision: Decision, model: AutoencoderKL, device: torch.device) -> Runner:
    """The decision's paths, per operation: encode on the encoder's path, decode on the
    decoder's, each with its recorded kernel choices (the server runs each endpoint on its
    own)."""
    prepared = engines(decision, copy.deepcopy(model), device)
    encoder, decoder = (_runner(op, prepared[op]) for op in ("encode", "decode"))
    paths = decision.paths
    name = ("auto=" + paths["encode"] if len(set(paths.values())) == 1 else
            f"auto=enc:{paths['encode']},dec:{paths['decode']}")
    return Runner(name, encoder.encode, decoder.decode, reuse_memory=encoder.reuse_memory
                  or decoder.reuse_memory, parts={"encode": encoder, "decode": decoder})


def build_runner(name: str, model: AutoencoderKL, device: torch.device, threads: int,
                 onnx_dir: str | None, workdir: Path, size: tuple[int, int]) -> Runner:
    """The runner for path `name`, its setup time recorded (export, conversion, loading,
    measuring: "auto" measures afresh, no decision file read or written, so its setup time is
    the tuning's)."""
    start = time.perf_counter()
    if name in ("auto", "default"):
        request = PathRequest(size, name, budget_s=BENCH_TUNING_S, record=False)
        runner = _auto(choose(model, device, request), model, device)
        if name == "default":
            runner.name = "default"
    elif name == "baseline":
        runner = plain(model, device)
    elif name == "diffusers":
        runner = diffusers_peer(model, device, workdir)
    elif name.startswith("onnx-"):
        runner = onnx(name, model, name[len("onnx-"):], threads, onnx_dir, workdir)
    elif name in ("openvino-f32", "openvino-bf16"):
        runner = openvino(name, model, threads, onnx_dir, workdir)
    else:
        runner = fast(name, model, device, options_for(name))
    runner.setup_s = time.perf_counter() - start
    return runner


def make_workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="radiodiff-bench-"))
