"""A checkpoint with the run config it goes with, ready to run over a data split (`eval`,
`latent-stats`)."""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from model.autoencoder import AutoencoderKL
from model.checkpoint import (CheckpointError, load_into, network_state_dict, read_checkpoint,
                              resolve_checkpoint)
from train.config import RunConfig, load_config
from runtime.progress import track
from train.data import RadioMapDataset, build_dataset, build_loader


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a number >= 0."""
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def add_split_arguments(p: argparse.ArgumentParser, split: str) -> None:
    """The options of a command that runs a checkpoint over a split (`eval`, `latent-stats`)."""
    p.add_argument("--ckpt", required=True, help="a model-N.pt file or a run directory")
    p.add_argument("--split", default=split, choices=["train", "val", "test"])
    p.add_argument("--cfg", help="config for the data (and the model, for upstream checkpoints); "
                   "default: the config stored in the checkpoint")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--max-maps", type=positive_int, help="only this many maps, the seeded subset "
                   "spanning the split that validation uses (default: the whole split)")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON to FILE "
                   "(`-`: to stdout, after the table)")


@dataclass
class LoadedCheckpoint:
    """The network of a checkpoint (eval mode, on `device`) and the run config it is used with."""
    path: Path
    state: dict
    run: RunConfig
    model: AutoencoderKL
    device: torch.device
    weights: str  # "ema" or "model"


def load_checkpoint_run(ckpt: str | Path, cfg: str | Path | None = None,
                        overrides: Sequence[str] = (), use_ema: bool = True) -> LoadedCheckpoint:
    """Read a checkpoint (file or run directory) and build its network; the run config is `cfg`
    if given, else the one the checkpoint stores."""
    path = resolve_checkpoint(ckpt)
    state = read_checkpoint(path)
    if cfg is None and not isinstance(state.get("config"), dict):
        raise CheckpointError(f"{path}: the checkpoint stores no config (an upstream file?): "
                              "pass --cfg first_radio.yaml (or the YAML it was trained with)")
    run = load_config(cfg if cfg is not None else state["config"], list(overrides))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoencoderKL.from_config(run.model)
    load_into(model, network_state_dict(state, use_ema), path)
    model.to(device).eval()
    weights = "ema" if use_ema and isinstance(state.get("ema"), dict) else "model"
    return LoadedCheckpoint(path, state, run, model, device, weights)


def whole_maps(run: RunConfig, split: str) -> RadioMapDataset:
    """The split's whole maps: no flips or crops, whatever the training config augments."""
    return build_dataset(replace(run.data, hflip=False, crop_size=None), split)


def split_loader(run: RunConfig, dataset: Dataset) -> DataLoader:
    """An in-order loader over every item of `dataset` (no shuffling, no dropped batch)."""
    return build_loader(dataset, run.batch_size, shuffle=False,
                        num_workers=run.data.num_workers, drop_last=False)


def tracked_loader(run: RunConfig, dataset: Dataset, desc: str):
    """`split_loader`'s batches, with progress in maps (runtime/progress.py)."""
    return track(split_loader(run, dataset), len(dataset), desc, "maps",
                 count=lambda batch: len(batch["image"]))


def write_json(results: dict, dest: str | None) -> None:
    """`--json FILE`: the results as JSON in FILE; `-`: on stdout; None: nowhere."""
    if dest is None:
        return
    text = json.dumps(results, indent=2)
    if dest == "-":
        print(text)
    else:
        Path(dest).write_text(text + "\n")
