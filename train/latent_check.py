"""`python -m train latent-check --ckpt X`: is this VAE's latent space one a diffusion model can
learn? Over a split (EMA weights): per-channel mean and std of the posterior means and of
posterior samples; the samples' std after the stored scale and after upstream RadioDiff's
fixed 0.3 (diffusion schedules assume about 1); the share of each channel's variance that is
posterior noise; KL per latent element; the share of the latents' energy above half Nyquist
beside the maps'; and the decoder's sensitivity: PSNR of the decode of the scaled latent plus
Gaussian noise of std s against the clean decode. Then verdict lines, each with its reason."""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Iterable, Sequence

import torch

from model.autoencoder import AutoencoderKL
from model.io import from_model
from model.metrics import psnr
from model.run_config import load_run
from radiomaps import DataError, validation_subset, whole_maps
from train.latent_stats import ChannelMoments
from train.split_commands import add_split_arguments, split_loader

UPSTREAM_SCALE = 0.3  # RadioDiff's radio_train.yaml first-stage scale_factor
NOISE_LEVELS = (0.01, 0.03, 0.1, 0.3)
HALF_NYQUIST = 0.25  # cycles per sample
DEFAULT_MAPS = 64
# verdict thresholds
STD_OK = (0.5, 2.0)  # a scaled std in this range suits a unit-variance diffusion prior
CHANNEL_SPREAD = 0.25  # weakest / strongest channel std under one global scale
NOISE_SHARE_HIGH, NOISE_SHARE_LOW = 0.5, 1e-3
SENSITIVE_PSNR = 30.0  # dB: a latent error of s = 0.1 should keep the decode above this


def high_frequency_energy(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel, the energy of each map's mean-removed FFT above HALF_NYQUIST (radial
    frequency, cycles per sample) and the total, summed over the batch: ([C], [C])."""
    x = x.detach().double()
    x = x - x.mean(dim=(-2, -1), keepdim=True)
    power = torch.fft.fft2(x).abs().square()
    fy = torch.fft.fftfreq(x.shape[-2], dtype=torch.float64, device=x.device)
    fx = torch.fft.fftfreq(x.shape[-1], dtype=torch.float64, device=x.device)
    high = (fy[:, None].square() + fx[None, :].square()).sqrt() > HALF_NYQUIST
    return (power * high).sum(dim=(0, 2, 3)).cpu(), power.sum(dim=(0, 2, 3)).cpu()


def noise_std_raw(scaling: dict, s: float, channels: int) -> torch.Tensor:
    """The raw-latent std per channel of noise of std `s` in the scaled latent space."""
    if scaling.get("latents_std") is not None:
        return s * torch.tensor(scaling["latents_std"], dtype=torch.float64)
    return torch.full((channels,), s / scaling["scale_factor"], dtype=torch.float64)


class LatentCheck:
    """The figures' running sums over batches."""

    def __init__(self, scaling: dict, noise_levels: Sequence[float], seed: int):
        self.scaling, self.noise_levels = scaling, tuple(noise_levels)
        self.means, self.samples = ChannelMoments(), ChannelMoments()
        self.generator = torch.Generator().manual_seed(seed)
        self.post_var = self.kl = self.hf_latent = self.hf_map = None
        self.psnr_sums = {s: 0.0 for s in self.noise_levels}
        self.psnr_min = {s: math.inf for s in self.noise_levels}
        self.maps = 0

    @staticmethod
    def _add(total: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
        return value if total is None else total + value

    @torch.no_grad()
    def add(self, model: AutoencoderKL, images: torch.Tensor) -> None:
        posterior = model.encode(images)
        mean, logvar = posterior.mean.double().cpu(), posterior.logvar.double().cpu()
        var = logvar.exp()
        noise = torch.randn(mean.shape, generator=self.generator, dtype=torch.float64)
        self.means.add(mean)
        self.samples.add(mean + var.sqrt() * noise)
        self.post_var = self._add(self.post_var, var.sum(dim=(0, 2, 3)))
        kl = 0.5 * (mean.square() + var - 1.0 - logvar)
        self.kl = self._add(self.kl, kl.sum(dim=(0, 2, 3)))
        self.hf_latent = self._add(self.hf_latent, torch.stack(high_frequency_energy(mean)))
        self.hf_map = self._add(self.hf_map, torch.stack(high_frequency_energy(images)))
        self._sensitivity(model, posterior.mean)
        self.maps += mean.shape[0]

    def _sensitivity(self, model: AutoencoderKL, z: torch.Tensor) -> None:
        clean = from_model(model.decode(z)).clamp(0, 1)
        for s in self.noise_levels:
            std = noise_std_raw(self.scaling, s, z.shape[1]).to(z.device, z.dtype)
            eps = torch.randn(z.shape, generator=self.generator).to(z.device, z.dtype)
            noisy = from_model(model.decode(z + std.view(1, -1, 1, 1) * eps)).clamp(0, 1)
            values = psnr(noisy, clean).double()
            self.psnr_sums[s] += values.sum().item()
            self.psnr_min[s] = min(self.psnr_min[s], values.min().item())

    def report(self) -> dict:
        if self.maps == 0:
            raise DataError("no maps to check (empty split?)")
        per_element = self.samples.count
        sample_var = self.samples.std().square()
        stored = self.scaling["scale_factor"]
        global_std = self.samples.global_std()
        return {
            "maps": self.maps,
            "mean_of_means": _floats(self.means.mean), "std_of_means": _floats(self.means.std()),
            "mean_of_samples": _floats(self.samples.mean), "std_of_samples": _floats(self.samples.std()),
            "global_std_of_samples": global_std, "measured_scale_factor": 1.0 / global_std,
            "stored_scaling": self.scaling,
            "std_after_stored_scale": _scaled_std(self.samples, self.scaling),
            "std_after_0.3": {"global": global_std * UPSTREAM_SCALE,
                              "per_channel": _floats(self.samples.std() * UPSTREAM_SCALE),
                              "mean_per_channel": _floats(self.samples.mean * UPSTREAM_SCALE)},
            "stored_scale_factor": stored,
            "posterior_noise_share": _floats(self.post_var / per_element / sample_var),
            "kl_per_element": _floats(self.kl / per_element),
            "kl_per_element_mean": (self.kl.sum() / (per_element * self.kl.numel())).item(),
            "high_frequency_share_latent": _floats(self.hf_latent[0] / self.hf_latent[1]),
            "high_frequency_share_map": (self.hf_map[0].sum() / self.hf_map[1].sum()).item(),
            "decoder_sensitivity_psnr": {str(s): {"mean": self.psnr_sums[s] / self.maps,
                                                  "min": self.psnr_min[s]}
                                         for s in self.noise_levels},
        }


def _floats(values: torch.Tensor) -> list[float]:
    return [float(v) for v in values]


def _scaled_std(samples: ChannelMoments, scaling: dict) -> dict:
    """The samples' std (global and per channel) and channel means after the stored scaling:
    per-channel standardisation when the checkpoint stores means and stds, else x scale_factor."""
    if scaling.get("latents_mean") is not None:
        mean = torch.tensor(scaling["latents_mean"], dtype=torch.float64)
        std = torch.tensor(scaling["latents_std"], dtype=torch.float64)
        per_channel, centred = samples.std() / std, (samples.mean - mean) / std
        spread = per_channel.square() + (centred - centred.mean()).square()
        return {"how": "(z - latents_mean) / latents_std", "global": spread.mean().sqrt().item(),
                "per_channel": _floats(per_channel), "mean_per_channel": _floats(centred)}
    f = scaling["scale_factor"]
    return {"how": f"z * {f:.6g}", "global": samples.global_std() * f,
            "per_channel": _floats(samples.std() * f), "mean_per_channel": _floats(samples.mean * f)}


def verdicts(report: dict) -> list[str]:
    """One line per finding: OK / WARN, what, and why."""
    lines = []
    for label, block in (("stored scale", report["std_after_stored_scale"]),
                         ("upstream's 0.3", report["std_after_0.3"])):
        std, means = block["global"], block["mean_per_channel"]
        ok = STD_OK[0] <= std <= STD_OK[1]
        lines.append(f"{'OK' if ok else 'WARN'} scale: std after {label} is {std:.3g}"
                     + ("" if ok else f" (diffusion schedules assume ~1; set scale_factor "
                                      f"{report['measured_scale_factor']:.4g})")
                     + (f"; channel means {', '.join(f'{m:.2f}' for m in means)} are off "
                        "centre (the prior is N(0, 1))" if max(map(abs, means)) > 0.5 else ""))
    per_channel = report["std_after_0.3"]["per_channel"]
    weakest = min(range(len(per_channel)), key=per_channel.__getitem__)
    spread = per_channel[weakest] / max(per_channel)
    if spread < CHANNEL_SPREAD:
        lines.append(f"WARN channels: under one global scale channel {weakest}'s std is "
                     f"{spread:.2f} of the strongest's (x 0.3: {', '.join(f'{v:.2f}' for v in per_channel)}): "
                     "the diffusion's unit noise swamps it; standardise per channel "
                     "(latents_mean / latents_std)")
    share = report["posterior_noise_share"]
    high = [c for c, v in enumerate(share) if v > NOISE_SHARE_HIGH]
    if high:
        lines.append(f"WARN posterior noise: channels {high} are mostly sampling noise (share "
                     f"{', '.join(f'{share[c]:.2f}' for c in high)}): an LDM trained on samples "
                     "learns noise there; lower the KL weight or train on means")
    elif max(share) < NOISE_SHARE_LOW:
        lines.append(f"OK posterior noise: at most {max(share):.2g} of any channel's variance "
                     "(samples ~ means; the KL weight barely shapes the latent)")
    else:
        lines.append(f"OK posterior noise: at most {max(share):.2g} of any channel's variance")
    latent_hf, map_hf = max(report["high_frequency_share_latent"]), report["high_frequency_share_map"]
    ok = latent_hf <= 2 * map_hf + 0.01
    lines.append(f"{'OK' if ok else 'WARN'} spectrum: up to {latent_hf:.3g} of a channel's "
                 f"energy above half Nyquist vs {map_hf:.3g} for the maps"
                 + ("" if ok else " (noise-like latents are harder for a diffusion UNet)"))
    at = report["decoder_sensitivity_psnr"].get("0.1")
    if at is not None:
        ok = at["mean"] >= SENSITIVE_PSNR
        lines.append(f"{'OK' if ok else 'WARN'} decoder sensitivity: noise of std 0.1 in the "
                     f"scaled latent gives {at['mean']:.1f} dB (worst {at['min']:.1f}) against "
                     f"the clean decode" + ("" if ok else f": under {SENSITIVE_PSNR:.0f} dB, an "
                                            "LDM must land closer than 0.1 per element"))
    return lines


@torch.no_grad()
def check(model: AutoencoderKL, batches: Iterable[dict], device: torch.device, scaling: dict,
          noise_levels: Sequence[float] = NOISE_LEVELS, seed: int = 0) -> dict:
    """The figures over `batches` (items with `image` in [-1, 1]) and the verdicts."""
    acc = LatentCheck(scaling, noise_levels, seed)
    for batch in batches:
        acc.add(model, batch["image"].to(device))
    report = acc.report()
    return report | {"verdicts": verdicts(report)}


def run_check(ckpt: str | Path, split: str = "train", cfg: str | Path | None = None,
              overrides: Sequence[str] = (), max_maps: int | None = DEFAULT_MAPS,
              seed: int = 0) -> dict:
    loaded = load_run(ckpt, cfg, overrides)
    dataset = whole_maps(loaded.run.data, split)
    if max_maps is not None:
        dataset = validation_subset(dataset, max_maps, loaded.run.data.seed)
    report = check(loaded.model, split_loader(loaded.run, dataset), loaded.device,
                   loaded.scaling, seed=seed)
    return {"checkpoint": str(loaded.path), "weights": loaded.weights, "split": split,
            "step": loaded.step, **report}


def format_report(r: dict) -> str:
    rows = ["| channel | mean of means | std of means | mean of samples | std of samples | "
            "std x stored scale | std x 0.3 | posterior noise share | KL per element | "
            "energy above half Nyquist |", "|---" * 10 + "|"]
    for c in range(len(r["std_of_samples"])):
        rows.append(f"| {c} | " + " | ".join(f"{v:.4g}" for v in (
            r["mean_of_means"][c], r["std_of_means"][c], r["mean_of_samples"][c],
            r["std_of_samples"][c], r["std_after_stored_scale"]["per_channel"][c],
            r["std_after_0.3"]["per_channel"][c], r["posterior_noise_share"][c],
            r["kl_per_element"][c], r["high_frequency_share_latent"][c])) + " |")
    sens = ", ".join(f"s={s}: {v['mean']:.2f} dB (worst {v['min']:.2f})"
                     for s, v in r["decoder_sensitivity_psnr"].items())
    rows += [f"{r['maps']} {r['split']} maps ({r['weights']} weights): global std "
             f"{r['global_std_of_samples']:.4g} -> measured scale_factor "
             f"{r['measured_scale_factor']:.4g}; stored: {r['stored_scaling']['scale_factor']:.4g} "
             f"({r['stored_scaling']['scale_factor_source']}), applied as "
             f"{r['std_after_stored_scale']['how']} -> std {r['std_after_stored_scale']['global']:.3g}; "
             f"x 0.3 -> std {r['std_after_0.3']['global']:.3g}",
             f"maps' energy above half Nyquist: {r['high_frequency_share_map']:.4g}",
             f"decoder sensitivity (PSNR vs the clean decode): {sens}", *r["verdicts"]]
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train latent-check", allow_abbrev=False,
                                description=__doc__.split("\n\n")[0])
    add_split_arguments(p, "train")
    p.set_defaults(max_maps=DEFAULT_MAPS)
    p.add_argument("--seed", type=int, default=0, help="seed of the samples and the noise")
    return p


def command(argv: list[str], user_errors: tuple[type[Exception], ...]) -> int:
    """Run `python -m train latent-check ARGV`; a user error prints one line and returns 2."""
    args = build_parser().parse_args(argv)
    try:
        report = run_check(args.ckpt, args.split, args.cfg, args.overrides, args.max_maps,
                           args.seed)
    except user_errors as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0
