import math

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from model.metrics import (DB_PER_GRAY, building_error, mean_metrics, nmse,
                           per_sample_metrics, psnr, rmse, rmse_db, ssim, tx_rmse_db)
from radiomaps.synthetic import city, sample


def _skimage_ssim(a: np.ndarray, b: np.ndarray) -> float:
    return structural_similarity(a, b, gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False, data_range=1.0)


@pytest.fixture(scope="module")
def pairs():
    """Targets: a synthetic radio map and random textures; predictions: noisy/blurred copies."""
    rng = np.random.default_rng(0)
    radio = sample(7, 1, 0, city(7, 1))["image"][::4, ::4]  # 64x64, real map structure
    targets = np.stack([radio, rng.random((64, 64)), np.full((64, 64), 0.3)]).astype(np.float64)
    noise = rng.normal(0.0, [[[0.02]], [[0.1]], [[0.05]]], targets.shape)
    preds = np.clip(targets + noise, 0.0, 1.0)
    return torch.from_numpy(preds[:, None]), torch.from_numpy(targets[:, None])


def test_ssim_matches_scikit_image_per_sample(pairs):
    preds, targets = pairs
    ours = ssim(preds, targets)
    assert ours.shape == (3,)
    ref = [_skimage_ssim(p[0].numpy(), t[0].numpy()) for p, t in zip(preds, targets)]
    assert np.allclose(ours.numpy(), ref, atol=1e-5)


def test_psnr_matches_scikit_image_per_sample(pairs):
    preds, targets = pairs
    ref = [peak_signal_noise_ratio(t[0].numpy(), p[0].numpy(), data_range=1.0)
           for p, t in zip(preds, targets)]
    assert np.allclose(psnr(preds, targets).numpy(), ref, atol=1e-4)


def test_hand_computed_values_on_a_constant_map():
    target = torch.full((1, 1, 16, 16), 0.5)
    pred = torch.full((1, 1, 16, 16), 0.6)
    assert rmse(pred, target).item() == pytest.approx(0.1, abs=1e-6)
    assert nmse(pred, target).item() == pytest.approx(0.01 / 0.25, abs=1e-6)
    assert psnr(pred, target).item() == pytest.approx(20.0, abs=1e-4)
    # constant maps: SSIM is the luminance term alone
    c1 = 0.01 ** 2
    assert ssim(pred, target).item() == pytest.approx((2 * .3 + c1) / (.36 + .25 + c1), abs=1e-6)


def test_identical_maps_are_perfect():
    x = torch.rand(2, 1, 32, 32)
    values = per_sample_metrics(x, x.clone())
    assert torch.allclose(values["ssim"], torch.ones(2))
    assert torch.all(values["nmse"] == 0) and torch.all(values["rmse"] == 0)
    assert all(math.isinf(v) for v in values["psnr"].tolist())


def test_mean_is_the_batch_average_and_shapes_are_flexible(pairs):
    preds, targets = pairs
    per = per_sample_metrics(preds, targets)
    means = mean_metrics(preds, targets)
    assert set(means) == {"psnr", "ssim", "nmse", "rmse"}
    for name, value in means.items():
        assert value == pytest.approx(per[name].mean().item(), rel=1e-6)
    # [B, H, W] and a single [H, W] map give the same numbers as [B, 1, H, W]
    assert torch.allclose(ssim(preds[:, 0], targets[:, 0]), per["ssim"])
    single = ssim(preds[0, 0], targets[0, 0])
    assert single.shape == () and single.item() == pytest.approx(per["ssim"][0].item())


def test_worse_reconstructions_score_worse(pairs):
    _, targets = pairs
    target = targets[:1]
    scores = [per_sample_metrics((target + s * torch.randn_like(target)).clamp(0, 1), target)
              for s in (0.01, 0.05, 0.2)]
    for better, worse in zip(scores, scores[1:]):
        assert better["psnr"] > worse["psnr"] and better["ssim"] > worse["ssim"]
        assert better["nmse"] < worse["nmse"] and better["rmse"] < worse["rmse"]


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match=r"same shape.*\(2, 1, 32, 32\).*\(2, 1, 32, 16\)"):
        ssim(torch.rand(2, 1, 32, 32), torch.rand(2, 1, 32, 16))
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8))


# ----- radio-map metrics: building mask, dB --------------------------------------------------

def _radio_case(seed: int = 1, size: int = 16):
    """A random gain map with a building block (truth 0 there) and a noisy prediction."""
    rng = np.random.default_rng(seed)
    buildings = np.zeros((size, size), dtype=bool)
    buildings[3:7, 4:12] = True
    target = np.round(rng.uniform(0.2, 0.9, (size, size)) * 255) / 255  # 8-bit levels: ties
    target[buildings] = 0.0
    pred = np.clip(target + rng.normal(0, 0.05, target.shape), 0, 1)
    return pred, target, buildings


def _hand_radio_metrics(pred, target, buildings):
    outdoor = ~buildings
    err = pred - target
    strong_k = int(np.ceil(outdoor.sum() / 10))
    threshold = np.sort(target[outdoor])[::-1][strong_k - 1]
    strong = outdoor & (target >= threshold)
    return {"rmse_db": 100 * np.sqrt(np.mean(err[outdoor] ** 2)),
            "building_error": np.mean(np.abs(err[buildings])),
            "tx_rmse_db": 100 * np.sqrt(np.mean(err[strong] ** 2))}


def test_radio_metrics_match_numpy_hand_computations():
    cases = [_radio_case(seed) for seed in (1, 2, 3)]
    preds, targets, masks = (torch.from_numpy(np.stack(a))[:, None] for a in zip(*cases))
    values = per_sample_metrics(preds, targets, masks)
    assert set(values) == {"psnr", "ssim", "nmse", "rmse", "rmse_db", "building_error",
                           "tx_rmse_db"}
    for i, case in enumerate(cases):
        for name, ref in _hand_radio_metrics(*case).items():
            assert values[name][i].item() == pytest.approx(ref, rel=1e-5), name


def test_radio_metric_values_on_a_hand_sized_map():
    # 4x5 map, 2 building pixels; 18 outdoor -> the strongest ceil(1.8) = 2 pixels
    target = torch.full((4, 5), 0.5)
    target[0, 0], target[0, 1] = 0.9, 0.8
    buildings = torch.zeros(4, 5, dtype=torch.bool)
    buildings[3, 3:] = True
    target[buildings] = 0.0
    pred = target + 0.01  # 1 dB everywhere outdoors ...
    pred[0, 0] = 0.9 - 0.04  # ... but 4 dB low at the strongest pixel
    pred[buildings] = 0.2
    assert rmse_db(pred, target, buildings).item() == pytest.approx(
        math.sqrt((17 * 1 + 16) / 18), rel=1e-5)
    assert building_error(pred, target, buildings).item() == pytest.approx(0.2, rel=1e-6)
    assert tx_rmse_db(pred, target, buildings).item() == pytest.approx(
        math.sqrt((16 + 1) / 2), rel=1e-5)


def test_strongest_pixels_include_ties_and_skip_buildings():
    # 10 outdoor pixels all at 0.4 (k = 1, but all tie) -> the error over all 10
    target = torch.tensor([[0.4] * 10 + [0.0] * 2])
    buildings = torch.tensor([[False] * 10 + [True] * 2])
    pred = target.clone()
    pred[0, :5] += 0.02
    pred[0, 10:] = 1.0  # huge building errors do not enter tx_rmse_db
    assert tx_rmse_db(pred, target, buildings).item() == pytest.approx(
        math.sqrt(0.5 * 4), rel=1e-5)


def test_radio_metrics_are_nan_without_pixels_to_average_and_need_a_bool_mask():
    target = torch.rand(2, 1, 16, 16)
    none = torch.zeros(2, 1, 16, 16, dtype=torch.bool)
    assert torch.isnan(building_error(target, target, none)).all()
    assert torch.isnan(rmse_db(target, target, ~none)).all()
    assert torch.isnan(tx_rmse_db(target, target, ~none)).all()
    assert mean_metrics(target, target, none)["rmse_db"] == 0.0
    assert math.isnan(mean_metrics(target, target, none)["building_error"])
    with pytest.raises(ValueError, match="bool mask"):
        rmse_db(target, target, none.float())
    with pytest.raises(ValueError, match=r"shape \(2, 1, 16, 16\)"):
        rmse_db(target, target, none[0])


def test_gain_to_db_scaling_has_one_definition():
    import model.io
    import radiomaps.synthetic as synthetic
    assert (synthetic.GAIN_MAX_DB, synthetic.GAIN_MIN_DB) == (-47.0, -147.0)
    assert synthetic.GAIN_MAX_DB is model.io.GAIN_MAX_DB
    assert DB_PER_GRAY == 100.0
