"""The recorded inference path decision (runtime/decision.py): measured once per machine,
weights and size, read by every other process, accuracy-gated, and what makes two server
processes return identical bytes."""
from __future__ import annotations

import ast
import copy
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
import torch

from model.autoencoder import AutoencoderKL
from model.io import encode_npy
from runtime import autotune as at
from runtime import decision as dc
from runtime.fast_layers import winograd_available
from runtime.inference import InferenceOptions
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
    pinned = "matmul_1x1+channels_last"
    dc.decide(copy.deepcopy(tiny), "cpu", (64, 64), pinned)
    other = copy.deepcopy(tiny)
    with torch.no_grad():
        other.decoder.conv_out.bias.add_(1e-3)  # other weights: another bf16 accuracy
    assert dc.weights_sha256(other) != dc.weights_sha256(tiny)
    assert not dc.decide(other, "cpu", (64, 64), pinned).read
    assert not dc.decide(copy.deepcopy(tiny), "cpu", (32, 32), pinned).read
    assert dc.decide(copy.deepcopy(tiny), "cpu", (64, 64), pinned).read
    monkeypatch.setattr(torch, "__version__", "0.0.0-other")
    assert not dc.decide(copy.deepcopy(tiny), "cpu", (64, 64), pinned).read
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


@pytest.mark.server
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


ROOT = Path(__file__).resolve().parent.parent


def test_default_is_plain_fp32_whatever_the_machine(tiny, cache, monkeypatch):
    """'default' is the neutral baseline: the plain fp32 network, no machine-tuned toggle,
    whatever this machine has (NNPACK, glibc, native bf16, a GPU); nothing measured or
    recorded. What is fastest comes only from the recorded measurement ('auto')."""
    from runtime import fast_layers, machine, malloc
    for has in (False, True):
        monkeypatch.setattr(fast_layers, "winograd_available", lambda: has)
        monkeypatch.setattr(malloc, "glibc", lambda: object() if has else None)
        monkeypatch.setattr(machine, "cpu_flags", lambda: {"avx512_bf16", "amx_bf16"} if has
                            else set())
        for device in ("cpu", "cuda"):
            request = dc.PathRequest((64, 64), "default")
            assert request.name(device) == "fp32"
        decision = dc.choose(copy.deepcopy(tiny), "cpu", dc.PathRequest((64, 64), "default"))
        assert decision.paths == {"encode": "fp32", "decode": "fp32"} and decision.file is None
        engine = dc.engines(decision, copy.deepcopy(tiny), "cpu")["encode"]
        assert engine.options == InferenceOptions()
    assert not cache.exists() or not list(cache.glob("*.json"))


def test_requests_that_cannot_be_served_name_the_option():
    cases = [(dc.PathRequest((64, 64), precision="fp16"), "--precision fp16 needs a CUDA"),
             (dc.PathRequest((64, 64), "fp32", "fp32"), "both choose the precision"),
             (dc.PathRequest((64, 64), "fp32+warp_drive"), "unknown path part 'warp_drive'"),
             (dc.PathRequest((64, 64), "winograd", reproducible=True), "by timing")]
    for request, words in cases:
        with pytest.raises(dc.PathRequestError, match=words):
            request.name("cpu")
    assert dc.PathRequest((64, 64), precision="fp16").name("cuda") is None  # measured
    assert dc.PathRequest((64, 64), "default").name("cpu") == "fp32"


def test_a_precision_pin_and_a_reproducible_request_narrow_the_measured_table():
    """They take, per operation, the fastest measured path they admit that is accurate for it
    (else the fastest admitted, for the gate to refuse or to serve when allowed)."""
    table = [at.Measured("bf16+channels_last", 1.0, 1.0, 60.0, 40.0),  # encode only accurate
             at.Measured("fp32+winograd+matmul_1x1", 2.0, 2.0, 120.0, 110.0),
             at.Measured("fp32+matmul_1x1", 3.0, 3.0, 130.0, 120.0),
             at.Measured("fp32", 5.0, 9.0, accurate=True)]
    measured = dc.Decision("auto", {"encode": "bf16+channels_last",
                                    "decode": "fp32+winograd+matmul_1x1"},
                           {m.path: m for m in table[:2]}, table=table)

    def narrowed(**fields):
        return dc._narrowed(measured, dc.PathRequest((64, 64), **fields))

    assert narrowed(reproducible=True).paths == {"encode": "bf16+channels_last",
                                                 "decode": "fp32+matmul_1x1"}
    assert narrowed(precision="fp32").paths == dict.fromkeys(dc.OPERATIONS,
                                                             "fp32+winograd+matmul_1x1")
    assert narrowed(precision="fp32", reproducible=True).paths == dict.fromkeys(
        dc.OPERATIONS, "fp32+matmul_1x1")
    bf16 = narrowed(precision="bf16")
    assert bf16.paths == dict.fromkeys(dc.OPERATIONS, "bf16+channels_last")
    with pytest.raises(dc.PathRefused, match="not accurate for decode"):
        dc._gate(bf16)
    assert narrowed(precision="fp16") is None  # none measured: the plain fp16 path is pinned


def test_two_processes_choose_the_same_recorded_decision(tmp_path):
    """choose() in two processes: the first measures and records, the second reads the same
    file, unchanged, and gets the same paths and kernel plans."""
    script = (
        "import json, torch\n"
        "from model.autoencoder import AutoencoderKL\n"
        "from runtime.decision import PathRequest, choose\n"
        "from tests.conftest import tiny_model_config\n"
        "torch.manual_seed(0)\n"
        "model = AutoencoderKL.from_config(tiny_model_config())\n"
        "d = choose(model, 'cpu', PathRequest((32, 32), calls=1))\n"
        "print(json.dumps({'paths': d.paths, 'file': d.file, 'read': d.read,\n"
        "                  'plans': {p: d.plan(p) for p in d.paths.values()}}))\n")
    env = {**os.environ, dc.CACHE_ENV: str(tmp_path), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    runs, contents = [], []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, timeout=300,
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        contents.append(Path(runs[-1]["file"]).read_bytes())
    first, second = runs
    assert not first["read"] and second["read"]
    assert first["file"] == second["file"] and contents[0] == contents[1]
    assert first["paths"] == second["paths"] and first["plans"] == second["plans"]
    assert len(list((tmp_path / "decisions").glob("*.json"))) == 1


# What callers outside runtime/ may use of the path machinery: choose() and what it returns,
# explicit options (benchmarks name theirs), never a policy of their own.
PUBLIC = {"runtime.decision": {"choose", "PathRequest", "PathRequestError", "PathRefused",
                               "Decision", "engines", "file_lock", "CACHE_ENV"},
          "runtime.inference": {"prepare_for_inference", "InferenceModel", "InferenceOptions"},
          "runtime.autotune": {"options_for"}}


def test_choose_is_the_only_path_policy_callers_see():
    """No module outside runtime/ (tests aside) computes a path of its own: it imports only
    runtime.decision.choose and its types (and explicit options), never default_options,
    autotune(), candidates, decide or a table's path_for."""
    wrong = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in ("runtime", "tests") or rel.parts[0].startswith(".") \
                or rel.parts[0] in ("build",) or "site-packages" in rel.parts:
            continue
        text = path.read_text()
        if "default_options" in text:
            wrong.append(f"{rel}: default_options")
        for node in ast.walk(ast.parse(text, str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                if node.module == "runtime":
                    names = {a.name for a in node.names} & {"autotune", "decision", "inference"}
                    wrong += [f"{rel}: from runtime import {n}" for n in sorted(names)]
                elif node.module in PUBLIC:
                    extra = {a.name for a in node.names} - PUBLIC[node.module]
                    wrong += [f"{rel}: {node.module}.{n}" for n in sorted(extra)]
            elif isinstance(node, ast.Import):
                wrong += [f"{rel}: import {a.name}" for a in node.names if a.name in PUBLIC]
            elif isinstance(node, ast.Attribute) and node.attr in (
                    "table_choice", "path_for", "default_options"):
                wrong.append(f"{rel}: .{node.attr}")
    assert not wrong, wrong
