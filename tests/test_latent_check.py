"""`python -m train latent-check` (train/latent_check.py): every figure on a tiny model against
numpy, the verdicts' reasons, and the command on a tiny checkpoint."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from model.autoencoder import AutoencoderKL
from tests.conftest import tiny_model_config
from tests.test_export import write_tiny_checkpoint
from train.__main__ import main
from train.latent_check import check, verdicts

SCALING = {"scale_factor": 0.5, "scale_factor_source": "test", "latents_mean": None,
           "latents_std": None}


def _maps(n: int = 3, size: int = 64) -> torch.Tensor:
    yy, xx = np.mgrid[0:size, 0:size] / size
    rng = np.random.default_rng(1)
    maps = [np.sin(6 * xx * rng.uniform(1, 3) + rng.uniform(0, 3)) * np.cos(4 * yy) for _ in range(n)]
    return torch.tensor(np.stack(maps)[:, None], dtype=torch.float32)


def _hf_share(x: np.ndarray) -> np.ndarray:
    """Per channel of [N, C, H, W]: energy above 0.25 cycles/sample over all, mean removed."""
    x = x - x.mean(axis=(-2, -1), keepdims=True)
    p = np.abs(np.fft.fft2(x)) ** 2
    f = np.hypot(*np.meshgrid(np.fft.fftfreq(x.shape[-2]), np.fft.fftfreq(x.shape[-1]),
                              indexing="ij"))
    return (p * (f > 0.25)).sum(axis=(0, 2, 3)) / p.sum(axis=(0, 2, 3))


def test_figures_match_numpy_on_a_tiny_model():
    torch.manual_seed(0)
    model = AutoencoderKL.from_config(tiny_model_config()).eval()
    images = _maps()
    report = check(model, [{"image": images[:2]}, {"image": images[2:]}], torch.device("cpu"),
                   SCALING, noise_levels=(0.1,), seed=5)
    with torch.no_grad():  # batch by batch, as the check encodes them
        posts = [model.encode(images[:2]), model.encode(images[2:])]
    z = torch.cat([p.mean for p in posts])
    mean = z.double().numpy()
    logvar = torch.cat([p.logvar for p in posts]).double().numpy()
    var = np.exp(logvar)
    # the same draws, in the same order: per batch, the sample noise then the decoder noise
    g = torch.Generator().manual_seed(5)
    noise, eps = [], []
    for b in (slice(0, 2), slice(2, 3)):
        noise.append(torch.randn(mean[b].shape, generator=g, dtype=torch.float64).numpy())
        eps.append(torch.randn(mean[b].shape, generator=g))
    samples = mean + np.sqrt(var) * np.concatenate(noise)
    axes = (0, 2, 3)
    assert report["maps"] == 3
    assert np.allclose(report["mean_of_means"], mean.mean(axes), atol=1e-8)
    assert np.allclose(report["std_of_means"], mean.std(axes), atol=1e-8)
    assert np.allclose(report["std_of_samples"], samples.std(axes), atol=1e-8)
    assert report["global_std_of_samples"] == pytest.approx(samples.std(), rel=1e-8)
    assert report["measured_scale_factor"] == pytest.approx(1 / samples.std(), rel=1e-8)
    assert report["std_after_0.3"]["global"] == pytest.approx(0.3 * samples.std(), rel=1e-8)
    assert report["std_after_stored_scale"]["global"] == pytest.approx(0.5 * samples.std(), rel=1e-8)
    assert np.allclose(report["posterior_noise_share"], var.mean(axes) / samples.var(axes),
                       rtol=1e-8)
    kl = 0.5 * (mean ** 2 + var - 1 - logvar)
    assert np.allclose(report["kl_per_element"], kl.mean(axes), rtol=1e-8)
    assert report["kl_per_element_mean"] == pytest.approx(kl.mean(), rel=1e-8)
    assert np.allclose(report["high_frequency_share_latent"], _hf_share(mean), rtol=1e-8)
    assert report["high_frequency_share_map"] == pytest.approx(_hf_share(images.double().numpy())[0],
                                                               rel=1e-6)
    with torch.no_grad():
        clean = ((model.decode(z) + 1) / 2).clamp(0, 1).double().numpy()
        noisy = ((model.decode(z + (0.1 / 0.5) * torch.cat(eps)) + 1) / 2).clamp(0, 1).double().numpy()
    psnrs = 10 * np.log10(1 / ((noisy - clean) ** 2).mean(axis=(1, 2, 3)))
    sens = report["decoder_sensitivity_psnr"]["0.1"]
    assert sens["mean"] == pytest.approx(psnrs.mean(), abs=1e-3)
    assert sens["min"] == pytest.approx(psnrs.min(), abs=1e-3)


def _report(std_scaled: float, std_03: float, share: list[float], sens: float,
            spread: tuple[float, float] = (1.0, 1.0)) -> dict:
    return {"std_after_stored_scale": {"global": std_scaled, "mean_per_channel": [0.0, 0.1]},
            "std_after_0.3": {"global": std_03, "mean_per_channel": [0.6, 1.6],
                              "per_channel": [std_03 * s for s in spread]},
            "measured_scale_factor": 0.26, "posterior_noise_share": share,
            "high_frequency_share_latent": [0.01, 0.2], "high_frequency_share_map": 0.02,
            "decoder_sensitivity_psnr": {"0.1": {"mean": sens, "min": sens - 3}}}


def test_verdicts_say_what_is_wrong_and_why():
    lines = verdicts(_report(1.0, 0.405, [0.7, 0.01], 24.0))
    assert lines[0].startswith("OK scale: std after stored scale is 1")
    assert lines[1].startswith("WARN scale: std after upstream's 0.3 is 0.405")
    assert "set scale_factor 0.26" in lines[1] and "off centre" in lines[1]
    assert lines[2].startswith("WARN posterior noise: channels [0]")
    assert lines[3].startswith("WARN spectrum") and "noise-like" in lines[3]
    assert lines[4].startswith("WARN decoder sensitivity") and "24.0 dB" in lines[4]
    good = verdicts(_report(1.1, 1.0, [1e-5, 1e-4], 40.0))
    assert not any(line.startswith("WARN channels") for line in good)
    uneven = verdicts(_report(1.0, 1.24, [1e-5, 1e-4], 40.0, spread=(0.15, 1.1)))
    assert uneven[2].startswith("WARN channels: under one global scale channel 0's std is 0.14")
    assert good[2].startswith("OK posterior noise") and "barely shapes" in good[2]
    assert good[4].startswith("OK decoder sensitivity")


def test_command_on_a_tiny_checkpoint(tmp_path, capsys):
    ckpt = write_tiny_checkpoint(tmp_path / "model-1.pt", seed=0)
    out = tmp_path / "check.json"
    assert main(["latent-check", "--ckpt", str(ckpt), "--split", "val", "--max-maps", "2",
                 "--json", str(out), "data.name=synthetic", "data.num_maps=12", "data.num_tx=2",
                 "data.image_size=[64,64]", "data.num_workers=0"]) == 0
    report = json.loads(out.read_text())
    assert report["maps"] == 2 and len(report["verdicts"]) >= 5
    assert set(report["decoder_sensitivity_psnr"]) == {"0.01", "0.03", "0.1", "0.3"}
    text = capsys.readouterr().out
    assert "| channel |" in text and "decoder sensitivity" in text
