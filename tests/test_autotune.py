"""The inference path chosen by measurement (runtime/autotune.py): the fastest accurate one
per operation (recording and sharing it: tests/test_decision.py)."""
from __future__ import annotations

import pytest
import torch

from model.autoencoder import AutoencoderKL
from runtime import autotune as at
from runtime.inference import InferenceOptions
from tests.conftest import tiny_model_config


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return AutoencoderKL.from_config(tiny_model_config())


def test_path_names_parse_to_options_and_unknown_parts_are_named():
    options = at.options_for("bf16+channels_last")
    assert options["precision"] == "bf16" and options["channels_last"]
    assert not options["winograd"] and set(options) == set(InferenceOptions.__dataclass_fields__)
    assert at.options_for("fp32") == {**{f: False for f in options}, "precision": "fp32"}
    with pytest.raises(ValueError, match="'avx9'"):
        at.options_for("bf16+avx9")


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("native_bf16", [True, False])
@pytest.mark.parametrize("winograd", [True, False])
@pytest.mark.parametrize("glibc", [True, False])
def test_candidate_names_are_in_the_canonical_order(monkeypatch, device, native_bf16, winograd,
                                                     glibc):
    """A name autotune prints, pinned as --path, is the request the decision file is keyed by
    (InferenceOptions.describe()'s order), so it reads back the same file."""
    from runtime.decision import resolve_request
    monkeypatch.setattr(at.machine, "native_bf16", lambda: native_bf16)
    monkeypatch.setattr(at, "winograd_available", lambda: winograd)
    monkeypatch.setattr(at, "glibc", lambda: object() if glibc else None)
    names = at.candidates(torch.device(device))
    assert names[-1] == at.REFERENCE and len(set(names)) == len(names)
    for name in names:
        assert InferenceOptions(**at.options_for(name)).describe() == name
        assert resolve_request(name, torch.device(device)) == name
    assert any("reuse_memory" in n for n in names) == (glibc and device == "cpu")
    assert any("winograd" in n for n in names) == (winograd and device == "cpu")


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
    from runtime.decision import Decision
    rows = [at.Measured("bf16", 1.0, 1.0, 60.0, 40.0),
            at.Measured("fp32+reuse_memory", 5.0, 9.0, 120.0, 110.0)]
    decision = Decision("auto", {"encode": "bf16", "decode": "fp32+reuse_memory"},
                        {m.path: m for m in rows})
    runner = _auto(decision, tiny, torch.device("cpu"))
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


def test_the_choice_is_the_fastest_accurate_candidate(tiny):
    choice = at.autotune(tiny, "cpu", (64, 64), calls=2)
    table = {row.path: row for row in choice.table}
    assert list(table) == at.candidates(torch.device("cpu"))
    assert table["fp32"].accurate and table["fp32"].note == "the reference"
    for op in at.OPS:
        fit = [row for row in choice.table if row.accurate_for(op)]
        assert choice.path_for(op) == min(fit, key=lambda r: r.ms(op)).path, op
    assert all(row.accurate == (min(row.encode_psnr_db, row.decode_psnr_db) >= 50)
               for row in choice.table if row.path != "fp32")
    for row in choice.table:  # a Winograd path carries the kernels it measured
        assert (row.winograd_plan is not None) == ("winograd" in row.path and row.note == ""), row


def test_a_spent_budget_leaves_the_rest_unmeasured_and_falls_back_to_fp32(tiny):
    choice = at.autotune(tiny, "cpu", (64, 64), budget_s=0.0)
    assert {choice.path_for(op) for op in at.OPS} == {"fp32"}
    assert all("not measured" in row.note for row in choice.table)


def test_the_probe_maps_look_like_radio_maps():
    maps = at.probe_maps(2, (64, 64))
    assert maps.shape == (2, 1, 64, 64) and maps.min() == -1.0 and maps.max() <= 1.0
    assert (maps == -1.0).float().mean() > 0.02  # buildings
    assert not torch.equal(maps[0], maps[1])




def test_each_candidate_is_logged_as_one_table_row_with_its_progress(tiny, caplog):
    """Server start-up once sat silent through the whole autotune: now one header line, a
    row per candidate as it is measured (i/n, seconds so far) and a readable choice."""
    caplog.set_level("INFO", logger="runtime.autotune")
    at.autotune(tiny, "cpu", (64, 64), budget_s=0.0)
    names = at.candidates(torch.device("cpu"))
    lines = [r.getMessage() for r in caplog.records if r.name == "runtime.autotune"]
    assert lines[0].startswith(f"autotune: measuring {len(names)} paths at 64x64 on cpu")
    for i, name in enumerate(names, 1):
        assert lines[i].startswith(f"autotune: {i}/{len(names)} ") and f" {name} " in lines[i]
    assert lines[-1].startswith("autotune: chose encode fp32, decode fp32, reconstruct fp32 in ")
