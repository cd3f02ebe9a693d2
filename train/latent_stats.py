"""`python -m train latent-stats`: per-channel statistics of a checkpoint's latents over a data
split, and the scale factor they recommend (LDM's scale_by_std: 1 / the global std of the
posterior samples); `--out FILE` writes a copy of the checkpoint with them under `latent_stats`,
for exports and the server (a bundled model is never rewritten)."""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Iterable, Sequence

import torch

from model.autoencoder import AutoencoderKL
from model.checkpoint import (LATENT_STATS_KEY, CheckpointError, refuse_bundled,
                              save_checkpoint)
from model.run_config import LoadedRun, load_run
from radiomaps import DataError, validation_subset, whole_maps
from train.split_commands import add_split_arguments, tracked_loader, write_json

SOURCE = "python -m train latent-stats"


class ChannelMoments:
    """Streaming per-channel count, mean and sum of squared deviations, in float64 (Chan et
    al.'s pairwise update of Welford's algorithm, one batch at a time)."""

    def __init__(self) -> None:
        self.count = 0
        self.mean = self.m2 = torch.zeros(0, dtype=torch.float64)

    def add(self, z: torch.Tensor) -> None:
        """Fold in latents [N, C, h, w]."""
        flat = z.detach().to("cpu", torch.float64).transpose(0, 1).reshape(z.shape[1], -1)
        n, mean = flat.shape[1], flat.mean(1)
        m2 = (flat - mean[:, None]).square().sum(1)
        if self.count == 0:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total, delta = self.count + n, mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.count * n / total)
        self.count = total

    def std(self) -> torch.Tensor:
        """Per-channel population standard deviation."""
        return (self.m2 / self.count).sqrt()

    def global_std(self) -> float:
        """The standard deviation of all channels' values together (every channel has `count`)."""
        spread = self.m2 / self.count + (self.mean - self.mean.mean()).square()
        return math.sqrt(spread.mean().item())


@torch.no_grad()
def latent_moments(model: AutoencoderKL, batches: Iterable[dict], device: torch.device,
                   seed: int) -> tuple[ChannelMoments, ChannelMoments, int]:
    """Moments of posterior samples (one seeded generator, drawn batch by batch) and of
    posterior means over `batches`, and the number of maps."""
    generator = torch.Generator(device=device).manual_seed(seed)
    samples, means, maps = ChannelMoments(), ChannelMoments(), 0
    for batch in batches:
        posterior = model.encode(batch["image"].to(device))
        samples.add(posterior.sample(generator))
        means.add(posterior.mean)
        maps += posterior.mean.shape[0]
    return samples, means, maps


def _floats(values: torch.Tensor) -> list[float]:
    return [float(v) for v in values]


def stats_document(samples: ChannelMoments, means: ChannelMoments, maps: int,
                   loaded: LoadedRun, split: str, seed: int) -> dict:
    """What is stored under `latent_stats`: plain floats, lists and strings (weights_only)."""
    std = samples.global_std()
    if not math.isfinite(std) or std == 0:
        raise CheckpointError(f"{loaded.path}: the latents' std over the {split} split is {std}: "
                              "the network's latents are constant or not finite")
    data = loaded.run.data
    return {"scale_factor": 1.0 / std, "global_std": std,
            "latents_mean": _floats(samples.mean), "latents_std": _floats(samples.std()),
            "mean_of_means": _floats(means.mean), "std_of_means": _floats(means.std()),
            "global_std_of_means": means.global_std(),
            "split": split, "maps": maps, "seed": seed, "weights": loaded.weights,
            "step": loaded.step, "source": SOURCE,
            "data": {"name": data.name, "root": data.root, "num_maps": data.num_maps,
                     "image_size": data.image_size}}


def compute_latent_stats(ckpt: str | Path, split: str = "train", cfg: str | Path | None = None,
                         overrides: Sequence[str] = (), max_maps: int | None = None,
                         seed: int = 0) -> tuple[LoadedRun, dict]:
    """Encode the split's whole maps (with `max_maps`, the subset spanning its maps that
    validation and eval use) with the checkpoint's EMA weights, posterior samples seeded
    `seed`; returns the checkpoint and the statistics."""
    loaded = load_run(ckpt, cfg, overrides)
    dataset = whole_maps(loaded.run.data, split)
    if max_maps is not None:
        dataset = validation_subset(dataset, max_maps, loaded.run.data.seed)
    batches = tracked_loader(loaded.run, dataset, f"latent-stats {split}")
    samples, means, maps = latent_moments(loaded.model, batches, loaded.device, seed)
    if maps == 0:
        raise DataError(f"the {split} split holds no maps")
    return loaded, stats_document(samples, means, maps, loaded, split, seed)


def store_latent_stats(loaded: LoadedRun, stats: dict, out: str | Path) -> Path:
    """Write the checkpoint with `latent_stats` added to `out` (atomically: temp file +
    rename); `out` may be the checkpoint itself, never a bundled model (refuse_bundled)."""
    return save_checkpoint(out, {**loaded.contents, LATENT_STATS_KEY: stats})


def format_stats(stats: dict, config_scale: float) -> str:
    """A Markdown table per channel, and the recommended scale factor."""
    lines = ["| channel | sample mean | sample std | mean of means | std of means |",
             "|---|---|---|---|---|"]
    columns = zip(stats["latents_mean"], stats["latents_std"], stats["mean_of_means"],
                  stats["std_of_means"])
    lines += [f"| {c} | " + " | ".join(f"{v:.6g}" for v in row) + " |"
              for c, row in enumerate(columns)]
    lines.append(f"{stats['maps']} {stats['split']} maps ({stats['weights']} weights, samples "
                 f"seeded {stats['seed']}): global sample std {stats['global_std']:.6g} -> "
                 f"scale_factor {stats['scale_factor']:.6g} (config: {config_scale})")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train latent-stats", allow_abbrev=False,
                                description="Per-channel mean/std of a checkpoint's latents "
                                            "(EMA weights) over a split, and scale_factor = "
                                            "1 / std; with --out, stored in a copy of the "
                                            "checkpoint.")
    add_split_arguments(p, "train")
    p.add_argument("--seed", type=int, default=0, help="seed of the posterior samples "
                   "(default %(default)s)")
    p.add_argument("--out", metavar="FILE", help="write the checkpoint with the statistics "
                   "added (key latent_stats) to FILE, which may be the checkpoint itself but "
                   "not a bundled model (default: write nothing)")
    return p


def command(argv: list[str], user_errors: tuple[type[Exception], ...]) -> int:
    """Run `python -m train latent-stats ARGV`; a user error prints one line and returns 2."""
    args = build_parser().parse_args(argv)
    try:
        if args.out:
            refuse_bundled(args.out)  # before minutes of encoding, not after
        loaded, stats = compute_latent_stats(args.ckpt, args.split, args.cfg, args.overrides,
                                             args.max_maps, args.seed)
        written = store_latent_stats(loaded, stats, args.out) if args.out else None
    except user_errors as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_stats(stats, loaded.run.model.scale_factor))
    print(f"wrote {written} ({loaded.path} with {LATENT_STATS_KEY})" if written
          else f"nothing written: --out FILE stores them in a copy of {loaded.path}")
    write_json(stats, args.json)
    return 0
