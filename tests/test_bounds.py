"""A checkpoint with NaN weights, and a config asking for a network or map size beyond the
documented bounds (model/config.py MAX_PARAMETERS, MAX_RESOLUTION), are refused with one line
and exit 2 by every command that loads a checkpoint, before anything large is allocated."""
from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from model.autoencoder import AutoencoderKL, check_network_size
from model.checkpoint import EMA_PREFIX, save_checkpoint
from model.config import MAX_RESOLUTION, ConfigError, DDConfig, ModelConfig, to_dict
from tests.conftest import tiny_model_config

REPO = Path(__file__).resolve().parents[1]
DATA = ["data.name=synthetic", "data.num_maps=8", "data.num_tx=1", "data.image_size=[64,64]",
        "data.num_workers=0"]


def _checkpoint(path: Path, config: ModelConfig, poison: bool = False) -> Path:
    """A trainer-format checkpoint of the tiny network (model and EMA weights) whose stored
    config is `config`; `poison`: one NaN weight in both."""
    torch.manual_seed(0)
    state = AutoencoderKL.from_config(tiny_model_config()).state_dict()
    if poison:
        state["decoder.conv_out.weight"][0, 0, 0, 0] = float("nan")
    return save_checkpoint(path, {"model": state, "step": 3, "config": {"model": to_dict(config)},
                                  "ema": {EMA_PREFIX + k: v for k, v in state.items()}})


def _commands(ckpt: Path, out: Path) -> dict[str, list[str]]:
    return {
        "server": ["-m", "server", "--model", str(ckpt), "--port", "18999"],
        "eval": ["-m", "train", "eval", "--ckpt", str(ckpt), "--max-maps", "2", *DATA],
        "pack": ["-m", "train", "pack", "--ckpt", str(ckpt), "--out", str(out / "packed.pt")],
        "export": ["-m", "export", "--ckpt", str(ckpt), "--out", str(out / "onnx")],
        "latents": ["-m", "export", "latents", "--ckpt", str(ckpt), "--split", "train",
                    "--out", str(out / "latents"), "--path", "fp32", *DATA],
    }


def _run(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("case", ["nan_weights", "oversized"])
def test_every_command_refuses_a_broken_checkpoint_in_one_line(tmp_path, case):
    big = ModelConfig(embed_dim=3, ddconfig=DDConfig(resolution=[64, 64], ch=2048,
                                                      ch_mult=[1, 2, 4], num_res_blocks=2))
    ckpt = (_checkpoint(tmp_path / "model-3.pt", tiny_model_config(), poison=True)
            if case == "nan_weights" else _checkpoint(tmp_path / "model-3.pt", big))
    expected = "hold NaN or Inf" if case == "nan_weights" else "the bound is 600 M"
    commands = _commands(ckpt, tmp_path)
    with ThreadPoolExecutor(2) as pool:
        results = dict(zip(commands, pool.map(_run, commands.values())))
    for name, done in results.items():
        text = done.stdout + done.stderr
        assert done.returncode == 2, f"{name}: exit {done.returncode}\n{text[-1500:]}"
        assert expected in text and "Traceback" not in text, f"{name}:\n{text[-1500:]}"
    assert not (tmp_path / "packed.pt").exists() and not (tmp_path / "onnx").exists()


def test_training_refuses_an_oversized_network_and_map_before_allocating(tmp_path):
    for override, expected in [("model.ddconfig.ch=2048", "the bound is 600 M"),
                               (f"model.ddconfig.resolution=[{MAX_RESOLUTION * 2},64]",
                                f"at most {MAX_RESOLUTION} per side")]:
        done = _run(["-m", "train", "--cfg", "quickstart.yaml", override,
                     f"trainer.results_folder={tmp_path / 'run'}"])
        text = done.stdout + done.stderr
        assert done.returncode == 2 and expected in text and "Traceback" not in text, text[-1500:]


def test_the_parameter_count_is_exact_and_allocates_nothing():
    config = tiny_model_config()
    assert check_network_size(config) == sum(p.numel() for p in
                                             AutoencoderKL.from_config(config).parameters())
    with pytest.raises(ConfigError, match="parameters; the bound is 600 M"):
        check_network_size(ModelConfig(embed_dim=3, ddconfig=DDConfig(ch=4096)))
