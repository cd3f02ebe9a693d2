"""`python -m train latent-stats` on a tiny model: the statistics against numpy, stored in the
checkpoint, carried into the ONNX manifest and the diffusers config, and used by the server."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from export.__main__ import main as export_main
from export.diffusers_format import diffusers_config
from model.autoencoder import AutoencoderKL
from model.checkpoint import (LATENT_STATS_KEY, WEIGHTS_DIR, CheckpointError, latent_stats,
                              read_checkpoint, save_checkpoint)
from model.loading import latent_scaling, load
from model.manifest import ManifestError, read_manifest, sha256_file, validate_manifest
from model.run_config import load_config
from radiomaps import build_dataset
from server.apis import DecodeAPI, EncodeAPI
from server.app import info_document
from server.payloads import Job
from server.routes import Context
from server.settings import Settings
from server.spec import describe_model, limits_of
from tests.conftest import tiny_model_config
from tests.test_export import write_tiny_checkpoint
from train.__main__ import main
from train.latent_stats import ChannelMoments

DATA = ["data.name=synthetic", "data.num_maps=12", "data.num_tx=2", "data.image_size=[64,64]",
        "data.num_workers=0", "trainer.batch_size=4"]
SEED = 3
CONFIG_SOURCE = "config (RadioDiff's fixed 0.3)"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny checkpoint after `python -m train latent-stats --out` (itself) wrote its
    statistics into it."""
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("stats") / "model-7.pt", seed=0)
    assert main(["latent-stats", "--ckpt", str(path.parent), "--seed", str(SEED), "--out",
                 str(path), *DATA]) == 0
    return path


@pytest.fixture(scope="module")
def stats(ckpt) -> dict:
    return latent_stats(torch.load(ckpt, weights_only=True))


def direct_latents(ckpt) -> tuple[np.ndarray, np.ndarray]:
    """Posterior samples and means of the train split, batch by batch as the command draws them."""
    dataset = build_dataset(load_config(read_checkpoint(ckpt)["config"], DATA).data, "train")
    model, generator = load(ckpt).model, torch.Generator().manual_seed(SEED)
    samples, means = [], []
    with torch.no_grad():
        for start in range(0, len(dataset), 4):
            x = torch.stack([dataset[i]["image"] for i in range(start, min(start + 4,
                                                                            len(dataset)))])
            posterior = model.encode(x)
            samples.append(posterior.sample(generator).numpy())
            means.append(posterior.mean.numpy())
    return np.concatenate(samples).astype(np.float64), np.concatenate(means).astype(np.float64)


def test_latent_stats_match_numpy_on_the_same_posteriors(ckpt, stats):
    samples, means = direct_latents(ckpt)
    axes = (0, 2, 3)
    assert (stats["split"], stats["maps"], stats["seed"], stats["weights"], stats["step"]) == (
        "train", len(samples), SEED, "ema", 7)
    for key, want in (("latents_mean", samples.mean(axes)), ("latents_std", samples.std(axes)),
                      ("mean_of_means", means.mean(axes)), ("std_of_means", means.std(axes))):
        np.testing.assert_allclose(stats[key], want, rtol=1e-9, err_msg=key)
    assert stats["global_std"] == pytest.approx(samples.std(), rel=1e-9)
    assert stats["scale_factor"] == pytest.approx(1 / samples.std(), rel=1e-9)
    assert stats["global_std_of_means"] == pytest.approx(means.std(), rel=1e-9)
    assert read_checkpoint(ckpt)["step"] == 7 and "ema" in read_checkpoint(ckpt)


def test_channel_moments_stream_like_one_pass_far_from_zero():
    rng = np.random.default_rng(0)
    batches = [1e3 + rng.normal(size=(n, 2, 3, 5)) * [[[[0.5]], [[2.0]]]] for n in (1, 4, 2)]
    moments = ChannelMoments()
    for batch in batches:
        moments.add(torch.from_numpy(batch).float())
    whole = np.concatenate([b.astype(np.float32) for b in batches]).astype(np.float64)
    np.testing.assert_allclose(moments.mean, whole.mean((0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(moments.std(), whole.std((0, 2, 3)), rtol=1e-9)
    assert moments.global_std() == pytest.approx(whole.std(), rel=1e-9)


def test_without_out_nothing_is_written_json_max_maps_and_user_errors(ckpt, tmp_path, capsys):
    before = sha256_file(ckpt)
    out = tmp_path / "stats.json"
    assert main(["latent-stats", "--ckpt", str(ckpt), "--max-maps", "5", "--json", str(out),
                 *DATA]) == 0
    captured = capsys.readouterr()
    assert "| channel | sample mean |" in captured.out and "nothing written" in captured.out
    assert "{" not in captured.out  # the JSON goes to --json FILE (or `--json -`), not stdout
    assert "latent-stats train: 5/5 maps (100%)" in captured.err  # progress, off a terminal
    assert json.loads(out.read_text())["maps"] == 5 and sha256_file(ckpt) == before
    assert main(["latent-stats", "--ckpt", str(ckpt), "--max-maps", "5", "--json", "-",
                 *DATA]) == 0
    assert json.loads(capsys.readouterr().out.split("nothing written", 1)[1].split("\n", 1)[1]
                      )["maps"] == 5
    bare = save_checkpoint(tmp_path / "model-1.pt", {"model": AutoencoderKL.from_config(
        tiny_model_config()).state_dict()})
    for argv, words in ((["--ckpt", str(tmp_path / "none.pt")], "no such checkpoint"),
                        (["--ckpt", str(bare)], "stores no config")):
        assert main(["latent-stats", *argv]) == 2
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1


def test_scaling_falls_back_to_the_config_without_matching_stats(stats):
    plain = latent_scaling({}, 0.3)
    assert plain == {"scale_factor": 0.3, "scale_factor_source": CONFIG_SOURCE,
                     "latents_mean": None, "latents_std": None}
    assert latent_scaling({LATENT_STATS_KEY: stats}, 0.3, weights="model") == plain
    stored = latent_scaling({LATENT_STATS_KEY: stats}, 0.3, weights="ema")
    assert stored["scale_factor_source"] == f"latent_stats (train split, {stats['maps']} maps)"
    config = diffusers_config(AutoencoderKL.from_config(tiny_model_config()), plain)
    assert (config["scaling_factor"], config["latents_mean"], config["latents_std"]) == (
        0.3, None, None)


@pytest.fixture(scope="module")
def export_dir(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    assert export_main(["--ckpt", str(ckpt), "--out", str(out), "--exporter", "torchscript",
                        "--no-check", "--format", "onnx,diffusers"]) == 0
    return out


def test_manifest_and_diffusers_config_carry_the_stats(export_dir, stats):
    manifest = read_manifest(export_dir)
    assert manifest["scale_factor"] == stats["scale_factor"]
    assert manifest["scale_factor_source"] == f"latent_stats (train split, {stats['maps']} maps)"
    assert manifest["latents_mean"] == stats["latents_mean"]
    assert manifest["latents_std"] == stats["latents_std"]
    config = json.loads((export_dir / "config.json").read_text())
    assert config["scaling_factor"] == stats["scale_factor"]
    assert (config["latents_mean"], config["latents_std"]) == (stats["latents_mean"],
                                                               stats["latents_std"])
    with pytest.raises(ManifestError, match="latents_std"):
        validate_manifest({**manifest, "latents_std": [1.0]})


def test_server_info_and_scaled_use_the_stored_scale(ckpt, export_dir, stats):
    settings = Settings(model=str(ckpt))
    spec = describe_model(settings)
    model = info_document(settings, Context(spec, limits_of(settings, spec), None), [])["model"]
    assert model["scale_factor"] == stats["scale_factor"] != 0.3
    assert model["scale_factor_source"].startswith("latent_stats (train split")
    assert model["latents_mean"] == stats["latents_mean"]
    assert describe_model(Settings(model=str(export_dir))).scaling() == spec.scaling()
    encode, decode = (cls(spec, max_batch_size=4, batch_timeout=0.0)
                      for cls in (EncodeAPI, DecodeAPI))
    for api in (encode, decode):
        api.setup("cpu")
    maps = np.random.default_rng(1).random((2, 1, 64, 64), dtype=np.float32)
    (plain,), (scaled,) = encode.predict([Job(maps)]), encode.predict([Job(maps, scaled=True)])
    np.testing.assert_allclose(scaled, plain * stats["scale_factor"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(decode.predict([Job(scaled, scaled=True)])[0],
                               decode.predict([Job(plain)])[0], atol=1e-4)


def test_latent_stats_never_writes_a_bundled_model(tmp_path, capsys):
    """`--ckpt reference` once rewrote the tracked model/weights/reference.pt (and every export
    of it then failed --verify): the statistics go to --out, a bundled file is read-only."""
    bundled = WEIGHTS_DIR / "reference.pt"
    before, mtime = sha256_file(bundled), bundled.stat().st_mtime_ns
    assert main(["latent-stats", "--ckpt", "reference", "--max-maps", "2",
                 "--out", str(bundled)]) == 2
    assert "bundled model file, read-only" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="read-only"):
        save_checkpoint(bundled, {"step": 0})
    copy = tmp_path / "reference-stats.pt"
    assert main(["latent-stats", "--ckpt", "reference", "--max-maps", "2", "--out",
                 str(copy)]) == 0
    assert latent_stats(read_checkpoint(copy))["maps"] == 2
    assert main(["latent-stats", "--ckpt", "reference", "--max-maps", "2"]) == 0
    assert sha256_file(bundled) == before and bundled.stat().st_mtime_ns == mtime
