"""The bundled reference model (model/weights/reference.pt) reproduces its model card's check
figures through the same commands a user runs, and the server and export find it by name."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from model.checkpoint import WEIGHTS_DIR, read_checkpoint, resolve_checkpoint
from server.settings import Settings
from server.spec import describe_model
from train.__main__ import main

CHECK = WEIGHTS_DIR / "reference-check.json"  # `eval --ckpt reference --split test --max-maps 8`


def test_reference_is_a_small_network_only_file():
    path = resolve_checkpoint("reference")
    assert path == WEIGHTS_DIR / "reference.pt" and path.stat().st_size < 20 * 2 ** 20
    state = read_checkpoint(path)
    assert set(state) == {"ema", "step", "config", "packed_from", "latent_stats"}


def test_eval_by_name_reproduces_the_check_figures(tmp_path):
    out = tmp_path / "eval.json"
    assert main(["eval", "--ckpt", "reference", "--split", "test", "--max-maps", "8",
                 "--json", str(out)]) == 0
    got, want = json.loads(out.read_text()), json.loads(CHECK.read_text())
    assert got["maps"] == want["maps"] == 8 and got["weights"] == "ema"
    for name, value in want["native"]["metrics"].items():
        assert got["native"]["metrics"][name]["mean"] == pytest.approx(value["mean"], rel=1e-4)
    assert [m["name"] for m in got["native"]["worst"]] == [m["name"] for m in
                                                          want["native"]["worst"]]


def test_server_serves_it_by_name_with_its_latent_scale():
    spec = describe_model(Settings(model="reference"))
    assert Path(spec.path) == WEIGHTS_DIR / "reference.pt"
    assert (spec.downsample_factor, spec.latent_channels) == (4, 3)
    assert spec.scale_factor_source.startswith("latent_stats (train split")
    assert spec.scale_factor == pytest.approx(read_checkpoint(spec.path)["latent_stats"]
                                              ["scale_factor"])
