"""model/loading.py, the one loader: the network and a truthful account of what was loaded
(which weights, step, latent scaling of those weights, SHA-256, source, path)."""
import hashlib

import pytest
import torch

from model.autoencoder import AutoencoderKL
from model.checkpoint import (EMA_PREFIX, LATENT_STATS_KEY, WEIGHTS_DIR, CheckpointError,
                              save_checkpoint)
from model.config import to_dict
from model.loading import choose_weights, load, read_file
from model.run_config import load_run
from tests.conftest import tiny_model_config

CFG = tiny_model_config()


def _net(seed: int) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL.from_config(CFG).eval()


def _stats(weights: str, scale: float) -> dict:
    return {"scale_factor": scale, "latents_mean": [0.0] * 3, "latents_std": [1.0] * 3,
            "weights": weights, "split": "train", "maps": 4}


def _outputs(model: AutoencoderKL) -> torch.Tensor:
    x = torch.linspace(-1, 1, 64 * 64).reshape(1, 1, 64, 64)
    with torch.no_grad():
        return model(x, sample_posterior=False)[0]


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_without_ema_weights_the_label_is_model_and_the_scaling_is_the_raw_weights(tmp_path):
    """Asked for EMA (the default) from a file that has none: the raw weights are loaded and
    said to be; statistics measured on EMA weights are not applied to them, those measured on
    the raw weights are."""
    config = {"model": to_dict(CFG), "data": {"name": "synthetic", "image_size": [64, 64]}}
    raw = _net(0)
    for weights, scale, expected in (("ema", 2.0, CFG.scale_factor), ("model", 3.0, 3.0)):
        path = save_checkpoint(tmp_path / f"{weights}.pt", {
            "model": raw.state_dict(), "step": 5, "config": config,
            LATENT_STATS_KEY: _stats(weights, scale)})
        loaded = load(path)
        assert loaded.weights == "model" and loaded.scaling["scale_factor"] == expected
        assert torch.equal(_outputs(loaded.model), _outputs(raw))
        run = load_run(path)  # the commands' loader (eval, latent-stats, export latents)
        assert run.weights == "model" and run.scaling == loaded.scaling


def test_ema_is_used_and_named_only_when_present_and_asked_for(tmp_path):
    raw, ema = _net(0), _net(1)
    path = save_checkpoint(tmp_path / "model-7.pt", {
        "model": raw.state_dict(), "step": 7, "config": {"model": to_dict(CFG)},
        "ema": {EMA_PREFIX + k: v for k, v in ema.state_dict().items()},
        LATENT_STATS_KEY: _stats("ema", 2.0)})
    loaded = load(tmp_path)  # a run directory: its newest model-N.pt
    assert (loaded.weights, loaded.step, loaded.source) == ("ema", 7, "project")
    assert loaded.path == path and loaded.sha256 == _sha256(path)
    assert loaded.scaling["scale_factor"] == 2.0 and not loaded.model.training
    assert torch.equal(_outputs(loaded.model), _outputs(ema))
    plain = load(path, use_ema=False)
    assert plain.weights == "model" and plain.scaling["scale_factor"] == CFG.scale_factor
    assert torch.equal(_outputs(plain.model), _outputs(raw))


def test_a_bundled_name_loads_the_bundled_file():
    loaded = load("reference")
    assert loaded.source == "bundled" and loaded.path == WEIGHTS_DIR / "reference.pt"
    assert loaded.weights == "ema" and isinstance(loaded.step, int)
    assert loaded.sha256 == _sha256(loaded.path)
    assert loaded.scaling["scale_factor_source"].startswith("latent_stats")


def test_an_upstream_file_needs_its_config_and_loads_ema_without_the_loss_keys(tmp_path):
    """Upstream RadioDiff's model-N.pt: no config, loss modules under `model`, EMA weights
    (and the EMA's own counters) under `ema`."""
    raw, ema = _net(0), _net(1)
    model = {**raw.state_dict(), "loss.logvar": torch.zeros(()),
             "loss.discriminator.main.0.weight": torch.randn(64, 1, 4, 4)}
    path = tmp_path / "model-30.pt"
    torch.save({"step": 30, "model": model, "opt_ae": {}, "opt_disc": {},
                "ema": {**{EMA_PREFIX + k: v for k, v in ema.state_dict().items()},
                        "initted": torch.tensor(True), "step": torch.tensor(30)}}, path)
    with pytest.raises(CheckpointError, match=f"{path}: the checkpoint stores no config"):
        load(path)
    loaded = load(path, config=CFG)
    assert (loaded.source, loaded.weights, loaded.step) == ("upstream", "ema", 30)
    assert torch.equal(_outputs(loaded.model), _outputs(ema))
    chosen = choose_weights(read_file(path), CFG, use_ema=False)  # no network built
    assert chosen.weights == "model" and "loss.logvar" in chosen.state


@pytest.mark.parametrize("content", [b"", b"step: 3\nmodel: {}\n", bytes(range(256))],
                         ids=["empty", "text", "bytes"])
def test_a_file_that_is_not_a_checkpoint_is_refused_naming_it(tmp_path, content):
    path = tmp_path / "model-1.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=f"^{path}: not a"):
        load(path)


def test_non_finite_weights_are_refused_before_a_network_is_built(tmp_path):
    state = _net(0).state_dict()
    state["decoder.conv_out.bias"][0] = float("inf")
    path = save_checkpoint(tmp_path / "model-2.pt", {"model": state,
                                                    "config": {"model": to_dict(CFG)}})
    with pytest.raises(CheckpointError, match=f"{path}: 1 network weight tensors hold NaN"):
        choose_weights(read_file(path))
