"""The on-disk format of encoded latents (`python -m export latents`) and a Dataset over it.

    DIR/index.json                 the job: checkpoint and its SHA-256, data, split, what is
                                   stored, latent shape and statistics, every shard
    DIR/shard-00000.safetensors    `mean`, `logvar` (posterior) or `latent` (one sample) as
                                   float32 [n, C, h, w], and `map_id`, `tx`, `item` as int64 [n]
    DIR/shard-00000.json           that shard's item range, count and SHA-256 (its receipt)

An LDM training loop reads it with `LatentShards(DIR)`: items are dicts with `latent`
([C, h, w], the posterior mean, a fresh sample, or the stored sample), `map_id`, `tx`, `item`.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch.utils.data import Dataset

from model.manifest import sha256_file, write_json_atomic, write_safetensors

FORMAT = "radiodiff-latents/1"
INDEX = "index.json"


class LatentShardError(ValueError):
    """A latents folder is missing, incomplete or altered; the message names the file."""


def shard_name(k: int) -> str:
    return f"shard-{k:05d}"


def write_shard(folder: Path, k: int, tensors: dict[str, torch.Tensor], items: range) -> dict:
    """Write shard k (tensors, then its receipt, each atomically); return the receipt."""
    final = write_safetensors(folder / f"{shard_name(k)}.safetensors", tensors)  # 0644
    receipt = {"shard": k, "first": items.start, "stop": items.stop, "count": len(items),
               "file": final.name, "sha256": sha256_file(final)}
    write_json_atomic(folder / f"{shard_name(k)}.json", receipt)
    return receipt


def finished_receipt(folder: Path, k: int, items: range) -> dict | None:
    """Shard k's receipt when the shard is complete and unchanged, else None."""
    receipt_path = folder / f"{shard_name(k)}.json"
    if not receipt_path.exists():
        return None
    receipt = json.loads(receipt_path.read_text())
    shard = folder / receipt.get("file", "")
    if (receipt.get("first"), receipt.get("stop")) != (items.start, items.stop) \
            or not shard.is_file() or sha256_file(shard) != receipt.get("sha256"):
        return None
    return receipt


class LatentShards(Dataset):
    """Latents written by `python -m export latents`, one item per map.

    `sample`: with a stored posterior, draw z = mean + std * eps (seeded per item by `seed`
    and the epoch given to `set_epoch`) instead of returning the mean. `scaled`: multiply by
    the stored scale_factor (1 / the global std when measured), as the LDM sees latents: what
    the server's `scaled=true` and RadioDiff's LDM do, so latents an LDM makes this way decode
    with /decode?scaled=true. `per_channel=True` standardises each channel instead,
    (z - latents_mean) / latents_std, when the index has those statistics; such latents decode
    only after `unscale` (with scaled=false). `unscale` inverts either scaling.
    """

    def __init__(self, folder: str | Path, sample: bool = False, scaled: bool = False,
                 seed: int = 0, verify: bool = True, per_channel: bool = False):
        self.folder = Path(folder)
        index_path = self.folder / INDEX
        if not index_path.exists():
            raise LatentShardError(f"{index_path}: not found (the latents job writes it when "
                                   "every shard is done; rerun it to finish)")
        self.index = json.loads(index_path.read_text())
        if self.index.get("format") != FORMAT:
            raise LatentShardError(f"{index_path}: format {self.index.get('format')!r}, "
                                   f"expected {FORMAT!r}")
        self.sample, self.scaled, self.seed, self.epoch = sample, scaled, seed, 0
        self.per_channel = per_channel
        if sample and self.index["store"] != "posterior":
            raise LatentShardError(f"{self.folder}: sample=True needs a stored posterior; this "
                                   f"folder stores {self.index['store']!r}")
        self._shards = [self._load(entry, verify) for entry in self.index["shards"]]
        self._starts = [entry["first"] for entry in self.index["shards"]]

    def _load(self, entry: dict, verify: bool) -> dict[str, torch.Tensor]:
        path = self.folder / entry["file"]
        if not path.is_file():
            raise LatentShardError(f"{path}: shard missing")
        if verify and sha256_file(path) != entry["sha256"]:
            raise LatentShardError(f"{path}: SHA-256 differs from {INDEX}: the shard was "
                                   "altered; rerun the latents job to rewrite it")
        return load_file(str(path))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return int(self.index["count"])

    def _locate(self, i: int) -> tuple[dict[str, torch.Tensor], int]:
        if not 0 <= i < len(self):
            raise IndexError(f"item {i} out of range for {len(self)} latents")
        k = max(j for j, start in enumerate(self._starts) if start <= i)
        return self._shards[k], i - self._starts[k]

    def __getitem__(self, i: int) -> dict:
        shard, row = self._locate(i)
        if "latent" in shard:
            z = shard["latent"][row]
        elif self.sample:
            gen = torch.Generator().manual_seed(hash((self.seed, self.epoch, i)) & (2 ** 63 - 1))
            std = torch.exp(0.5 * shard["logvar"][row].clamp(-30.0, 20.0))
            z = shard["mean"][row] + std * torch.randn(std.shape, generator=gen)
        else:
            z = shard["mean"][row]
        return {"latent": self._scale(z), "map_id": int(shard["map_id"][row]),
                "tx": int(shard["tx"][row]), "item": int(shard["item"][row])}

    def _shift_and_scale(self) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        """(shift, scale): the scaled latent is (z - shift) * scale, per channel or global."""
        scaling = self.index["latent_scaling"]
        if self.per_channel and scaling.get("latents_mean") is not None:
            mean = torch.tensor(scaling["latents_mean"]).view(-1, 1, 1)
            return mean, 1.0 / torch.tensor(scaling["latents_std"]).view(-1, 1, 1)
        return 0.0, float(scaling["scale_factor"])

    def _scale(self, z: torch.Tensor) -> torch.Tensor:
        if not self.scaled:
            return z
        shift, scale = self._shift_and_scale()
        return (z - shift) * scale

    def unscale(self, z: torch.Tensor) -> torch.Tensor:
        """Latents as this loader scales them ([..., C, h, w]) back to the VAE's own."""
        if not self.scaled:
            return z
        shift, scale = self._shift_and_scale()
        return z / scale + shift
