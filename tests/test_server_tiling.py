"""Tiled requests (`?tiled=`, and automatic over --max-pixels) on a real `python -m server`.

Small on purpose: --max-pixels 4096 (64x64), 64-pixel tiles overlapping by 32, so a 128x128
map is 3 x 3 tiles; --max-tiled-pixels 160x160; a budget of 0.05 MP holds one tiled 128x128
map (9 tiles x 4096 = 0.037 MP) but not two (0.074 MP), though two cost 0.033 MP untiled.
"""
from __future__ import annotations

import numpy as np
import pytest
import requests
import torch

from model.io import encode_npy, from_model, to_model
from model.loading import load
from runtime.inference import InferenceModel, prepare_for_inference
from runtime.tiling import Tiler
from server.apis import DecodeAPI
from server.client import Client, ServerError
from server.payloads import Job
from server.settings import Settings
from server.spec import describe_model
from tests.test_server import (ATOL, KEY, Server, _maps, _npy, concurrent_batches,
                               running_server, save_tiny_checkpoint)

pytestmark = pytest.mark.server

MAX_PIXELS, TILE, OVERLAP = 64 * 64, 64, 32
MAX_TILED = 160 * 160
BUDGET = 0.05
OLD_REFUSAL = ("128x128 = 16384 pixels; this server accepts HxW maps with H and W multiples of 4 "
               f"and H*W <= {MAX_PIXELS}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiling")
    ckpt = save_tiny_checkpoint(root)
    args = ["--api-key-env", "RADIODIFF_TEST_KEY", "--max-pixels", str(MAX_PIXELS),
            "--tile", str(TILE), "--tile-overlap", str(OVERLAP),
            "--max-tiled-pixels", str(MAX_TILED), "--max-request-cost", str(BUDGET),
            "--max-batch-size", "4"]
    env = {"RADIODIFF_TEST_KEY": KEY, "RADIODIFF_BATCH_TIMEOUT": "0.05"}
    with running_server(root, args, env) as (url, port, proc, log):
        yield Server(url, port, proc, load(ckpt).model, log)


@pytest.fixture(scope="module")
def tiled_engine(server):
    """The same checkpoint in this process, through InferenceModel.enable_tiling."""
    engine = prepare_for_inference(server.model, "cpu")
    engine.enable_tiling(TILE, OVERLAP)
    return engine


def test_info_and_openapi_describe_tiling(server):
    limits = requests.get(server.url + "/info", headers={"X-API-Key": KEY}, timeout=10).json()[
        "limits"]
    assert (limits["tile"], limits["tile_overlap"], limits["max_tiled_pixels"]) == (
        TILE, OVERLAP, MAX_TILED)
    spec = requests.get(server.url + "/openapi.json", timeout=10).json()
    for path in ("/encode", "/decode", "/reconstruct"):
        params = {p["name"]: p for p in spec["paths"][path]["post"]["parameters"]}
        assert params["tiled"]["schema"]["type"] == "boolean", path
        assert "--max-tiled-pixels" in spec["paths"][path]["post"]["description"]


def test_an_over_size_map_is_tiled_automatically_like_the_library(server, tiled_engine):
    maps = _maps(1, size=128, seed=1)
    z = _npy(server.post("/encode", encode_npy(maps)))
    assert z.shape == (1, 3, 32, 32)
    np.testing.assert_allclose(z, tiled_engine.encode(to_model(maps)).mode().numpy(), atol=ATOL)
    recon = _npy(server.post("/reconstruct", encode_npy(maps)))
    assert recon.shape == (1, 1, 128, 128)
    want = from_model(tiled_engine.reconstruct(to_model(maps))).numpy()
    np.testing.assert_allclose(recon, want, atol=ATOL)
    whole = InferenceModel(tiled_engine.model, tiled_engine.device, tiled_engine.options)
    assert not np.allclose(recon, from_model(whole.reconstruct(to_model(maps))).numpy(),
                           atol=1e-3), "the tiles' seams left no trace: was it tiled?"
    asked = _npy(server.post("/reconstruct", encode_npy(maps), params={"tiled": "true"}))
    np.testing.assert_array_equal(asked, recon)


def test_tiled_false_keeps_the_refusal_of_an_over_size_map(server):
    r = server.post("/reconstruct", encode_npy(_maps(1, size=128)), params={"tiled": "false"})
    assert r.status_code == 413 and r.json()["detail"] == OLD_REFUSAL


def test_a_map_within_one_tile_is_never_tiled(server):
    for size in (32, 64):
        body = encode_npy(_maps(2, size=size, seed=size))
        for path in ("/encode", "/reconstruct"):
            whole = _npy(server.post(path, body))
            tiled = _npy(server.post(path, body, params={"tiled": "true"}))
            np.testing.assert_array_equal(tiled, whole, err_msg=f"{path} {size}")


def test_the_client_passes_tiled_through(server, tiled_engine):
    vae = Client(server.url, api_key=KEY, timeout=60)
    maps = _maps(1, size=128, seed=1)
    want = tiled_engine.encode(to_model(maps)).mode().numpy()
    np.testing.assert_allclose(vae.encode(maps, tiled=True), want, atol=ATOL)
    latent = vae.encode(maps)  # None: the server tiles the over-size map itself
    np.testing.assert_allclose(latent, want, atol=ATOL)
    np.testing.assert_allclose(vae.decode(latent, tiled=True),
                               from_model(tiled_engine.decode(torch.from_numpy(latent))).numpy(),
                               atol=ATOL)
    with pytest.raises(ServerError) as err:
        vae.reconstruct(maps, tiled=False)
    assert err.value.status == 413 and err.value.detail == OLD_REFUSAL


def test_decode_is_tiled_over_the_size_limit(server, tiled_engine):
    latent = np.random.default_rng(3).standard_normal((3, 32, 32)).astype(np.float32)
    got = _npy(server.post("/decode", encode_npy(latent)))  # decodes to 128x128
    assert got.shape == (1, 128, 128)
    want = from_model(tiled_engine.decode(torch.from_numpy(latent[None]))).numpy()[0]
    np.testing.assert_allclose(got, want, atol=ATOL)
    r = server.post("/decode", encode_npy(latent), params={"tiled": "false"})
    assert r.status_code == 413
    assert r.json()["detail"] == f"latent 32x32 decodes to a map of {OLD_REFUSAL}"


def test_a_tiled_request_costs_its_tiles(server):
    maps = encode_npy(_maps(2, size=128, seed=4))  # untiled 0.033 MP; tiled 2 x 9 x 4096 px
    r = server.post("/reconstruct", maps)
    assert r.status_code == 413, r.text
    doc = r.json()
    assert doc["cost_megapixels"] == pytest.approx(2 * 9 * TILE * TILE / 1e6)
    assert doc["budget_megapixels"] == BUDGET
    assert "each computed as 9 tiles of 64" in doc["detail"]
    r = server.post("/decode", encode_npy(np.zeros((2, 3, 32, 32), np.float32)))
    assert r.status_code == 413 and r.json()["cost_megapixels"] == pytest.approx(0.073728)


def test_batches_are_formed_under_the_tiled_cost(server):
    body = encode_npy(_maps(1, size=128, seed=5))  # 0.037 MP tiled: two would pass the budget
    answers, count, total = concurrent_batches(server, "/encode", body, 3)
    assert all(z.shape == (1, 3, 32, 32) for z in answers)
    assert total == 3 and count == 3, "tiled requests over the budget together shared a batch"


def test_a_map_over_max_tiled_pixels_is_refused_naming_both_limits(server):
    r = server.post("/encode", encode_npy(_maps(1, size=192)))
    assert r.status_code == 413, r.text
    detail = r.json()["detail"]
    assert detail.startswith("192x192 = 36864 pixels; this server accepts HxW maps")
    assert f"H*W <= {MAX_PIXELS}" in detail
    assert f"up to H*W <= {MAX_TILED} (--max-tiled-pixels)" in detail
    r = server.post("/encode", encode_npy(_maps(1, size=4)), params={"resize": "192,192"})
    assert r.status_code == 413 and r.json()["detail"] == detail


def test_a_bad_tiled_value_is_a_422_saying_what_is_allowed(server):
    r = server.post("/encode", encode_npy(_maps(1)), params={"tiled": "maybe"})
    assert r.status_code == 422
    assert r.json()["detail"] == "tiled: expected one of true, false, 1, 0, got 'maybe'"


def test_a_worker_counts_a_tiled_job_by_its_tiles(tmp_path):
    spec = describe_model(Settings(model=str(save_tiny_checkpoint(tmp_path))))
    api = DecodeAPI(spec, max_batch_size=4, batch_timeout=0.0)
    latents = np.zeros((2, 3, 32, 32), np.float32)
    assert api.job_cost(Job(latents)) == pytest.approx(2 * 128 * 128 / 1e6)
    assert api.job_cost(Job(latents, tiler=Tiler(TILE, OVERLAP))) == pytest.approx(
        2 * 9 * TILE * TILE / 1e6)
