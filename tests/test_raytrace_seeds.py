"""bench/raytrace_seeds.py: the four comparisons of one map by hand."""
import numpy as np
import pytest

from bench.raytrace_seeds import FIGURES, map_figures, summarise


def test_seed_to_seed_and_averaged_targets_by_hand():
    buildings = np.zeros((16, 16), dtype=bool)
    buildings[:4, :4] = True
    traces = [np.full((16, 16), v) for v in (0.5, 0.6, 0.7)]
    recons = [np.full((16, 16), 0.6)] * 3  # a VAE that always outputs the seeds' mean
    f = map_figures(traces, recons, buildings)
    # pairs (0.1, 0.2, 0.1 apart): PSNR 20, 13.98, 20 dB
    assert f["tracer"]["psnr"] == pytest.approx((20 + 20 * np.log10(1 / 0.2) + 20) / 3, abs=1e-4)
    # seed k vs the mean of the others: 0.5 vs 0.65, 0.6 vs 0.6 (inf excluded below), 0.7 vs 0.55
    f2 = map_figures(traces[::2], recons[:2], buildings)  # two seeds: 0.5 and 0.7
    assert f2["tracer_vs_average"]["psnr"] == pytest.approx(20 * np.log10(1 / 0.2), abs=1e-4)
    assert f2["vae"]["psnr"] == pytest.approx(20.0, abs=1e-4)  # 0.6 vs 0.5 and vs 0.7
    assert f2["vae_vs_average"]["psnr"] == pytest.approx(20.0, abs=1e-4)  # vs 0.7 and vs 0.5
    assert f2["vae"]["rmse_db"] == pytest.approx(10.0, abs=1e-4)  # 0.1 gray = 10 dB


def test_a_map_whose_traces_agree_exactly_is_named_and_left_out_of_the_means():
    def row(tracer: float, vae: float) -> dict:
        return {"tracer": dict.fromkeys(FIGURES, tracer), "vae": dict.fromkeys(FIGURES, vae)}
    s = summarise({"a": row(30.0, 28.0), "b": row(float("inf"), 24.0), "c": row(34.0, 32.0)})
    assert s["identical_trace_maps"] == ["b"]
    assert s["mean"]["tracer"]["psnr"] == 32.0 and s["mean"]["vae"]["psnr"] == 30.0
    assert s["median"]["tracer"]["psnr"] == 34.0 and s["median"]["vae"]["psnr"] == 28.0
    assert [w["name"] for w in s["worst_by_vae_psnr"]] == ["b", "a", "c"]
