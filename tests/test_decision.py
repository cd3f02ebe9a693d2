"""The recorded inference path decision (runtime/decision.py): measured once per machine,
weights and size, read by every other process, accuracy-gated, and what makes two server
processes return identical bytes."""
from __future__ import annotations

import copy
import io
import json

import numpy as np
import pytest
import requests
import torch

from model.autoencoder import AutoencoderKL
from model.io import encode_npy
from runtime import autotune as at
from runtime import decision as dc
from runtime.fast_layers import winograd_available
from tests.conftest import tiny_model_config
from tests.test_server import KEY, running_server, save_tiny_checkpoint


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(dc.CACHE_ENV, str(tmp_path))
    return tmp_path / "decisions"


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return AutoencoderKL.from_config(tiny_model_config())


def test_auto_is_measured_once_and_read_back_by_the_next_process(tiny, cache):
    first = dc.decide(copy.deepcopy(tiny), "cpu", (64, 64), "auto", calls=1)
    assert not first.read and first.file and first.table is not None
    choice = first.table_choice()
    assert first.paths == {op: choice.path_for(op) for op in dc.OPERATIONS}
    files = list(cache.glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["paths"] == first.paths
    again = dc.decide(copy.deepcopy(tiny), "cpu", (64, 64), "auto")
    assert again.read and again.file == str(files[0]) and again.paths == first.paths
    for path in set(first.paths.values()):
        assert again.plan(path) == first.plan(path)  # the kernels travel with the decision
    report = again.report()
    assert report["paths"]["reconstruct"] == f"{first.paths['encode']} -> {first.paths['decode']}"


def test_the_weights_size_and_torch_are_in_the_key(tiny, cache, monkeypatch):
    dc.decide(copy.deepcopy(tiny), "cpu", (64, 64), "default")
    other = copy.deepcopy(tiny)
    with torch.no_grad():
        other.decoder.conv_out.bias.add_(1e-3)  # other weights: another bf16 accuracy
    assert dc.weights_sha256(other) != dc.weights_sha256(tiny)
    assert not dc.decide(other, "cpu", (64, 64), "default").read
    assert not dc.decide(copy.deepcopy(tiny), "cpu", (32, 32), "default").read
    assert dc.decide(copy.deepcopy(tiny), "cpu", (64, 64), "default").read
    monkeypatch.setattr(torch, "__version__", "0.0.0-other")
    assert not dc.decide(copy.deepcopy(tiny), "cpu", (64, 64), "default").read
    assert len(list(cache.glob("*.json"))) == 4


def test_a_pinned_path_below_the_gate_is_refused_unless_allowed(tiny, cache, monkeypatch):
    """The gate compares mean, logvar and decoded maps on every probe with the served weights;
    a gate above the cap (identical outputs score MAX_DB) refuses every path but plain fp32."""
    monkeypatch.setattr(at, "ACCURATE_DB", at.MAX_DB + 1)
    monkeypatch.setattr(dc, "ACCURATE_DB", at.MAX_DB + 1)
    with pytest.raises(dc.PathRefused, match="matmul_1x1.*below the 201 dB gate"):
        dc.decide(copy.deepcopy(tiny), "cpu", (32, 32), "matmul_1x1")
    allowed = dc.decide(copy.deepcopy(tiny), "cpu", (32, 32), "matmul_1x1", allow_inaccurate=True)
    assert allowed.report()["allow_inaccurate"] and allowed.read  # the refused one was recorded
    assert dc.decide(copy.deepcopy(tiny), "cpu", (32, 32), "fp32").paths["encode"] == "fp32"


def test_the_gate_sees_a_wrong_logvar(tiny):
    """An encoder whose mean is right and whose logvar is not fails the gate."""
    ref = at.reference_outputs(tiny, torch.device("cpu"), (32, 32))
    bad = copy.deepcopy(tiny)
    with torch.no_grad():  # quant_conv's second half of channels is the logvar
        bad.quant_conv.bias[tiny.embed_dim:] += 0.5
    row = at.measure("matmul_1x1", bad, torch.device("cpu"), ref, calls=1)
    good = at.measure("matmul_1x1", tiny, torch.device("cpu"), ref, calls=1)
    assert good.accurate and not row.accurate and row.encode_psnr_db < 50 < row.decode_psnr_db


@pytest.mark.skipif(not winograd_available(), reason="torch built without NNPACK")
def test_engines_of_two_processes_with_one_decision_give_identical_bytes(tiny, cache):
    """Winograd's per-layer kernels are measured once and installed from the decision, so two
    engines (as two worker processes build them) compute the same bits."""
    decision = dc.decide(copy.deepcopy(tiny), "cpu", (64, 64), "winograd+matmul_1x1")
    assert decision.plan("fp32+winograd+matmul_1x1") is not None
    maps = at.probe_maps(2, (64, 64), seed=3)
    outs = []
    for _ in range(2):
        read = dc.decide(copy.deepcopy(tiny), "cpu", (64, 64), "winograd+matmul_1x1")
        engine = dc.engines(read, copy.deepcopy(tiny), "cpu")["encode"]
        outs.append(engine.encode(maps).mean)
    assert read.read and torch.equal(outs[0], outs[1])


def test_two_server_processes_and_every_endpoint_return_identical_bytes(tmp_path):
    """/encode then /decode equals /reconstruct byte for byte, and a second server process on
    the same machine and model returns the same bytes and has the same budgets: one recorded
    decision and one recorded speed, read by all."""
    save_tiny_checkpoint(tmp_path)
    env = {dc.CACHE_ENV: str(tmp_path / "cache"), "RADIODIFF_TEST_KEY": KEY}
    args = ["--api-key-env", "RADIODIFF_TEST_KEY"]
    maps = at.probe_maps(2, (64, 64), seed=5).numpy() * 0.5 + 0.5
    answers = []
    for _ in range(2):
        with running_server(tmp_path, args, env, path="auto") as (url, *_):
            post = _poster(url)
            z = post("/encode", maps)
            answers.append((z, post("/decode", z), post("/reconstruct", maps),
                            requests.get(url + "/info", timeout=10,
                                         headers={"X-API-Key": KEY}).json()))
    (z, dec, rec, info), (z2, dec2, rec2, info2) = answers
    assert np.array_equal(dec, rec), "encode then decode differs from reconstruct"
    assert np.array_equal(z, z2) and np.array_equal(rec, rec2), "two processes differ"
    budgets = [{ep: e["budget_megapixels"] for ep, e in i["budget"]["endpoints"].items()}
               for i in (info, info2)]
    assert budgets[0] == budgets[1], "budgets moved"
    assert all(w["speed_source"] == "measured" for w in info["workers"])
    assert all(w["speed_source"].startswith("recorded in ") for w in info2["workers"])
    decisions = [w["decision"] for w in info["workers"] + info2["workers"]]
    assert sum(not d["read_from_file"] for d in decisions) == 1, "one worker measured"
    assert len({d["file"] for d in decisions}) == 1
    paths = decisions[0]["paths"]
    served = info["model"]["precision"]  # what /info says each endpoint computes in
    assert served["encode"] == paths["encode"] and served["decode"] == paths["decode"]
    assert served["reconstruct"] == " -> ".join(dict.fromkeys([paths["encode"],
                                                               paths["decode"]]))


def _poster(url: str):
    def post(path: str, array: np.ndarray) -> np.ndarray:
        r = requests.post(url + path, data=encode_npy(array), timeout=60,
                          headers={"Content-Type": "application/x-npy",
                                   "Accept": "application/x-npy", "X-API-Key": KEY})
        assert r.status_code == 200, r.text
        return np.load(io.BytesIO(r.content))
    return post
