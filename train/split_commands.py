"""What the commands that run a checkpoint over a data split share (`eval`, `latent-stats`,
`latent-check`): their options, in-order loaders over the split, and `--json`. The checkpoint
and its run config: model.run_config.load_run; the split's maps: radiomaps.whole_maps."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from torch.utils.data import DataLoader, Dataset

from model.run_config import RunConfig
from radiomaps import build_loader
from runtime.arguments import positive_int
from runtime.progress import track


def add_split_arguments(p: argparse.ArgumentParser, split: str) -> None:
    """The options of a command that runs a checkpoint over a split (`eval`, `latent-stats`)."""
    p.add_argument("--ckpt", required=True, help="a model-N.pt file, a run directory or a "
                   "bundled name (reference)")
    p.add_argument("--split", default=split, choices=["train", "val", "test"])
    p.add_argument("--cfg", help="config for the data (and the model, for upstream checkpoints); "
                   "default: the config stored in the checkpoint")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--max-maps", type=positive_int, help="only this many maps, the seeded subset "
                   "spanning the split that validation uses (default: the whole split)")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON to FILE "
                   "(`-`: to stdout, after the table)")


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
