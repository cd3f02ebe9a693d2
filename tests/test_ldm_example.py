"""examples/ldm: the reference consumer's loop on a tiny VAE, for real: latents written by
`python -m export latents`, read by LatentShards, a few training steps, maps decoded by a
`python -m server` process, and the evaluation on 2 held-out maps under both definitions."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from examples.ldm.__main__ import main as ldm_main
from examples.ldm.conditions import condition_maps
from examples.ldm.data import LatentPairs
from examples.ldm.diffusion import alpha_sigma, ddim_sample
from examples.ldm.serve import server_process
from model.checkpoint import read_checkpoint
from tests.test_export import write_tiny_checkpoint
from train.__main__ import main as train_main

DATA = ["data.name=synthetic", "data.num_maps=12", "data.num_tx=2", "data.image_size=[64,64]",
        "data.num_workers=0"]


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    """A tiny checkpoint with its latent statistics stored (so scaled != x 0.3)."""
    ckpt = write_tiny_checkpoint(tmp_path_factory.mktemp("ldm") / "model-1.pt", seed=0)
    assert train_main(["latent-stats", "--ckpt", str(ckpt), "--out", str(ckpt), *DATA]) == 0
    assert read_checkpoint(ckpt)["latent_stats"]["latents_mean"] is not None
    return ckpt


@pytest.fixture(scope="module")
def test_latents(vae, tmp_path_factory):
    """The held-out maps' latents, as `python -m export latents` writes them."""
    from export.latents import main as latents_main
    folder = tmp_path_factory.mktemp("ldm-latents") / "test"
    assert latents_main(["--ckpt", str(vae), "--split", "test", "--out", str(folder),
                         "--path", "default", *DATA]) == 0
    return folder


@pytest.fixture(scope="module")
def served(vae, tmp_path_factory):
    """One `python -m server` of the VAE for the module, as the example starts it."""
    with server_process(str(vae), tmp_path_factory.mktemp("ldm-server") / "server.log") as client:
        yield client


@pytest.mark.server
@pytest.mark.slow  # the example's whole loop, its own server included (~40 s on 2 cores)
def test_one_command_trains_and_evaluates_through_a_real_server(vae, tmp_path):
    out = tmp_path / "run"
    assert ldm_main(["--latents", str(tmp_path / "latents"), "--model", str(vae), "--out",
                     str(out), *DATA, "--steps", "3", "--eval-every", "2", "--batch-size", "2",
                     "--curve-maps", "2", "--test-maps", "2", "--ddim-steps", "2",
                     "--widths", "16,16"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["test_maps"] == 2 and result["train_maps"] > 2
    for who in ("ldm", "vae"):
        assert all(math.isfinite(result[who][k]) for k in ("psnr", "radiodiff_psnr", "ssim"))
    assert result["ldm_detail"]["definitions"]["radiodiff"]["source"]
    curve = [json.loads(line) for line in (out / "curve.jsonl").read_text().splitlines()]
    assert [p["step"] for p in curve] == [2, 3]
    assert all(p["cpu_s"] > 0 and math.isfinite(p["val_psnr"]) for p in curve)
    assert (out / "ldm.pt").exists()


@pytest.mark.server
@pytest.mark.parametrize("scale", ["measured", "0.3", "per-channel"])
def test_scaled_latents_decode_to_the_vaes_own_map(test_latents, served, scale):
    """What the LDM would emit, handed to /decode as the example does, is the latent the VAE
    decodes: the scaling of the loader and of the server agree."""
    data = LatentPairs(test_latents, scale, sample=False)
    z, _, _ = data[0]
    raw = data.means_raw([0])
    latents, scaled = data.for_decode(z[None])
    np.testing.assert_allclose(served.decode(latents, scaled=scaled),
                               served.decode(raw, scaled=False), atol=1e-4)


def test_condition_maps_by_hand():
    buildings = torch.zeros(1, 1, 8, 8)
    buildings[0, 0, :4, :2] = 1  # half of cell (0, 0)
    tx = torch.zeros(1, 1, 8, 8)
    tx[0, 0, 5, 6] = 1  # cell (1, 1) of 4x4 cells
    c = condition_maps(buildings, tx, 4)
    assert c.shape == (1, 3, 2, 2)
    assert c[0, 0].tolist() == [[0.5, 0.0], [0.0, 0.0]]
    assert c[0, 1].tolist() == [[0.0, 0.0], [0.0, 1.0]]
    assert c[0, 2, 0, 0].item() == pytest.approx(math.log1p(math.sqrt(2)) / 4)
    assert c[0, 2, 1, 1].item() == 0.0


def test_ddim_with_a_perfect_denoiser_lands_on_the_data():
    """A model that knows z0 (v = alpha eps - sigma z0 from z_t) brings noise to z0 exactly."""
    z0 = torch.randn(2, 3, 4, 4)

    def oracle(z, t, cond):
        a, s = alpha_sigma(t[0])
        eps = (z - a * z0) / s if s > 0 else z
        return a * eps - s * z0

    out = ddim_sample(oracle, None, tuple(z0.shape), steps=3)
    assert torch.allclose(out, z0, atol=1e-5)
