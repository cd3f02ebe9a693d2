"""onnxruntime sessions with an explicit provider choice and an honest report of what ran.

onnxruntime-gpu silently falls back to CPU when the CUDA/cuDNN libraries cannot be loaded,
so the provider actually in use is read back from `session.get_providers()`, never assumed.
"""
from __future__ import annotations

import sys
from pathlib import Path

import onnxruntime as ort

CPU, CUDA, TENSORRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
PROVIDER_CHOICES = ("auto", "cpu", "cuda", "tensorrt")
_CHAINS = {"cpu": [CPU], "cuda": [CUDA, CPU], "tensorrt": [TENSORRT, CUDA, CPU]}
# Parity is judged at full fp32 precision: keep the CUDA provider's convolutions off TF32.
_OPTIONS = {CUDA: {"use_tf32": "0"}}


def resolve_request(request: str = "auto") -> str:
    """`auto` becomes `cuda` when this onnxruntime build has the CUDA provider, else `cpu`."""
    if request not in PROVIDER_CHOICES:
        raise ValueError(f"provider must be one of {list(PROVIDER_CHOICES)}, got {request!r}")
    if request == "auto":
        return "cuda" if CUDA in ort.get_available_providers() else "cpu"
    return request


def provider_chain(request: str = "auto") -> list[str]:
    """The requested providers that this onnxruntime build has, CPU last."""
    available = set(ort.get_available_providers())
    return [p for p in _CHAINS[resolve_request(request)] if p in available] or [CPU]


def make_session(path: str | Path, request: str = "auto",
                 threads: int | None = None) -> ort.InferenceSession:
    """An InferenceSession on the requested providers; warns when it fell back to another."""
    chain = provider_chain(request)
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), sess_options=opts, providers=chain,
                                   provider_options=[_OPTIONS.get(p, {}) for p in chain])
    used = session.get_providers()
    wanted = _CHAINS[resolve_request(request)][0]
    if used[0] != wanted:
        print(f"warning: asked onnxruntime for {wanted} but the session runs on {used[0]} "
              f"(available here: {ort.get_available_providers()}); for CUDA install "
              "onnxruntime-gpu with matching CUDA/cuDNN libraries", file=sys.stderr)
    return session
