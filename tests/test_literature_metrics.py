"""model/literature_metrics.py: the papers' metric definitions against hand computations, and
the eval JSON naming them (train/evaluate.py)."""
import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from model.literature_metrics import (DEFINITIONS, definition_metrics, psnr_target_range,
                                      radiounet_scale, ssim_inferred_range)
from model.metrics import METRIC_NAMES, psnr, ssim
from train.evaluate import evaluate, format_definitions, summarize
from tests.test_evaluate import CPU, Identity, _loader, _native


def _ramp(lo: float, hi: float, size: int = 32) -> torch.Tensor:
    """A [1, 1, size, size] map rising from lo to hi along x."""
    row = torch.linspace(lo, hi, size, dtype=torch.float64)
    return row.expand(size, size).clone()[None, None]


def test_radiodiff_psnr_takes_its_peak_from_the_target():
    target = _ramp(0.2, 0.7)  # range 0.5
    pred = target + 0.05  # MSE 0.0025
    assert psnr_target_range(pred, target).item() == pytest.approx(10 * np.log10(0.25 / 0.0025),
                                                                   abs=1e-4)  # 20 dB
    assert psnr(pred, target).item() == pytest.approx(10 * np.log10(1 / 0.0025), abs=1e-4)
    # the peak of each map of a batch is its own
    batch = torch.cat([target, _ramp(0.0, 1.0)])
    values = psnr_target_range(batch + 0.05, batch)
    assert values.tolist() == pytest.approx([20.0, 26.0206], abs=1e-3)


def test_radiodiff_ssim_range_is_the_wider_of_the_two_maps():
    target = _ramp(0.3, 0.5, 24).numpy()[0, 0]
    rng = np.random.default_rng(0)
    pred = np.clip(target + rng.normal(0, 0.1, target.shape), 0, 1)  # wider than the target
    ours = ssim_inferred_range(torch.from_numpy(pred)[None, None], torch.from_numpy(target)[None, None])
    wider = max(np.ptp(pred), np.ptp(target))
    assert wider > np.ptp(target) + 0.1
    ref = structural_similarity(pred, target, gaussian_weights=True, sigma=1.5,
                                use_sample_covariance=False, data_range=wider)
    assert ours.item() == pytest.approx(ref, abs=1e-6)
    assert ours.item() != pytest.approx(ssim(torch.from_numpy(pred), torch.from_numpy(target)).item(),
                                        abs=1e-3)


def test_radiounet_scale_cuts_at_the_noise_floor_by_hand():
    x = torch.tensor([0.0, 0.1, 0.2, 0.5, 0.9, 1.0])
    assert radiounet_scale(x).tolist() == pytest.approx([0, 0, 0, 0.375, 0.875, 1.0])
    target = torch.tensor([[0.1, 0.5], [0.9, 1.0]]).repeat(8, 8)  # 16x16
    pred = torch.tensor([[0.3, 0.5], [0.8, 1.0]]).repeat(8, 8)
    # on RadioUNet's scale: target 0, .375, .875, 1; pred .125, .375, .75, 1
    mse = (0.125 ** 2 + 0 + 0.125 ** 2 + 0) / 4
    energy = (0 + 0.375 ** 2 + 0.875 ** 2 + 1) / 4
    values = definition_metrics(pred, target)
    assert values["radiounet_rmse"].item() == pytest.approx(np.sqrt(mse), abs=1e-6)
    assert values["radiounet_nmse"].item() == pytest.approx(mse / energy, abs=1e-6)
    assert values["radiounet_psnr"].item() == pytest.approx(-10 * np.log10(mse), abs=1e-4)
    # on the project's / RadioDiff's [0, 1] scale: NMSE = MSE / mean(target^2)
    raw_mse = (0.2 ** 2 + 0 + 0.1 ** 2 + 0) / 4
    raw_energy = (0.01 + 0.25 + 0.81 + 1) / 4
    assert values["radiodiff_nmse"].item() == pytest.approx(raw_mse / raw_energy, abs=1e-6)
    assert values["radiodiff_rmse"].item() == pytest.approx(np.sqrt(raw_mse), abs=1e-6)


def test_every_definition_is_reported_per_map():
    maps = torch.rand(3, 1, 16, 16)
    values = definition_metrics(maps * 0.9, maps)
    assert set(values) == {f"{d}_{m}" for d, ms in DEFINITIONS.items() for m in ms}
    assert all(v.shape == (3,) for v in values.values())


def test_eval_json_names_the_definitions_with_their_sources():
    results = evaluate(Identity(), _loader(_native(size=64)), CPU)  # not resized: exact
    block = results["native"]["definitions"]
    assert set(block) == {"radiodiff", "radiounet"}
    assert "sample_cond_ldm.py" in block["radiodiff"]["source"]
    assert "RadioUNet" in block["radiounet"]["source"]
    assert block["radiodiff"]["metrics"]["ssim"]["mean"] == pytest.approx(1.0)
    assert block["radiodiff"]["metrics"]["nmse"]["mean"] == 0
    assert "radiodiff's definitions, native: psnr inf" in format_definitions(results)


def test_summarize_means_of_the_definitions():
    values = {name: torch.tensor([1.0, 2.0, 3.0]) for name in METRIC_NAMES}
    values |= {"radiodiff_psnr": torch.tensor([30.0, 31.0, 35.0]),
               "radiodiff_ssim": torch.tensor([0.9, 0.9, 0.6]),
               "radiodiff_nmse": torch.zeros(3), "radiodiff_rmse": torch.zeros(3)}
    block = summarize(list("abc"), values, [8, 8])
    assert block["definitions"]["radiodiff"]["metrics"]["psnr"]["mean"] == pytest.approx(32.0)
    assert block["definitions"]["radiodiff"]["metrics"]["ssim"]["median"] == pytest.approx(0.9)
    assert "radiounet" not in block["definitions"]  # not computed: not reported
    assert block["worst"][0]["radiodiff_psnr"] == 30.0
