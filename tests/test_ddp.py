import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from model.checkpoint import read_checkpoint
from model.loading import load
from tests.test_trainer import steps, tiny_run
from train.logging import read_metrics

pytestmark = pytest.mark.server
REPO = Path(__file__).resolve().parent.parent


def test_two_process_gloo_run_trains_and_only_rank0_writes(tmp_path):
    raw = tiny_run(tmp_path, train_num_steps=4, save_and_sample_every=2, batch_size=1)
    raw["model"]["lossconfig"]["disc_start"] = 2  # both DDP modules (autoencoder and critic)
    # ActNorm initialises from each rank's own first batch: the hard case for replica agreement,
    # which the trainer checks (bitwise) at every checkpoint.
    raw["model"]["lossconfig"]["use_actnorm"] = True
    raw["trainer"]["gradient_accumulate_every"] = 2  # and no_sync on the first micro-batch
    cfg = tmp_path / "ddp.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    proc = _torchrun_two_ranks(cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("done: 4 steps") == 1  # rank 0 alone reports
    run_dir = tmp_path / "run"
    records = read_metrics(run_dir)
    # one line per logged step: rank 1 wrote none (it would have duplicated every line)
    assert [r["step"] for r in records if "train/total_loss" in r] == [0, 1, 2, 3]
    assert [r["step"] for r in records if "val/psnr" in r] == [2, 4]
    assert len(list(run_dir.glob("events.out.tfevents.*"))) <= 1
    logged = steps(run_dir)
    assert logged[3]["train/disc_factor"] == 1 and "train/disc_loss" in logged[3]
    ckpt = read_checkpoint(run_dir / "model-2.pt")
    assert ckpt["step"] == 4 and len(ckpt["rng"]) == 2  # each rank's RNG, for resume
    assert not any(k.startswith("module.") or ".module." in k for k in ckpt["model"])
    model = load(run_dir).model
    out = model(torch.zeros(1, 1, 32, 32), sample_posterior=False)[0]
    assert torch.isfinite(out).all()


def test_two_process_gloo_run_keeps_a_learned_logvar_equal_on_both_ranks(tmp_path):
    """`learn_logvar: true` trains logvar with the autoencoder: inside its DDP wrapper, so its
    gradient is all-reduced. Each rank sees other maps, so without that the two logvars drift
    apart, which the replica checksum (logvar included) stops with exit 1 at the first
    checkpoint."""
    raw = tiny_run(tmp_path, train_num_steps=4, save_and_sample_every=2, batch_size=1)
    raw["model"]["lossconfig"]["learn_logvar"] = True
    cfg = tmp_path / "logvar.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    proc = _torchrun_two_ranks(cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "DDP: 2 processes, gloo backend, one cpu device each" in proc.stdout
    logvars = [float(read_checkpoint(tmp_path / "run" / f"model-{m}.pt")["model"]["loss.logvar"])
               for m in (1, 2)]
    assert 0.0 != logvars[0] != logvars[1]  # it was learned, and checked equal at each save


def _torchrun_two_ranks(cfg) -> subprocess.CompletedProcess:
    """`python -m train --cfg cfg` on two gloo ranks under torchrun, one thread each."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "train", "--cfg", str(cfg)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
