"""train/evaluate.py: metrics at native and model resolution, sums for validation, the worst
maps list; checked against numpy hand computations on a tiny dataset of known maps."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from model.io import from_model, to_model
from model.metrics import METRIC_NAMES
from radiomaps import RadioMapDataset, build_loader
from radiomaps.base import resize
from train.evaluate import (SAME, WORST, evaluate, format_table, means_from_sums, metric_sums,
                            summarize)

NATIVE = 64
CPU = torch.device("cpu")


class KnownMaps(RadioMapDataset):
    """64x64 maps: a smooth gain field from a seeded rng, 0 inside one building block."""

    def load(self, map_id: int, tx: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([map_id, tx])
        yy, xx = np.mgrid[0:NATIVE, 0:NATIVE] / NATIVE
        gain = 0.2 + 0.6 * np.abs(np.sin(3 * xx + rng.uniform(0, 3)) * np.cos(2 * yy))
        buildings = np.zeros((NATIVE, NATIVE), dtype=np.float32)
        top, left = rng.integers(5, 40, 2)
        buildings[top:top + 12, left:left + 16] = 1.0
        gain[buildings > 0] = 0.0
        return {"image": gain.astype(np.float32), "buildings": buildings,
                "tx": np.zeros((NATIVE, NATIVE), dtype=np.float32)}


class ConstantMaps(RadioMapDataset):
    """Map m, transmitter t: the constant value VALUES[m * num_tx + t], no buildings."""
    VALUES = np.linspace(0.05, 0.95, 14)[np.random.default_rng(0).permutation(14)]

    def load(self, map_id: int, tx: int) -> dict[str, np.ndarray]:
        value = self.VALUES[map_id * self.num_tx + tx]
        zeros = np.zeros((32, 32), dtype=np.float32)
        return {"image": zeros + np.float32(value), "buildings": zeros, "tx": zeros}


class Constant(nn.Module):
    """A stand-in autoencoder whose reconstruction is the constant `value` (in [0, 1])."""

    def __init__(self, value: float):
        super().__init__()
        self.value = value

    def forward(self, x, sample_posterior=True):
        return (torch.full_like(x, float(to_model(self.value))),)


class Identity(nn.Module):
    def forward(self, x, sample_posterior=True):
        return (x,)


def _loader(dataset, batch_size=3):
    return build_loader(dataset, batch_size, shuffle=False, num_workers=0, drop_last=False)


def _native(size=32, with_native=True, maps=(1, 2), num_tx=2):
    dataset = KnownMaps(list(maps), num_tx, image_size=size)
    dataset.with_native = with_native
    return dataset


def _hand(pred: np.ndarray, target: np.ndarray, buildings: np.ndarray) -> dict[str, float]:
    """PSNR, RMSE and the radio metrics of one map, by hand."""
    err = pred - target
    outdoor = ~buildings
    k = math.ceil(outdoor.sum() / 10)
    strong = outdoor & (target >= np.sort(target[outdoor])[::-1][k - 1])
    return {"psnr": 10 * np.log10(1 / np.mean(err ** 2)), "rmse": np.sqrt(np.mean(err ** 2)),
            "rmse_db": 100 * np.sqrt(np.mean(err[outdoor] ** 2)),
            "building_error": np.mean(np.abs(err[buildings])),
            "tx_rmse_db": 100 * np.sqrt(np.mean(err[strong] ** 2))}


def _hand_means(dataset, pred_of, target_of) -> dict[str, float]:
    """Means over the dataset's items of `_hand`, with pred / target made from native maps."""
    per_map = []
    for i in range(len(dataset)):
        arrays = dataset.load(*dataset.locate(i))
        per_map.append(_hand(pred_of(arrays), target_of(arrays)["image"],
                             target_of(arrays)["buildings"] > 0.5))
    return {k: float(np.mean([m[k] for m in per_map])) for k in per_map[0]}


def test_items_hold_native_maps_only_when_resized_and_asked():
    item = _native()[0]
    assert item["image"].shape == (1, 32, 32) and item["native_image"].shape == (1, 64, 64)
    arrays = KnownMaps([1], 2).load(1, 0)
    assert torch.allclose(from_model(item["native_image"])[0], torch.from_numpy(arrays["image"]))
    assert torch.equal(item["native_buildings"][0] > 0, torch.from_numpy(arrays["buildings"] > 0))
    assert "native_image" not in _native(with_native=False)[0]
    assert "native_image" not in _native(size="native")[0]  # nothing resized
    assert "native_image" not in _native(size=64)[0]  # resized to its own size: not resized


def test_native_metrics_compare_the_upsized_reconstruction_with_the_native_truth():
    dataset = _native()
    c = 0.4
    results = evaluate(Constant(c), _loader(dataset), CPU)
    assert results["maps"] == 4
    native, model = results["native"], results["model"]
    assert native["size"] == [64, 64] and model["size"] == [32, 32]
    # a constant reconstruction stays constant when resized back: error = c - native truth
    by_hand = _hand_means(dataset, lambda a: np.full((64, 64), c),
                          lambda a: {k: a[k].astype(np.float64) for k in a})
    for name, ref in by_hand.items():
        assert native["metrics"][name]["mean"] == pytest.approx(ref, rel=1e-4), name
    assert native["metrics"]["building_error"]["mean"] == pytest.approx(c, rel=1e-5)

    def small(a):  # the model-resolution truth: native maps resized to 32x32
        maps = resize(torch.from_numpy(np.stack([a["image"], a["buildings"]])), (32, 32))
        return {"image": maps[0].double().numpy(), "buildings": maps[1].numpy()}
    by_hand = _hand_means(dataset, lambda a: np.full((32, 32), c), small)
    for name, ref in by_hand.items():
        assert model["metrics"][name]["mean"] == pytest.approx(ref, rel=1e-4), name
    assert native["metrics"]["psnr"]["mean"] != pytest.approx(model["metrics"]["psnr"]["mean"],
                                                              rel=1e-3)


def test_a_perfect_model_resolution_reconstruction_still_loses_at_native_resolution():
    results = evaluate(Identity(), _loader(_native()), CPU)
    assert results["model"]["metrics"]["psnr"]["mean"] == "inf"  # JSON-safe infinity
    assert results["model"]["metrics"]["rmse_db"]["mean"] == 0.0
    native = results["native"]["metrics"]
    assert 20 < native["psnr"]["mean"] < 60 and native["rmse_db"]["mean"] > 0.1
    # the native PSNR of one map, by hand: upsize(downsize(truth)) against the truth
    arrays = KnownMaps([1], 2).load(1, 0)
    truth = torch.from_numpy(arrays["image"])[None]
    round_trip = resize(resize(truth, (32, 32)), (64, 64))[0].double().numpy()
    ref = 10 * np.log10(1 / np.mean((round_trip - arrays["image"]) ** 2))
    psnr_1_0 = next(m["psnr"] for m in results["native"]["worst"] if m["name"] == "1_0")
    assert psnr_1_0 == pytest.approx(ref, rel=1e-4)


def test_unresized_maps_report_one_block_and_say_so():
    results = evaluate(Constant(0.4), _loader(_native(size="native")), CPU)
    assert results["model"] == SAME and results["native"]["size"] == [64, 64]
    table = format_table(results)
    assert "native 64x64" in table and "model" not in table.splitlines()[0]
    assert SAME in table
    resized = format_table(evaluate(Constant(0.4), _loader(_native()), CPU))
    assert resized.splitlines()[0] == "| metric | native 64x64 | model 32x32 |"
    assert len(resized.splitlines()) == 2 + len(METRIC_NAMES)


def test_worst_and_best_maps_by_psnr_with_names():
    dataset = ConstantMaps(list(range(7)), 2, image_size="native")
    results = evaluate(Constant(0.5), _loader(dataset, batch_size=4), CPU)["native"]
    names = [f"{i // 2}_{i % 2}" for i in range(14)]
    errors = np.abs(ConstantMaps.VALUES - 0.5)
    expected = [names[i] for i in np.argsort(-errors, kind="stable")]
    assert [m["name"] for m in results["worst"]] == expected[:WORST]
    assert [m["name"] for m in results["best"]] == expected[::-1][:3]
    worst = results["worst"][0]
    i = names.index(worst["name"])
    assert worst["psnr"] == pytest.approx(-20 * np.log10(errors[i]), rel=1e-4)
    assert worst["building_error"] == "nan"  # no buildings in these maps
    psnrs = [m["psnr"] for m in results["worst"]]
    assert psnrs == sorted(psnrs)
    assert results["metrics"]["building_error"]["mean"] == "nan"


def test_summary_percentiles_ties_and_undefined_values():
    values = {name: torch.tensor([3.0, 1.0, 2.0, 1.0, 5.0]) for name in METRIC_NAMES}
    values["building_error"] = torch.tensor([0.1, float("nan"), 0.3, float("nan"), 0.2])
    block = summarize(list("abcde"), values, [8, 8])
    assert [m["name"] for m in block["worst"]] == ["b", "d", "c", "a", "e"]  # ties: in order
    assert [m["name"] for m in block["best"]] == ["e", "a", "c"]
    assert block["metrics"]["psnr"] == {"mean": 2.4, "p5": 1.0, "median": 2.0, "p95": 5.0}
    assert block["metrics"]["building_error"]["mean"] == pytest.approx(0.2)  # of the 3 defined
    assert block["metrics"]["building_error"]["median"] == pytest.approx(0.2)


def test_metric_sums_give_the_means_of_all_maps_for_validation():
    dataset = _native()
    sums, first = metric_sums(Constant(0.4), _loader(dataset), CPU)
    assert sums.shape == (2 * len(METRIC_NAMES) + 1,) and sums.dtype == torch.float64
    means = means_from_sums(sums + sums)  # two DDP ranks holding the same maps
    assert means["maps"] == 8
    model = evaluate(Constant(0.4), _loader(dataset), CPU)["model"]["metrics"]
    for name in METRIC_NAMES:
        assert means[name] == pytest.approx(model[name]["mean"], rel=1e-6), name
    target, pred = first
    assert target.shape == (3, 1, 32, 32) and torch.allclose(pred, torch.full_like(pred, 0.4))
    three = means_from_sums(metric_sums(Constant(0.4), _loader(dataset), CPU, max_batches=1)[0])
    assert three["maps"] == 3


def test_means_skip_maps_where_a_metric_is_undefined():
    dataset = ConstantMaps(list(range(7)), 2, image_size="native")
    means = means_from_sums(metric_sums(Constant(0.5), _loader(dataset), CPU)[0])
    assert means["maps"] == 14 and math.isnan(means["building_error"])
    assert means["rmse_db"] == pytest.approx(100 * np.mean(np.abs(ConstantMaps.VALUES - 0.5)),
                                             rel=1e-4)
