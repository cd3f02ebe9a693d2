import math

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from model.metrics import mean_metrics, nmse, per_sample_metrics, psnr, rmse, ssim
from train.data.synthetic import city, sample


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
