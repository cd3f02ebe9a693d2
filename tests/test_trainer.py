import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from model.checkpoint import load_autoencoder, read_checkpoint
from train.__main__ import main
from train.config import TrainerConfig, load_config
from train.data import build_dataset
from train.ema import EMA
from train.logging import read_metrics
from train.schedule import lr_multiplier
from train.trainer import Trainer, TrainingDiverged

REPO = Path(__file__).resolve().parent.parent


def tiny_run(tmp_path: Path, **trainer) -> dict:
    """A raw run config: the tiny network at 32x32 on 8 synthetic cities x 2 transmitters."""
    return {
        "model": {"embed_dim": 3,
                  "lossconfig": {"disc_start": 1000, "perceptual_weight": 0.0},
                  "ddconfig": {"resolution": [32, 32], "ch": 32, "ch_mult": [1, 2, 4],
                               "num_res_blocks": 1}},
        "data": {"name": "synthetic", "num_maps": 8, "num_tx": 2, "image_size": [32, 32],
                 "num_workers": 0},
        "trainer": {"lr": 1e-3, "min_lr": 1e-4, "batch_size": 2, "train_num_steps": 4,
                    "save_and_sample_every": 2, "log_freq": 1, "val_batches": 1,
                    "num_samples": 2, "ema_update_after_step": 1, "ema_update_every": 1,
                    "results_folder": str(tmp_path / "run"), **trainer},
    }


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on a shared 2-core box, two spinning OpenMP threads per process
    make each step 10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data():
    cfg = load_config(tiny_run(Path("unused")))
    train, val = build_dataset(cfg.data, "train"), build_dataset(cfg.data, "val")
    for ds in (train, val):  # generate (and cache) the synthetic maps once for the module
        for i in range(len(ds)):
            ds[i]
    return train, val


def run(raw: dict, data, resume: Path | None = None) -> Trainer:
    trainer = Trainer(load_config(raw), *data)
    if resume is not None:
        trainer.resume(resume)
    assert trainer.train() is None
    return trainer


def steps(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run_dir) if "train/total_loss" in r}


def _disc(state: dict) -> dict:
    return {k: v for k, v in state.items() if k.startswith("loss.discriminator.")}


def _net(state: dict) -> dict:
    return {k: v for k, v in state.items() if not k.startswith("loss.")}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_phase1_leaves_the_critic_alone_and_phase2_trains_both(tmp_path, data):
    raw = tiny_run(tmp_path)
    raw["model"]["lossconfig"].update(disc_start=2, perceptual_weight=1.0, allow_random_lpips=True)
    trainer = Trainer(load_config(raw), *data)
    init = {f"loss.{k}": v.clone() for k, v in trainer.loss.state_dict().items()}
    init.update({k: v.clone() for k, v in trainer.model.state_dict().items()})
    trainer.train()
    run_dir = tmp_path / "run"
    first, second = read_checkpoint(run_dir / "model-1.pt"), read_checkpoint(run_dir / "model-2.pt")
    assert first["step"] == 2 and second["step"] == 4
    # phase 1 (steps 0, 1): the critic is bit-identical, BatchNorm statistics included
    assert _same(_disc(first["model"]), _disc(init))
    assert first["opt_disc"]["state"] == {}
    assert not _same(_net(first["model"]), _net(init))
    # phase 2 (steps 2, 3): both move
    assert not _same(_disc(second["model"]), _disc(first["model"]))
    assert not _same(_net(second["model"]), _net(first["model"]))
    logged = steps(run_dir)
    for s in (0, 1):
        assert logged[s]["train/disc_factor"] == 0 and logged[s]["train/d_weight"] == 0
        assert "train/disc_loss" not in logged[s] and "train/g_loss" not in logged[s]
    for s in (2, 3):
        assert logged[s]["train/disc_factor"] == 1 and logged[s]["train/d_weight"] > 0
        assert {"train/g_loss", "train/disc_loss", "train/logits_real",
                "train/logits_fake"} <= logged[s].keys()
    # upstream layout: LPIPS, critic and logvar under loss.; EMA under ema_model.
    assert "loss.perceptual_loss.lin0.model.1.weight" in second["model"]
    assert "loss.logvar" in second["model"]
    assert "ema_model.decoder.conv_out.weight" in second["ema"]
    assert second["config"]["model"]["lossconfig"]["disc_start"] == 2
    ema = load_autoencoder(run_dir / "model-2.pt")  # no config argument needed
    assert torch.equal(ema.decoder.conv_out.weight, second["ema"]["ema_model.decoder.conv_out.weight"])
    assert (run_dir / "sample-2.png").is_file()
    val = [r for r in read_metrics(run_dir) if "val/psnr" in r]
    assert [r["step"] for r in val] == [2, 4] and all(r["val/psnr"] > 0 for r in val)


def test_accumulating_two_batches_of_one_equals_one_batch_of_two(tmp_path, data):
    # One step each: the gradients the optimizer steps with must agree. (After more steps Adam
    # turns float round-off in analytically-zero gradients, e.g. conv biases before GroupNorm,
    # into +-lr updates, so later weights are no fair comparison.)
    a = run(tiny_run(tmp_path / "a", batch_size=2, gradient_accumulate_every=1,
                     train_num_steps=1), data)
    b = run(tiny_run(tmp_path / "b", batch_size=1, gradient_accumulate_every=2,
                     train_num_steps=1), data)
    la, lb = steps(tmp_path / "a" / "run")[0], steps(tmp_path / "b" / "run")[0]
    for term in ("train/total_loss", "train/nll_loss", "train/rec_loss", "train/kl_loss"):
        assert la[term] == pytest.approx(lb[term], rel=1e-5), term
    ga = torch.cat([p.grad.flatten() for p in a.model.parameters()])
    gb = torch.cat([p.grad.flatten() for p in b.model.parameters()])
    assert (ga - gb).norm() < 1e-4 * ga.norm()  # biases before GroupNorm hold only round-off
    assert a.model.decoder.conv_out.weight.grad.abs().max() > 1e-3  # a real gradient


def test_gradient_checkpointing_trains_the_same_first_step(tmp_path, data):
    a = run(tiny_run(tmp_path / "a", train_num_steps=1), data)
    b = run(tiny_run(tmp_path / "b", train_num_steps=1, gradient_checkpointing=True), data)
    assert b.model.decoder.gradient_checkpointing and not a.model.decoder.gradient_checkpointing
    la, lb = steps(tmp_path / "a" / "run")[0], steps(tmp_path / "b" / "run")[0]
    assert la["train/total_loss"] == pytest.approx(lb["train/total_loss"], rel=1e-6)
    ga = torch.cat([p.grad.flatten() for p in a.model.parameters()])
    gb = torch.cat([p.grad.flatten() for p in b.model.parameters()])
    assert (ga - gb).norm() < 1e-4 * ga.norm()


def test_resume_after_a_kill_gives_the_same_next_losses(tmp_path, data):
    raw = tiny_run(tmp_path / "full", train_num_steps=6, save_and_sample_every=3)
    raw["model"]["lossconfig"]["disc_start"] = 2  # resume inside phase 2: critic state matters
    run(raw, data)
    full = tmp_path / "full" / "run"
    # A run killed after step 4 leaves model-1.pt (step 3) and log lines up to step 4.
    killed = tmp_path / "killed" / "run"
    killed.mkdir(parents=True)
    shutil.copy(full / "model-1.pt", killed / "model-1.pt")
    lines = (full / "metrics.jsonl").read_text().splitlines()
    kept = [line for line in lines if json.loads(line)["step"] <= 4]
    (killed / "metrics.jsonl").write_text("\n".join(kept) + "\n")
    raw["trainer"]["results_folder"] = str(killed)
    run(raw, data, resume=killed / "model-1.pt")
    a, b = steps(full), steps(killed)
    assert sorted(b) == list(range(6))  # every step logged once
    for s in (3, 4, 5):
        assert a[s] == {**b[s], "it_per_s": a[s]["it_per_s"]}  # bit-for-bit losses
    end_a, end_b = read_checkpoint(full / "model-2.pt"), read_checkpoint(killed / "model-2.pt")
    assert _same(end_a["model"], end_b["model"]) and _same(end_a["ema"], end_b["ema"])


class NaNAfter(torch.utils.data.Dataset):
    """A real dataset whose items turn NaN after `good` reads (num_workers=0)."""

    def __init__(self, dataset, good: int):
        self.dataset, self.good, self.reads = dataset, good, 0

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        item = dict(self.dataset[i])
        self.reads += 1
        if self.reads > self.good:
            item["image"] = torch.full_like(item["image"], float("nan"))
        return item


def test_nan_loss_stops_naming_step_and_term_and_keeps_the_checkpoint(tmp_path, data):
    raw = tiny_run(tmp_path, train_num_steps=10)
    trainer = Trainer(load_config(raw), NaNAfter(data[0], good=6), data[1])  # batch 2: steps 0-2 ok
    with pytest.raises(TrainingDiverged) as err:
        trainer.train()
    message = str(err.value)
    assert message.startswith("step 3:") and "train/rec_loss = nan" in message
    assert "model-1.pt" in message
    run_dir = tmp_path / "run"
    assert sorted(p.name for p in run_dir.glob("model-*.pt")) == ["model-1.pt"]
    ckpt = read_checkpoint(run_dir / "model-1.pt")
    assert ckpt["step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_sigterm_saves_a_checkpoint_and_resume_continues(tmp_path):
    raw = tiny_run(tmp_path, train_num_steps=10_000, save_and_sample_every=10_000)
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "train", "--cfg", str(cfg_path)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 120
        while len(steps(run_dir)) < 2 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and "continue with --resume" in out
    ckpt = read_checkpoint(run_dir / "model-1.pt")
    assert ckpt["step"] == max(steps(run_dir)) + 1
    done = ckpt["step"]
    rc = main(["--cfg", str(cfg_path), f"trainer.train_num_steps={done + 1}", "--resume"])
    assert rc == 0
    assert read_checkpoint(run_dir / "model-1.pt")["step"] == done + 1
    assert sorted(steps(run_dir)) == list(range(done + 1))


def test_quickstart_loss_falls_and_leaves_checkpoint_samples_metrics_report(tmp_path, capsys):
    run_dir = tmp_path / "qs"
    rc = main(["--cfg", "quickstart.yaml", f"trainer.results_folder={run_dir}",
               "trainer.train_num_steps=12", "trainer.save_and_sample_every=12",
               "trainer.log_freq=1", "trainer.batch_size=2", "trainer.val_batches=1",
               "model.lossconfig.disc_start=9", "data.num_maps=8", "data.num_tx=2"])
    assert rc == 0
    rec = [r["train/rec_loss"] for r in steps(run_dir).values()]
    assert len(rec) == 12
    assert sum(rec[-4:]) / 4 < 0.8 * sum(rec[:4]) / 4
    assert {"model-1.pt", "sample-1.png", "metrics.jsonl", "config.yaml"} <= {
        p.name for p in run_dir.iterdir()}
    assert main(["report", str(run_dir)]) == 0
    page = (run_dir / "report.html").read_text()
    assert page.count("<img src='data:image/png;base64,") >= 12 + 4 + 1  # terms, val, grid
    assert "until step 9, phase 2" in page  # disc_start, also drawn on every curve
    capsys.readouterr()
    assert main(["eval", "--ckpt", str(run_dir), "--split", "test"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out[out.index("{"):])
    assert result["split"] == "test" and result["weights"] == "ema" and result["psnr"] > 5
    assert "| PSNR |" in out


def test_user_errors_exit_2_with_a_message(tmp_path, capsys):
    assert main(["--cfg", "quickstart.yaml", "trainer.bogus=1"]) == 2
    assert "unknown key trainer.bogus" in capsys.readouterr().err
    assert main(["--cfg", "quickstart.yaml", f"trainer.results_folder={tmp_path}",
                 "trainer.resume_milestone=3"]) == 2
    assert f"{tmp_path / 'model-3.pt'}" in capsys.readouterr().err
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    try:
        assert main(["--cfg", "quickstart.yaml", "model.lossconfig.perceptual_weight=1.0"]) == 2
    finally:
        torch.hub.set_dir(old)
    err = capsys.readouterr().err
    assert "vgg16-397923af.pth" in err and "perceptual_weight: 0" in err
    assert main(["eval", "--ckpt", str(tmp_path / "none.pt")]) == 2
    assert main(["report", str(tmp_path / "nothing")]) == 2


def test_lr_schedule_floors_at_absolute_min_lr_after_warmup():
    cfg = TrainerConfig(lr=5e-6, min_lr=5e-7, train_num_steps=1000, warmup_steps=10)
    f = lr_multiplier(cfg)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(500) == pytest.approx(0.5 ** 0.95)
    assert 5e-6 * f(999) == pytest.approx(5e-7)  # upstream: 5e-6 * 5e-7 = 2.5e-12
    assert 5e-6 * f(1000) == pytest.approx(5e-7)


def test_ema_copies_during_warmup_then_averages():
    net = torch.nn.Linear(2, 1)
    ema = EMA(net, decay=0.9, update_every=1, update_after_step=1)
    for value, expected in ((1.0, 1.0), (2.0, 2.0), (3.0, 2.1)):  # steps 0, 1 copy; 2 averages
        torch.nn.init.constant_(net.weight, value)
        ema.update()
        assert ema.ema_model.weight[0, 0].item() == pytest.approx(expected)
    state = ema.state_dict()
    assert set(state) == {"ema_model.weight", "ema_model.bias", "step", "initted"}
    clone = EMA(copy.deepcopy(net), 0.9, 1, 1)
    clone.load_state_dict(state)
    assert clone.step == 3 and torch.equal(clone.ema_model.weight, ema.ema_model.weight)
