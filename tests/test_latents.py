"""`python -m export latents`: shards of a small synthetic split, their loader, resume after a
kill, and a 2-process torchrun that writes every map exactly once."""
from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from export.__main__ import main as export_main
from export.latent_shards import LatentShardError, LatentShards
from model.loading import load
from model.run_config import load_config
from radiomaps import build_dataset
from tests.test_export import write_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
DATA = ["data.name=synthetic", "data.num_maps=24", "data.num_tx=3", "data.image_size=[64,64]",
        "data.num_workers=0"]  # train split: 17 maps x 3 transmitters = 51 items


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("lat") / "model-7.pt", seed=1)


def _job(ckpt, out, *extra, path="default") -> list[str]:
    return ["latents", "--ckpt", str(ckpt), "--split", "train", "--out", str(out),
            "--shard-size", "8", "--path", path, *extra, *DATA]


def _shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*.safetensors"))}


def _dataset():
    return build_dataset(load_config("quickstart.yaml", DATA).data, "train")


@pytest.fixture(scope="module")
def written(ckpt, tmp_path_factory):
    """One uninterrupted run, at the one thread the subprocess runs below use: oneDNN may
    split its sums by thread count, so bytes are only promised at equal thread counts."""
    out, threads = tmp_path_factory.mktemp("written"), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert export_main(_job(ckpt, out)) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def test_shards_round_trip_the_posterior_of_every_map(written, ckpt):
    shards, data = LatentShards(written), _dataset()
    assert len(shards) == len(data) == 51
    assert len(shards.index["shards"]) == 7 and shards.index["latent_shape"] == [3, 16, 16]
    ae = load(ckpt).model
    for i in (0, 9, 50):
        item = shards[i]
        assert (item["map_id"], item["tx"]) == data.locate(i) and item["item"] == i
        with torch.no_grad():
            mean = ae.encode(to_model_batch(data[i]["image"])).mean[0]
        assert torch.allclose(item["latent"], mean, atol=1e-4)
    for path in [*written.glob("shard-*"), written / "index.json"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path  # safetensors alone: 0600
    index = json.loads((written / "index.json").read_text())
    assert index["checkpoint_sha256"] and index["weights"] == "ema" and index["split"] == "train"
    assert index["latent_scaling"]["scale_factor"] == 0.3  # no latent-stats run: the config's


def to_model_batch(image: torch.Tensor) -> torch.Tensor:
    return image[None]  # dataset items are already in the network's [-1, 1] range


def test_loader_samples_reproducibly_and_scales(written):
    a, b = LatentShards(written, sample=True, seed=5), LatentShards(written, sample=True, seed=5)
    assert torch.equal(a[3]["latent"], b[3]["latent"])
    assert not torch.equal(a[3]["latent"], LatentShards(written)[3]["latent"])
    a.set_epoch(1)
    assert not torch.equal(a[3]["latent"], b[3]["latent"])  # a fresh draw each epoch
    scaled = LatentShards(written, scaled=True)
    assert torch.allclose(scaled[3]["latent"], 0.3 * LatentShards(written)[3]["latent"])
    loader = torch.utils.data.DataLoader(LatentShards(written), batch_size=16)
    assert next(iter(loader))["latent"].shape == (16, 3, 16, 16)  # straight into an LDM loop


def test_scaled_latents_are_the_servers_scaled_latents_unless_per_channel_is_asked(written):
    """scaled=True multiplies by the one scale factor, as /encode?scaled=true and RadioDiff do,
    also when the index holds per-channel statistics; per_channel=True standardises instead."""
    raw = LatentShards(written)[3]["latent"]
    stats = {"scale_factor": 0.25, "latents_mean": [0.1, -0.2, 0.3], "latents_std": [2.0, 4.0, 0.5]}
    default, per_channel = LatentShards(written, scaled=True), LatentShards(written, scaled=True,
                                                                            per_channel=True)
    for shards in default, per_channel:
        shards.index["latent_scaling"] = stats  # as after `train latent-stats`
    assert torch.allclose(default[3]["latent"], 0.25 * raw)
    mean, std = torch.tensor([0.1, -0.2, 0.3]).view(3, 1, 1), torch.tensor([2.0, 4.0, 0.5]).view(3, 1, 1)
    assert torch.allclose(per_channel[3]["latent"], (raw - mean) / std)
    for shards in default, per_channel:
        assert torch.allclose(shards.unscale(shards[3]["latent"]), raw, atol=1e-6)


def test_an_altered_shard_is_named(written, tmp_path):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(written, copy)
    (copy / "shard-00002.safetensors").write_bytes(b"\0" * 64)
    with pytest.raises(LatentShardError, match="shard-00002.safetensors: SHA-256 differs"):
        LatentShards(copy)


def test_killed_and_resumed_job_writes_identical_shards(written, ckpt, tmp_path):
    cmd = [sys.executable, "-m", "export", *_job(ckpt, tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (tmp_path / "shard-00001.json").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "index.json").exists()  # killed before the end
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert " kept" in done.stdout and not done.stdout.startswith("rank 0: 0 shards written")
    assert _shard_bytes(tmp_path) == _shard_bytes(written)


@pytest.mark.server
def test_two_torchrun_ranks_write_every_map_exactly_once(written, ckpt, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "export", *_job(ckpt, tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "rank 0:" in out.stdout and "rank 1:" in out.stdout
    items = torch.cat([LatentShards(tmp_path)._shards[k]["item"] for k in range(7)])
    assert sorted(items.tolist()) == list(range(51))
    assert _shard_bytes(tmp_path) == _shard_bytes(written)  # the same bytes as one process


def test_another_job_in_the_same_folder_is_refused(written, ckpt, capsys):
    assert export_main(_job(ckpt, written, "--store", "sample")) == 2
    assert "holds latents of another job (differs in seed, store)" in capsys.readouterr().err


def test_the_measured_path_is_decided_once_and_kept(ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RADIODIFF_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "auto"
    assert export_main(_job(ckpt, out, path="auto")) == 0
    err = capsys.readouterr().err  # progress off a terminal: the autotuner's rows, the maps
    assert " INFO [" in err and "autotune: 1/" in err and "autotune: chose encode " in err
    assert "latents train rank 0: 51/51 maps (100%)" in err
    held = json.loads((out / "job.json").read_text())["path"]
    assert "winograd" not in held and list((tmp_path / "cache").rglob("*.json"))  # measured
    (out / "index.json").unlink()
    (out / "shard-00003.json").unlink()  # as if killed: a rerun with auto takes the held path
    assert export_main(_job(ckpt, out, path="auto")) == 0
    assert "1 shards written (8 maps, " in capsys.readouterr().out
    assert json.loads((out / "job.json").read_text())["path"] == held
    other = "fp32" if held != "fp32" else "fp32+channels_last"
    assert export_main(_job(ckpt, out, path=other)) == 2
    assert "differs in path" in capsys.readouterr().err


def test_a_job_folder_without_a_recorded_path_is_refused(written, ckpt, tmp_path, capsys):
    import shutil
    old = tmp_path / "old"
    shutil.copytree(written, old)
    job = json.loads((old / "job.json").read_text())
    del job["path"]  # as the version before paths were recorded wrote it
    (old / "job.json").write_text(json.dumps(job))
    assert export_main(_job(ckpt, old)) == 2
    assert "recorded no inference path" in capsys.readouterr().err


def test_timing_dependent_or_unknown_paths_are_refused(ckpt, tmp_path, capsys):
    assert export_main(_job(ckpt, tmp_path, path="winograd+matmul_1x1")) == 2
    assert "Winograd picks its kernel per layer by timing" in capsys.readouterr().err
    assert export_main(_job(ckpt, tmp_path, path="fp32+warp_drive")) == 2
    assert "unknown path part 'warp_drive'" in capsys.readouterr().err
