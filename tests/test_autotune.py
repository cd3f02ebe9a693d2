"""The inference path chosen by measurement (runtime/autotune.py): the fastest accurate one,
cached per machine, model and size; pinned or measured by the server, shown in /info."""
from __future__ import annotations

import json

import pytest
import requests
import torch

from model.autoencoder import AutoencoderKL
from runtime import autotune as at
from runtime.inference import InferenceOptions
from tests.test_server import running_server, save_tiny_checkpoint, tiny_model_config


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(at.CACHE_ENV, str(tmp_path))
    return tmp_path / "autotune"


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return AutoencoderKL.from_config(tiny_model_config())


def test_path_names_parse_to_options_and_unknown_parts_are_named():
    options = at.options_for("bf16+channels_last+fused_attention")
    assert options["precision"] == "bf16" and options["channels_last"]
    assert not options["winograd"] and set(options) == set(InferenceOptions.__dataclass_fields__)
    assert at.options_for("fp32") == {**{f: False for f in options}, "precision": "fp32"}
    with pytest.raises(ValueError, match="'avx9'"):
        at.options_for("bf16+avx9")


def test_an_operation_can_take_a_path_only_it_is_accurate_on():
    fast_enc = at.Measured("bf16", 1.0, 1.0, 60.0, 40.0)  # encoder fine, decoder not
    plain = at.Measured("fp32", 5.0, 9.0)
    choice = at.Choice([fast_enc, plain], {})
    assert [choice.path_for(op) for op in at.OPS] == ["bf16", "fp32", "fp32"]


def test_a_reproducible_choice_skips_paths_that_pick_kernels_by_timing():
    race = at.Measured("winograd+matmul_1x1", 1.0, 1.0, 120.0, 110.0)
    plain = at.Measured("matmul_1x1", 2.0, 2.0, 130.0, 120.0)
    choice = at.Choice([race, plain, at.Measured("fp32", 5.0, 9.0)], {})
    assert choice.path_for("encode") == "winograd+matmul_1x1"
    assert choice.path_for("encode", reproducible=True) == "matmul_1x1"


def test_the_bench_auto_row_takes_each_operations_precision(tiny):
    """bench.model times `auto`'s operations each under its own path's settings: pct_peak
    divides by the peak of the precision it runs in (a bf16 encoder beside an fp32 decoder: no
    one peak for reconstruct), the encoder runs under its own malloc setting, not the
    decoder's."""
    from bench.paths import _auto
    choice = at.Choice([at.Measured("bf16", 1.0, 1.0, 60.0, 40.0),
                        at.Measured("fp32+reuse_memory", 5.0, 9.0, 120.0, 110.0),
                        at.Measured("fp32", 6.0, 10.0)], {})
    runner = _auto(choice, tiny, torch.device("cpu"))
    assert [runner.precision_for(op) for op in at.OPS] == ["bf16", "fp32", None]
    assert [runner.reuse_memory_for(op) for op in at.OPS] == [False, True, True]
    x = torch.rand(1, 1, 32, 32) * 2 - 1
    assert runner.decode(runner.encode(x)).shape == x.shape


def test_the_bench_peak_is_the_precisions_own_unit(tiny, monkeypatch):
    """pct_peak of a bf16 row divides by the AMX tile unit's rate where the CPU has one (16x
    the AVX-512 fp32 rate), by twice fp32 with AVX512-BF16 vectors only, and by nothing where
    bf16 is emulated; oneDNN's bf16 path counts as bf16."""
    import bench.common as common
    from bench.paths import fast
    amx = {"avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "avx512_fp16"}
    for flags, bf16, fp16 in [(amx, 16, 2), (amx - {"amx_bf16"}, 2, 2),
                              ({"avx2", "fma"}, None, None)]:
        monkeypatch.setattr(common, "cpu_flags", lambda: flags)
        peaks = common.cpu_peak(2)["flops"]
        ratios = [None if peaks[p] is None else peaks[p] / peaks["fp32"] for p in ("bf16", "fp16")]
        assert ratios == [bf16, fp16], flags
    options = at.options_for("onednn_bf16")
    assert fast("onednn_bf16", tiny, torch.device("cpu"), options).precision == "bf16"


def test_the_choice_is_the_fastest_accurate_candidate_and_it_is_cached(tiny, cache):
    choice = at.autotune(tiny, "cpu", (64, 64), calls=2)
    table = {row.path: row for row in choice.table}
    assert list(table) == at.candidates(torch.device("cpu"))
    assert table["fp32"].accurate and table["fp32"].note == "the reference"
    for op in at.OPS:
        fit = [row for row in choice.table if row.accurate_for(op)]
        assert choice.path_for(op) == min(fit, key=lambda r: r.ms(op)).path, op
    assert all(row.accurate == (min(row.encode_psnr_db, row.decode_psnr_db) >= 50)
               for row in choice.table if row.path != "fp32")
    files = list(cache.glob("*.json"))
    assert json.loads(files[0].read_text())["paths"] == choice.report()["paths"]
    assert len(files) == 1
    again = at.autotune(tiny, "cpu", (64, 64))
    assert again.cached == str(files[0]) and again.report()["paths"] == choice.report()["paths"]
    assert [r.path for r in again.table] == list(table)
    other = at.autotune(tiny, "cpu", (32, 32), calls=1)  # another size: measured anew
    assert other.cached is None and len(list(cache.glob("*.json"))) == 2


def test_a_spent_budget_leaves_the_rest_unmeasured_and_falls_back_to_fp32(tiny, cache):
    choice = at.autotune(tiny, "cpu", (64, 64), budget_s=0.0, use_cache=False)
    assert {choice.path_for(op) for op in at.OPS} == {"fp32"} and not list(cache.glob("*.json"))
    assert all("not measured" in row.note for row in choice.table)


def test_a_changed_key_is_never_served_from_the_cache(tiny, cache, monkeypatch):
    at.autotune(tiny, "cpu", (64, 64), calls=1)
    monkeypatch.setattr(torch, "__version__", "0.0.0-other")  # another torch: measure again
    assert at.autotune(tiny, "cpu", (64, 64), calls=1).cached is None


def test_the_probe_maps_look_like_radio_maps():
    maps = at.probe_maps(2, (64, 64))
    assert maps.shape == (2, 1, 64, 64) and maps.min() == -1.0 and maps.max() <= 1.0
    assert (maps == -1.0).float().mean() > 0.02  # buildings
    assert not torch.equal(maps[0], maps[1])


def test_the_server_shows_its_measured_choice_and_a_pin_skips_measuring(tmp_path):
    save_tiny_checkpoint(tmp_path)
    env = {at.CACHE_ENV: str(tmp_path / "cache")}
    with running_server(tmp_path, [], env, path="auto") as (url, *_):
        workers = requests.get(url + "/info", timeout=10).json()["workers"]
    tuned = {w["endpoint"]: w["autotune"] for w in workers}
    paths = tuned["/reconstruct"]["paths"]
    for w in workers:  # each endpoint runs the path chosen for its operation
        path = paths[w["endpoint"].strip("/")]
        assert w["precision"] == InferenceOptions(**at.options_for(path)).describe(), w
    tuned = list(tuned.values())
    assert sum(t["from_cache"] is None for t in tuned) == 1, "one worker measured, two read it"
    assert {row["path"] for row in tuned[0]["table"]} == set(at.candidates(torch.device("cpu")))
    path = "matmul_1x1+fused_attention"
    with running_server(tmp_path, [], env, path=path) as (url, *_):
        workers = requests.get(url + "/info", timeout=10).json()["workers"]
    assert all(w["autotune"] is None and w["precision"] == f"fp32+{path}" for w in workers)
