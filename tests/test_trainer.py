import copy
import importlib.util
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

from model.autoencoder import AutoencoderKL
from model.checkpoint import CheckpointError, latest_checkpoint, read_checkpoint
from model.config import ConfigError
from model.loading import load
from model.run_config import DataConfig, TrainerConfig, load_config
from radiomaps import build_dataset
from runtime import distributed
from train.__main__ import main
from train.ema import EMA, ema_decay
from train.logging import read_metrics
from train.memory import GIB, choose_checkpointing, step_bytes
from train.schedule import lr_multiplier
from train.signals import StopRequest
from train.stream import BatchStream
from train.trainer import Trainer, TrainingDiverged, autocast_dtype, strip_prefix

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
                    "save_and_sample_every": 2, "log_freq": 1, "val_size": 2,
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
    # upstream layout: critic and logvar under loss. (LPIPS, frozen, is left out); EMA under
    # ema_model.
    assert "loss.perceptual_loss.lin0.model.1.weight" not in second["model"]
    assert "loss.logvar" in second["model"]
    assert "ema_model.decoder.conv_out.weight" in second["ema"]
    assert second["config"]["model"]["lossconfig"]["disc_start"] == 2
    ema = load(run_dir / "model-2.pt").model  # no config argument needed
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


def killed_and_resumed(tmp_path: Path, data, **lossconfig) -> tuple[Path, Path]:
    """A 6-step run, and one killed after step 4 then resumed from model-1.pt (step 3); asserts
    that the resumed steps' losses are bit-for-bit those of the uninterrupted run."""
    raw = tiny_run(tmp_path / "full", train_num_steps=6, save_and_sample_every=3)
    raw["model"]["lossconfig"].update(disc_start=2, **lossconfig)  # resume inside phase 2
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
    return full, killed


def test_resume_after_a_kill_gives_the_same_next_losses(tmp_path, data):
    full, killed = killed_and_resumed(tmp_path, data)
    # the val/ record of the checkpoint resumed from (step 3) is kept, once
    assert [r for r in read_metrics(killed) if "val/psnr" in r] == [
        r for r in read_metrics(full) if "val/psnr" in r]
    if importlib.util.find_spec("tensorboard") is not None:  # and TensorBoard shows it once
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        events = EventAccumulator(str(killed))
        events.Reload()
        assert [e.step for e in events.Scalars("val/psnr")] == [3, 6]
    end_a, end_b = read_checkpoint(full / "model-2.pt"), read_checkpoint(killed / "model-2.pt")
    assert _same(end_a["model"], end_b["model"]) and _same(end_a["ema"], end_b["ema"])


def tensor_bytes(obj: object) -> int:
    """The bytes of every tensor in a nested dict / list."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(map(tensor_bytes, obj.values()))
    return sum(map(tensor_bytes, obj)) if isinstance(obj, (list, tuple)) else 0


def test_checkpoints_leave_lpips_out_and_still_resume_bit_for_bit(tmp_path, data):
    full, _ = killed_and_resumed(tmp_path, data, perceptual_weight=1.0, allow_random_lpips=True)
    path = full / "model-2.pt"
    ckpt = read_checkpoint(path)
    assert not [k for k in ckpt["model"] if k.startswith("loss.perceptual_loss.")]
    assert {"loss.logvar", "loss.discriminator.main.0.weight"} <= ckpt["model"].keys()
    # weights (autoencoder, critic, EMA) + both AdamW states, plus pickle overhead only
    kept = sum(tensor_bytes(ckpt[k]) for k in ("model", "ema", "opt_ae", "opt_disc"))
    assert kept <= path.stat().st_size <= kept + 2 ** 20
    del ckpt["model"]["loss.logvar"]  # any other missing loss key is still refused
    torch.save(ckpt, tmp_path / "no-logvar.pt")
    with pytest.raises(CheckpointError, match="cannot resume.*1 missing"):
        Trainer(load_config(ckpt["config"]), *data).resume(tmp_path / "no-logvar.pt")


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
               "trainer.log_freq=1", "trainer.batch_size=2", "trainer.val_size=2",
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
    assert main(["eval", "--ckpt", str(run_dir), "--split", "test", "--max-maps", "2"]) == 0
    captured = capsys.readouterr()
    assert "| psnr |" in captured.out and "{" not in captured.out  # JSON only on request
    assert "eval test: 2/2 maps (100%)" in captured.err  # progress lines off a terminal
    assert main(["eval", "--ckpt", str(run_dir), "--split", "test", "--json", "-"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out[out.index("{"):])
    assert result["split"] == "test" and result["weights"] == "ema"
    assert result["maps"] == result["split_maps"] > 0  # the whole split
    assert result["native"]["metrics"]["psnr"]["mean"] > 5 and result["model"]["size"] == [64, 64]
    assert len(result["native"]["worst"]) == min(10, result["maps"])
    assert "| psnr |" in out and "| rmse_db |" in out
    assert any("val/rmse_db" in r and "val/tx_rmse_db" in r for r in read_metrics(run_dir))


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
    ema = EMA(net, decay=0.9, update_every=1, update_after_step=1, power=0)  # a fixed decay
    for value, expected in ((1.0, 1.0), (2.0, 2.0), (3.0, 2.1)):  # steps 0, 1 copy; 2 averages
        torch.nn.init.constant_(net.weight, value)
        ema.update()
        assert ema.ema_model.weight[0, 0].item() == pytest.approx(expected)
    state = ema.state_dict()
    assert set(state) == {"ema_model.weight", "ema_model.bias", "step", "initted"}
    clone = EMA(copy.deepcopy(net), 0.9, 1, 1)
    clone.load_state_dict(state)
    assert clone.step == 3 and torch.equal(clone.ema_model.weight, ema.ema_model.weight)


@pytest.mark.parametrize("step, expected", [(0, 0.0), (101, 0.0), (102, 1 - 2 ** (-2 / 3)),
                                            (1100, 1 - 1000 ** (-2 / 3)), (10 ** 6, 0.995)])
def test_ema_decay_warm_up_follows_the_formula(step, expected):
    # decay = 1 - (1 + t / inv_gamma) ** -power, t = step - update_after_step - 1, capped
    assert ema_decay(step, 0.995, 100) == pytest.approx(expected, rel=1e-12)
    assert ema_decay(step, 0.995, 100, power=0) == (0.0 if step <= 101 else 0.995)


def test_ema_matches_ema_pytorch_step_for_step():
    ema_pytorch = pytest.importorskip("ema_pytorch")
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    ours = EMA(net, decay=0.99, update_every=2, update_after_step=3)
    theirs = ema_pytorch.EMA(net, beta=0.99, update_every=2, update_after_step=3,
                             include_online_model=False)
    for _ in range(40):
        with torch.no_grad():
            net.weight.add_(torch.randn_like(net.weight))
        ours.update()
        theirs.update()
        assert torch.allclose(ours.ema_model.weight, theirs.ema_model.weight, atol=1e-6)
        assert ours.current_decay() == pytest.approx(float(theirs.get_current_decay()))


def test_a_fresh_run_moves_an_earlier_run_aside(tmp_path, data, capsys, monkeypatch):
    run(tiny_run(tmp_path), data)  # model-1.pt, model-2.pt, samples, metrics
    run_dir = tmp_path / "run"
    monkeypatch.setattr(time, "strftime", lambda *args: "20250101T000000Z")
    (tmp_path / "run.prev-20250101T000000Z").mkdir()  # a name already taken is never reused
    capsys.readouterr()
    run(tiny_run(tmp_path, train_num_steps=2), data)
    moved = tmp_path / "run.prev-20250101T000000Z-1"
    assert f"moved it to {moved}" in capsys.readouterr().out
    assert not any((tmp_path / "run.prev-20250101T000000Z").iterdir())
    assert {"model-1.pt", "model-2.pt", "sample-2.png", "metrics.jsonl"} <= {
        p.name for p in moved.iterdir()}
    assert sorted(p.name for p in [*run_dir.glob("model-*"), *run_dir.glob("sample-*")]) == [
        "model-1.pt", "sample-1.png"]
    assert latest_checkpoint(run_dir) == run_dir / "model-1.pt"  # eval / export load this run
    assert sorted(steps(run_dir)) == [0, 1]


def test_resuming_a_finished_run_changes_nothing(tmp_path, data, capsys):
    raw = tiny_run(tmp_path)
    run(raw, data)
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    run_dir = tmp_path / "run"
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    assert [r["step"] for r in read_metrics(run_dir) if "val/psnr" in r] == [2, 4]
    capsys.readouterr()
    assert main(["--cfg", str(cfg_path), "--resume"]) == 0
    assert "already finished" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before
    assert not list(tmp_path.glob("run.prev-*"))


def test_fp16_means_float16_mixed_precision_and_is_refused_on_cpu(tmp_path, data):
    assert autocast_dtype(TrainerConfig(fp16=True)) == torch.float16  # upstream: fp16 alone
    assert autocast_dtype(TrainerConfig(fp16=True, amp=True)) == torch.float16
    assert autocast_dtype(TrainerConfig(amp=True)) == torch.bfloat16
    assert autocast_dtype(TrainerConfig()) is None
    for amp in (False, True):
        with pytest.raises(ConfigError) as err:
            Trainer(load_config(tiny_run(tmp_path, fp16=True, amp=amp, device="cpu")), *data)
        assert "trainer.fp16" in str(err.value) and "trainer.amp" in str(err.value)
    assert main(["--cfg", "quickstart.yaml", "trainer.fp16=true", "trainer.device=cpu",
                 f"trainer.results_folder={tmp_path / 'fp16'}"]) == 2
    assert not (tmp_path / "fp16").exists()
    trainer = Trainer(load_config(tiny_run(tmp_path, amp=True, device="cpu")), *data)
    with trainer.autocast():
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
    assert not trainer.scaler.is_enabled()


def upstream_file(tmp_path: Path, data, path: Path) -> dict:
    """An upstream RadioDiff model-N.pt at `path` (no config or rng; `ema` holds the loss
    keys too; opt_disc from other parameters), from 2 phase-2 steps; returns its payload."""
    raw = tiny_run(tmp_path / "upstream", train_num_steps=2, save_and_sample_every=100)
    raw["model"]["lossconfig"]["disc_start"] = 0
    src = run(raw, data)
    model = {**src.model.state_dict(),
             **{f"loss.{k}": v for k, v in src.loss.state_dict().items()},
             "loss.logvar": torch.tensor(0.25),
             "loss.perceptual_loss.net.slice1.0.weight": torch.randn(64, 3, 3, 3)}
    ema = {f"ema_model.{k}": v + 0.5 if v.is_floating_point() else v for k, v in model.items()}
    ema.update(step=torch.tensor(2), initted=torch.tensor(True))
    other = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))])
    other.param_groups[0]["params"][0].grad = torch.ones(3)
    other.step()
    payload = {"step": 2, "model": model, "ema": ema, "opt_ae": src.opt_ae.state_dict(),
               "lr_scheduler_ae": src.sched_ae.state_dict(), "opt_disc": other.state_dict(),
               "lr_scheduler_disc": src.sched_disc.state_dict(), "scaler": None}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)
    return payload


def test_upstream_file_fine_tunes_with_its_critic_and_resumes_as_a_warm_start(tmp_path, data):
    path = tmp_path / "run" / "model-1.pt"
    up = upstream_file(tmp_path, data, path)
    raw = tiny_run(tmp_path / "tune")
    raw["model"]["ckpt_path"] = str(path)
    tuned = Trainer(load_config(raw), *data)
    critic = strip_prefix(up["model"], "loss.discriminator.")
    assert _same(tuned.loss.discriminator.state_dict(), critic)  # the critic, exactly
    assert tuned.loss.logvar.item() == 0.25
    assert _same(tuned.model.state_dict(), _net(strip_prefix(up["ema"], "ema_model.")))
    raw["model"]["ignore_keys"] = ["loss.discriminator"]  # keeps its fresh initialisation
    fresh_critic = Trainer(load_config(raw), *data).loss.discriminator.state_dict()
    assert fresh_critic.keys() == critic.keys() and not _same(fresh_critic, critic)
    # --resume finds the upstream file: a warm start
    trainer = Trainer(load_config(tiny_run(tmp_path)), *data)
    note = trainer.resume(path)
    assert "warm start: restored autoencoder, EMA, critic, logvar, opt_ae and step 2" in note
    assert "not restored: opt_disc (param groups differ), lr schedules" in note
    assert trainer.step == 2 and trainer.ema.step == 2
    assert _same(trainer.model.state_dict(), _net(up["model"]))
    assert _same(trainer.ema.ema_model.state_dict(), _net(strip_prefix(up["ema"], "ema_model.")))
    assert _same(trainer.loss.discriminator.state_dict(), critic)
    saved, mine = up["opt_ae"]["state"], trainer.opt_ae.state_dict()["state"]
    assert saved.keys() == mine.keys() and all(
        torch.equal(saved[i]["exp_avg"], mine[i]["exp_avg"]) for i in saved)
    assert trainer.opt_disc.state_dict()["state"] == {}
    tc = trainer.cfg.trainer
    assert trainer.opt_ae.param_groups[0]["lr"] == pytest.approx(tc.lr * lr_multiplier(tc)(2))
    assert trainer.train() is None  # steps 2, 3 in the same folder; the upstream file stays
    assert read_checkpoint(tmp_path / "run" / "model-2.pt")["step"] == 4
    assert path.is_file() and not list(tmp_path.glob("run.prev-*"))
    assert sorted(steps(tmp_path / "run")) == [2, 3]


def test_the_saved_checkpoint_loads_the_network_the_trainer_trained(tmp_path, data):
    trainer = run(tiny_run(tmp_path, train_num_steps=2), data)
    loaded = load(latest_checkpoint(tmp_path / "run"))
    assert loaded.weights == "ema" and loaded.step == 2 and loaded.source == "project"
    x = data[1][0]["image"][None]
    with torch.no_grad():
        ema, plain = trainer.ema.ema_model, loaded.model
        assert torch.allclose(ema.decode(ema.encode(x).mode()),
                              plain.decode(plain.encode(x).mode()), atol=1e-5)


def _run_folder_state(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_config_the_network_cannot_take_leaves_the_earlier_run_in_place(tmp_path, data,
                                                                         capsys):
    """`data.image_size=[63,63]` on quickstart's factor-2 network once moved the finished run
    aside, then died at step 0 with a traceback (exit 1): now a one-line config error."""
    run(tiny_run(tmp_path, train_num_steps=2), data)
    run_dir = tmp_path / "run"
    before = _run_folder_state(run_dir)
    capsys.readouterr()
    assert main(["--cfg", "quickstart.yaml", f"trainer.results_folder={run_dir}",
                 "data.image_size=[63,63]"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: data.image_size [63, 63]: the network")
    assert "multiples of 2" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert _run_folder_state(run_dir) == before and not list(tmp_path.glob("run.prev-*"))
    for size in ([64, 66], "native"):  # multiples of 2 (native: 256)
        load_config("quickstart.yaml", [f"data.image_size={size}"])
    with pytest.raises(ConfigError, match=r"data.crop_size \[30, 32\]: .* multiples of 4"):
        load_config(tiny_run(tmp_path), ["data.crop_size=[30,32]"])


def test_a_run_that_fails_at_its_first_step_leaves_the_earlier_run_in_place(tmp_path, data):
    """Whatever fails before the first step is done (here maps of a size the network cannot
    take, handed in past the config check; on a GPU, out of memory) leaves the folder as it
    was: the earlier run is moved aside only once the new one has run a step."""
    run(tiny_run(tmp_path, train_num_steps=2), data)
    run_dir = tmp_path / "run"
    before = _run_folder_state(run_dir)
    odd = build_dataset(DataConfig(name="synthetic", num_maps=8, num_tx=2, image_size=[30, 30],
                                   num_workers=0), "train")
    trainer = Trainer(load_config(tiny_run(tmp_path, train_num_steps=2)), odd, data[1])
    with pytest.raises(RuntimeError, match="size of tensor"):
        trainer.train()
    assert _run_folder_state(run_dir) == before and not list(tmp_path.glob("run.prev-*"))


def test_missing_data_and_lpips_weights_are_reported_together_data_first(tmp_path, capsys):
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))  # no VGG16 file there
    try:
        assert main(["--cfg", "first_radio.yaml", f"data.root={tmp_path / 'RadioMapSeer'}",
                     f"trainer.results_folder={tmp_path / 'run'}"]) == 2
    finally:
        torch.hub.set_dir(old)
    err = capsys.readouterr().err
    assert err.startswith("error: 2 inputs are missing: (1) ") and len(err.splitlines()) == 1
    data_at, vgg_at = err.index("RadioMapSeer: RadioMapSeer folder not found"), err.index(
        "(2) LPIPS needs the VGG16 weights at " + str(tmp_path / "hub"))
    assert data_at < vgg_at and "vgg16-397923af.pth" in err
    assert not (tmp_path / "run").exists()


def test_a_step_the_grad_scaler_skips_moves_neither_lr_nor_ema(tmp_path, data):
    """fp16's GradScaler (device-agnostic; fp16 autocast itself is refused on a CPU) with a
    scale so large that the scaled loss overflows: it skips the optimizer step, and the lr
    schedules and the EMA must not advance either; the next, normal step moves all three."""
    trainer = Trainer(load_config(tiny_run(tmp_path, warmup_steps=4)), *data)
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 127)
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    lr, ema = trainer.opt_ae.param_groups[0]["lr"], copy.deepcopy(trainer.ema.state_dict())
    stream = BatchStream(trainer.train_loader)
    with StopRequest() as stop:
        trainer.train_step(stream, stop)
        assert trainer.step == 1 and trainer.scaler.get_scale() == 2.0 ** 126  # skipped
        assert trainer.sched_ae.last_epoch == trainer.sched_disc.last_epoch == 0
        assert trainer.opt_ae.param_groups[0]["lr"] == lr and trainer.ema.step == 0
        assert all(torch.equal(v, trainer.ema.state_dict()[k]) for k, v in ema.items())
        assert all(torch.equal(v, trainer.model.state_dict()[k]) for k, v in weights.items())
        trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
        trainer.train_step(stream, stop)
    assert trainer.sched_ae.last_epoch == 1 and trainer.ema.step == 1
    assert trainer.opt_ae.param_groups[0]["lr"] > lr  # warm-up moved on


def test_loss_terms_are_reduced_only_at_log_steps(tmp_path, data, monkeypatch):
    """Per step one all-reduce of three flags (non-finite, fp16 overflow, stop: the NaN guard);
    the logged terms are all-reduced (and read on the host) only every log_freq steps."""
    sizes = []
    real = distributed.all_reduce

    def counting(tensor, env, op="sum"):
        sizes.append(tensor.numel())
        return real(tensor, env, op)

    monkeypatch.setattr(distributed, "all_reduce", counting)
    trainer = run(tiny_run(tmp_path, train_num_steps=6, log_freq=3, save_and_sample_every=100),
                  data)
    terms = len(steps(tmp_path / "run")[0]) - 3  # less step, lr, it_per_s
    assert sizes.count(3) == 6 and sizes.count(terms) == 2, sizes  # steps 0 and 3 logged
    assert trainer.step == 6


def test_a_changed_lr_on_resume_is_applied_and_said(tmp_path, data, capsys):
    raw = tiny_run(tmp_path, train_num_steps=2)
    run(raw, data)
    cfg_path = tmp_path / "more.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_run(tmp_path, train_num_steps=4, lr=2e-3)))
    capsys.readouterr()
    assert main(["--cfg", str(cfg_path), "--resume"]) == 0
    out = capsys.readouterr().out
    assert "trainer.lr is 0.002 in this config and 0.001 in the checkpoint" in out
    ckpt = read_checkpoint(tmp_path / "run" / "model-2.pt")
    assert ckpt["lr_scheduler_ae"]["base_lrs"] == [2e-3]
    multiplier = lr_multiplier(load_config(tiny_run(tmp_path, train_num_steps=4, lr=2e-3))
                               .trainer)
    assert ckpt["opt_ae"]["param_groups"][0]["lr"] == pytest.approx(2e-3 * multiplier(4))


def test_accumulation_is_said_once_at_start(tmp_path, data, capsys):
    run(tiny_run(tmp_path, train_num_steps=2, gradient_accumulate_every=2), data)
    out = capsys.readouterr().out
    assert out.count("trainer.gradient_accumulate_every: 2 accumulates 2 micro-batches of 2") == 1
    assert "2x the data per step of upstream RadioDiff" in out and "DDP:" not in out


@pytest.mark.parametrize("setting, device, free_gib, on", [
    ("auto", "cuda", 24.0, True),     # first_radio, batch 8, 320x320, bf16: ~30 GiB
    ("auto", "cuda", 80.0, False),
    ("auto", "cpu", None, False),     # on a CPU: no change
    (False, "cuda", 24.0, False),     # what the config says wins
    (True, "cpu", None, True),
])
def test_activation_checkpointing_is_chosen_when_the_step_would_not_fit(setting, device,
                                                                       free_gib, on):
    dd = load_config("first_radio.yaml").model.ddconfig
    with torch.device("meta"):
        params = sum(p.numel() for p in AutoencoderKL.from_config(
            load_config("first_radio.yaml").model).parameters())
    bf16 = step_bytes(dd, (320, 320), 8, True, params) / GIB
    fp32 = step_bytes(dd, (320, 320), 8, False, params) / GIB
    assert bf16 == pytest.approx(30.0, rel=0.05) and fp32 == pytest.approx(85.9, rel=0.05)
    assert step_bytes(dd, (256, 256), 8, True, params) / GIB < 0.7 * bf16
    free = None if free_gib is None else free_gib * GIB
    choice, line = choose_checkpointing(setting, device, bf16 * GIB, free)
    assert choice is on
    assert (line is not None) == (setting == "auto" and device == "cuda")
    if line:
        assert line.startswith(f"activation checkpointing {'on' if on else 'off'}")
