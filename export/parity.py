"""Parity: the exported graphs under onnxruntime against the float32 torch model.

Inputs: uniform noise and synthetic radio maps (and their latents for the decoder), at batch
1 and 3 and the configured size, plus one batch-2 case at another size (dynamic H/W).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort
import torch

from model.autoencoder import AutoencoderKL
from model.io import to_model

from .onnx_export import DecoderGraph, EncoderGraph

FP32_MAX_ABS_ERR = 1e-4
# fp16 carries ~3 significant digits through ~30 normalisation layers: the bound is relative
# to the output's scale, max|err| <= FP16_REL_ERR * max(1, max|torch output|).
FP16_REL_ERR = 2e-2


@dataclass
class ParityReport:
    """Figures of one parity run; `passed` only when every case is finite and within bound."""
    precision: str
    provider: str
    cases: list[dict] = field(default_factory=list)

    @property
    def bound(self) -> str:
        if self.precision == "fp16":
            return f"max_abs_err <= {FP16_REL_ERR} * max(1, max|torch|)"
        return f"max_abs_err < {FP32_MAX_ABS_ERR}"

    @property
    def passed(self) -> bool:
        return all(case["passed"] for case in self.cases)

    def worst(self, graph: str) -> float:
        return max(max(c["max_abs_err"].values()) for c in self.cases if c["graph"] == graph)

    def to_dict(self) -> dict:
        return {"checked": True, "passed": self.passed, "precision": self.precision,
                "bound": self.bound, "reference": "torch float32 eager, CPU",
                "provider": self.provider,
                "max_abs_err": {g: self.worst(g) for g in ("encoder", "decoder")},
                "cases": self.cases}

    def table(self) -> str:
        """The figures as aligned text, one line per case and output."""
        lines = [f"{'graph':8} {'input':6} {'shape':18} {'output':7} {'max_abs_err':>12} "
                 f"{'max|torch|':>11}  ok"]
        for c in self.cases:
            for out, err in c["max_abs_err"].items():
                lines.append(f"{c['graph']:8} {c['input']:6} {str(c['shape']):18} {out:7} "
                             f"{err:12.3e} {c['max_abs_ref'][out]:11.3g}  "
                             f"{'yes' if c['passed'] else 'NO'}")
        return "\n".join(lines)


def synthetic_radio_maps(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """[n, 1, h, w] maps in [0, 1] shaped like RadioMapSeer's: a transmitter's log-distance
    path gain in the -147..-47 dB gray scale, with buildings (value 0) as sharp rectangles."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    maps = np.empty((n, 1, h, w), dtype=np.float32)
    for i in range(n):
        ty, tx = rng.integers(0, h), rng.integers(0, w)
        gain_db = -47.0 - 39.0 * np.log10(1.0 + np.hypot(yy - ty, xx - tx))
        gain = np.clip((gain_db + 147.0) / 100.0, 0.0, 1.0)
        for _ in range(rng.integers(4, 12)):
            y0, x0 = rng.integers(0, h), rng.integers(0, w)
            gain[y0:y0 + rng.integers(2, h // 4 + 3), x0:x0 + rng.integers(2, w // 4 + 3)] = 0.0
        maps[i, 0] = gain
    return maps


def _cases(ae: AutoencoderKL) -> list[tuple[str, int, int, int]]:
    """(input kind, batch, H, W) per case."""
    f = ae.downsample_factor
    h, w = ((s // f) * f for s in ae.ddconfig.size)
    other_h = max(f, (h // 2 // f) * f)
    return [(kind, b, h, w) for kind in ("random", "radio") for b in (1, 3)] + \
           [("random", 2, other_h, w)]


def _images(kind: str, batch: int, h: int, w: int, seed: int) -> torch.Tensor:
    if kind == "radio":
        return to_model(synthetic_radio_maps(batch, h, w, seed))
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 1, h, w, generator=gen) * 2.0 - 1.0


def _random_latents(ae: AutoencoderKL, batch: int, h: int, w: int, seed: int) -> torch.Tensor:
    f = ae.downsample_factor
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, ae.embed_dim, h // f, w // f, generator=gen)


def _compare(graph: str, kind: str, x: torch.Tensor, torch_out: tuple[torch.Tensor, ...],
             session: ort.InferenceSession, fp16: bool) -> dict:
    names = [o.name for o in session.get_outputs()]
    got = session.run(names, {session.get_inputs()[0].name: x.numpy()})
    errs, refs, ok = {}, {}, True
    for name, ref, out in zip(names, torch_out, got):
        ref = ref.numpy()
        finite = bool(np.isfinite(out).all()) and out.shape == ref.shape
        err = float(np.abs(out - ref).max()) if finite else float("inf")
        scale = float(np.abs(ref).max())
        bound = FP16_REL_ERR * max(1.0, scale) if fp16 else FP32_MAX_ABS_ERR
        errs[name], refs[name] = err, scale
        ok = ok and finite and (err <= bound if fp16 else err < bound)
    return {"graph": graph, "input": kind, "shape": list(x.shape), "max_abs_err": errs,
            "max_abs_ref": refs, "passed": ok}


@torch.inference_mode()
def check_parity(ae: AutoencoderKL, encoder: ort.InferenceSession,
                 decoder: ort.InferenceSession, fp16: bool = False) -> ParityReport:
    """Run every case through torch (float32, CPU) and onnxruntime; collect the figures."""
    ae = ae.float().eval()
    torch_enc, torch_dec = EncoderGraph(ae), DecoderGraph(ae)
    report = ParityReport("fp16" if fp16 else "fp32", encoder.get_providers()[0])
    for seed, (kind, batch, h, w) in enumerate(_cases(ae)):
        x = _images(kind, batch, h, w, seed)
        moments = torch_enc(x)
        report.cases.append(_compare("encoder", kind, x, moments, encoder, fp16))
        # The decoder sees what it will see in use: radio maps' posterior means, or N(0, I).
        z = moments[0] if kind == "radio" else _random_latents(ae, batch, h, w, seed)
        report.cases.append(_compare("decoder", kind, z, (torch_dec(z),), decoder, fp16))
    return report
