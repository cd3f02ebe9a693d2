"""`python -m export latents --ckpt RUN --split train --out DIR`: a data split encoded into
resumable latent shards for latent-diffusion training (format: export/latent_shards.py).

The data config is the checkpoint's own unless `--cfg` names one; dotted overrides apply
(`data.root=...`). Items are cut into shards of `--shard-size` maps in the split's order;
under torchrun rank r encodes shards r, r + W, r + 2W, ... (W ranks), so every map is written
exactly once whatever W is. (Training's DistributedSampler pads the last round by repeating
items, which here would encode maps twice.) A finished shard (its receipt exists and its
SHA-256 matches) is kept on a rerun; rank 0 writes index.json once all shards are there.

The inference path (`--path`, as the server's) is chosen by runtime.decision.choose() (this
module only builds the request), once, by rank 0 of the job's first run, and recorded in
job.json: every rank and every resume runs that path, so a resumed or sharded job writes the
bytes one uninterrupted run writes (at the same thread count: oneDNN may split its sums by
thread). The request is reproducible: paths whose kernels are chosen by timing (Winograd) are
never taken, since two processes could time differently and round differently.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from model.checkpoint import CheckpointError
from model.config import ConfigError
from model.manifest import write_json_atomic
from model.run_config import load_run
from radiomaps import DataError, whole_maps
from runtime import distributed
from runtime.arguments import non_negative_float, positive_int
from runtime.decision import PathRefused, PathRequest, PathRequestError, choose
from runtime.progress import Progress, configure_logging

from .latent_shards import FORMAT, INDEX, finished_receipt, write_shard

STORES = ("posterior", "sample")


class LatentsJobError(ValueError):
    """The output folder holds another job, or the options contradict each other."""


def _job_description(args: argparse.Namespace, loaded, dataset) -> dict:
    """What decides the shards' content: a rerun must match it."""
    return {"format": FORMAT, "checkpoint": str(loaded.path),
            "checkpoint_sha256": loaded.sha256, "weights": loaded.weights,
            "split": args.split, "data": asdict(loaded.run.data), "store": args.store,
            "seed": args.seed if args.store == "sample" else None,
            "shard_size": args.shard_size, "count": len(dataset)}


def _request(args: argparse.Namespace, dataset) -> PathRequest:
    """--path as the request runtime.decision.choose() decides: at the split's map size,
    reproducible (no timing-dependent kernels), measuring within --autotune-budget."""
    size = tuple(dataset[0]["image"].shape[-2:])
    return PathRequest(size, args.path, reproducible=True, budget_s=args.autotune_budget)


def _claim_folder(out: Path, job: dict, env, measure) -> dict:
    """Refuse a folder written by another job; record this one (rank 0, its path measured by
    `measure()` when --path auto); returns the job as recorded, path included."""
    path = out / "job.json"
    if not path.exists() and env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, {**job, "path": job["path"] or measure()})
    distributed.barrier(env)
    held = json.loads(path.read_text())
    if not held.get("path"):
        raise LatentsJobError(f"{path} was written by an older version that recorded no "
                              f"inference path, so a resume could mix paths; use another --out")
    differ = sorted(k for k in job if held.get(k) != job[k]
                    and not (k == "path" and job[k] is None))
    if differ:
        raise LatentsJobError(f"{out} holds latents of another job (differs in "
                              f"{', '.join(differ)}); use another --out")
    return held


def _encode_shard(engine, dataset, items: range, store: str, seed: int, batch: int) -> dict:
    """Encode items of one shard into the tensors of its file."""
    loader = DataLoader(Subset(dataset, list(items)), batch_size=batch, shuffle=False)
    parts: dict[str, list[torch.Tensor]] = {}
    for b, maps in enumerate(loader):
        posterior = engine.encode(maps["image"])
        if store == "posterior":
            values = {"mean": posterior.mean, "logvar": posterior.logvar}
        else:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + items.start + b * batch)
            noise = torch.randn(posterior.mean.shape, generator=gen)
            values = {"latent": posterior.mean + posterior.std * noise}
        for name, t in values.items():
            parts.setdefault(name, []).append(t.float().cpu())
    ids = [dataset.locate(i) for i in items]
    tensors = {name: torch.cat(ts) for name, ts in parts.items()}
    tensors["map_id"] = torch.tensor([m for m, _ in ids], dtype=torch.int64)
    tensors["tx"] = torch.tensor([t for _, t in ids], dtype=torch.int64)
    tensors["item"] = torch.tensor(list(items), dtype=torch.int64)
    return tensors


def _shards(count: int, size: int) -> list[range]:
    return [range(s, min(s + size, count)) for s in range(0, count, size)]


def run(args: argparse.Namespace) -> dict:
    """The whole job on this rank; returns what it did (rank 0: and the index)."""
    env = distributed.setup("auto")
    try:
        loaded = load_run(args.ckpt, args.cfg, args.overrides)
        dataset = whole_maps(loaded.run.data, args.split)
        out = Path(args.out)
        request = _request(args, dataset)
        try:  # the path a request pins (None: measured when the job starts, else the held)
            pinned = request.name(loaded.device)
        except PathRequestError as err:
            raise LatentsJobError(str(err)) from None
        job = {**_job_description(args, loaded, dataset), "path": pinned}
        job = _claim_folder(out, job, env, lambda: choose(loaded.model, loaded.device,
                                                          request).path("encode"))
        try:  # the accuracy gate on these weights, and the path recorded for every rank
            decision = choose(loaded.model, loaded.device, replace(request, path=job["path"]))
        except (PathRefused, PathRequestError) as err:
            raise LatentsJobError(f"--path {job['path']}: {err}") from None
        engine = decision.prepare(loaded.model, loaded.device, "encode")
        shards = _shards(len(dataset), args.shard_size)
        kept = written = encoded = 0
        start = time.perf_counter()
        mine = range(env.rank, len(shards), env.world_size)
        progress = Progress(sum(len(shards[k]) for k in mine), f"latents {args.split} rank "
                            f"{env.rank}", "maps")
        for k in mine:
            if finished_receipt(out, k, shards[k]) is not None:
                kept += 1
            else:
                tensors = _encode_shard(engine, dataset, shards[k], args.store, args.seed,
                                        args.batch_size)
                write_shard(out, k, tensors, shards[k])
                written, encoded = written + 1, encoded + len(shards[k])
            progress.update(len(shards[k]))
        progress.close()
        seconds = time.perf_counter() - start
        distributed.barrier(env)
        report = {"rank": env.rank, "shards_written": written, "shards_kept": kept,
                  "seconds": seconds, "maps_encoded": encoded,
                  "inference": engine.options.describe()}
        if env.is_main:
            report["index"] = _write_index(out, job, shards, loaded, dataset)
        return report
    finally:
        distributed.teardown(env)


def _write_index(out: Path, job: dict, shards: list[range], loaded, dataset) -> dict:
    receipts = [finished_receipt(out, k, items) for k, items in enumerate(shards)]
    missing = [k for k, r in enumerate(receipts) if r is None]
    if missing:
        raise LatentsJobError(f"{out}: shard {missing[0]} is missing or altered after the job "
                              f"({len(missing)} of {len(shards)}); rerun to finish")
    h, w = dataset[0]["image"].shape[-2:]
    f = loaded.model.downsample_factor
    shape = [loaded.run.model.embed_dim, h // f, w // f]
    index = {**job, "latent_shape": shape, "latent_scaling": loaded.scaling, "shards": receipts}
    write_json_atomic(out / INDEX, index)
    return index


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export latents", description=__doc__,
                                allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a model-N.pt, a run directory or a bundled "
                                                 "name (reference)")
    p.add_argument("--split", required=True, choices=["train", "val", "test"])
    p.add_argument("--out", required=True, help="folder for the shards (resumes one there)")
    p.add_argument("--cfg", help="config for the data; default: the checkpoint's own")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--store", choices=STORES, default="posterior",
                   help="posterior: mean and logvar (default); sample: one seeded sample")
    p.add_argument("--seed", type=int, default=0, help="the sample's seed (--store sample)")
    p.add_argument("--shard-size", type=positive_int, default=1024, help="maps per shard")
    p.add_argument("--batch-size", type=positive_int, default=8, help="maps per forward pass")
    p.add_argument("--path", default="auto", metavar="auto|default|NAME",
                   help="inference path: auto (default) measures the fastest encoder accurate "
                        "to 50 dB (recorded per machine, weights and size), default is the plain "
                        "fp32 network, NAME pins one (never Winograd; docs/performance.md); "
                        "decided on the job's first run and kept")
    p.add_argument("--autotune-budget", type=non_negative_float, default=60.0, metavar="S",
                   help="seconds --path auto may spend measuring when nothing is cached "
                        "(default 60)")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    configure_logging()  # the autotuner's line per candidate path, in the one log format
    try:
        report = run(args)
    except (CheckpointError, ConfigError, DataError, LatentsJobError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    rate = report["maps_encoded"] / max(report["seconds"], 1e-9)
    print(f"rank {report['rank']}: {report['shards_written']} shards written "
          f"({report['maps_encoded']} maps, {rate:.1f} maps/s, {report['inference']}), "
          f"{report['shards_kept']} kept")
    if "index" in report:
        index = report["index"]
        print(f"wrote {Path(args.out) / INDEX}: {index['count']} maps of the {args.split} split, "
              f"latents {index['latent_shape']} ({index['store']}), "
              f"{len(index['shards'])} shards")
    return 0
