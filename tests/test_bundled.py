"""Network-only checkpoints (`python -m train pack`) and bundled model names (`--ckpt reference`)."""
from __future__ import annotations

import pytest
import torch

import model.checkpoint as checkpoint
from model.checkpoint import CheckpointError, read_checkpoint, resolve_checkpoint
from model.loading import load
from server.settings import Settings
from server.spec import describe_model
from tests.test_export import write_tiny_checkpoint
from train.__main__ import main


def _outputs(path) -> torch.Tensor:
    x = torch.linspace(-1, 1, 64 * 64).reshape(1, 1, 64, 64)
    with torch.no_grad():
        return load(path).model(x, sample_posterior=False)[0]


def test_pack_keeps_the_ema_network_config_and_step_only(tmp_path, capsys):
    full = write_tiny_checkpoint(tmp_path / "run" / "model-7.pt", seed=1)
    packed = tmp_path / "net.pt"
    assert main(["pack", "--ckpt", str(full.parent), "--out", str(packed)]) == 0
    assert "wrote" in capsys.readouterr().out
    state = read_checkpoint(packed)
    assert set(state) == {"ema", "step", "config", "packed_from"}
    assert state["packed_from"]["file"] == "model-7.pt" and len(state["packed_from"]["sha256"]) == 64
    assert torch.equal(_outputs(packed), _outputs(full))  # the EMA weights, unchanged
    assert packed.stat().st_size < 0.6 * full.stat().st_size


def test_pack_refuses_a_file_without_ema_or_config(tmp_path, capsys):
    bare = write_tiny_checkpoint(tmp_path / "model-1.pt", seed=0, ema=False)
    assert main(["pack", "--ckpt", str(bare), "--out", str(tmp_path / "x.pt")]) == 2
    assert "expected a trainer checkpoint with EMA weights" in capsys.readouterr().err


def test_bundled_names_resolve_and_a_real_path_wins(tmp_path, monkeypatch):
    weights = tmp_path / "weights"
    write_tiny_checkpoint(weights / "tiny.pt", seed=2)
    monkeypatch.setattr(checkpoint, "WEIGHTS_DIR", weights)
    monkeypatch.chdir(tmp_path)
    assert resolve_checkpoint("tiny") == weights / "tiny.pt"
    assert describe_model(Settings(model="tiny")).path == str(weights / "tiny.pt")
    local = write_tiny_checkpoint(tmp_path / "tiny" / "model-3.pt", seed=3)
    assert resolve_checkpoint("tiny").resolve() == local  # ./tiny exists: the path wins over the name
    with pytest.raises(CheckpointError, match=r"nor a bundled model name \(bundled: tiny\)"):
        resolve_checkpoint("nothing")
