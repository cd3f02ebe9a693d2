"""`python -m export radiodiff-config`: the block it writes loads the checkpoint completely in a
literal re-statement of upstream's network (tests/upstream_reference.py) under upstream's
loading rule (ema, `ema_model.` stripped, strict=False), and the rule catches a wrong ddconfig."""
from __future__ import annotations

import copy

import pytest
import torch
import yaml

from export.__main__ import main as export_main
from export.radiodiff_config import build, upstream_state_dict
from model.checkpoint import read_checkpoint
from model.loading import load
from tests.test_export import write_tiny_checkpoint
from tests.upstream_reference import RefAutoencoderKL

# upstream denoising_diffusion_pytorch/loss.py LPIPSWithDiscriminator.__init__'s keywords
UPSTREAM_LOSS_ARGS = {"disc_start", "logvar_init", "kl_weight", "pixelloss_weight",
                      "disc_num_layers", "disc_in_channels", "disc_factor", "disc_weight",
                      "perceptual_weight", "use_actnorm", "disc_conditional", "disc_loss"}


def _upstream_network(ddconfig: dict, embed_dim: int) -> RefAutoencoderKL:
    return RefAutoencoderKL(ddconfig["ch"], ddconfig["ch_mult"], ddconfig["num_res_blocks"],
                            ddconfig["z_channels"], embed_dim, ddconfig["in_channels"],
                            ddconfig["out_ch"])


def _replay_upstream_load(block: dict) -> tuple[RefAutoencoderKL, list[str]]:
    """upstream AutoencoderKL(**first_stage).init_from_ckpt: missing network keys."""
    first = block["model"]["first_stage"]
    net = _upstream_network(first["ddconfig"], first["embed_dim"])
    state = torch.load(first["ckpt_path"], map_location="cpu", weights_only=True)
    msg = net.load_state_dict(upstream_state_dict(state), strict=False)
    return net, list(msg.missing_keys)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    ckpt = write_tiny_checkpoint(tmp_path_factory.mktemp("rdc") / "model-3.pt", seed=2)
    out = ckpt.parent / "radio_train_first_stage.yaml"
    assert export_main(["radiodiff-config", "--ckpt", str(ckpt), "--out", str(out)]) == 0
    return ckpt, yaml.safe_load(out.read_text())


def test_every_network_key_loads_under_upstreams_rule_with_the_ema_weights(written):
    ckpt, block = written
    net, missing = _replay_upstream_load(block)
    assert missing == []
    ours = load(ckpt).model  # EMA weights
    x = torch.rand(1, 1, 64, 64) * 2 - 1
    with torch.no_grad():
        posterior = ours.encode(x)
        expected = torch.cat([posterior.mean, posterior.logvar], 1)
        assert torch.allclose(net.encode_moments(x), expected, atol=1e-5)


def test_a_wrong_ddconfig_leaves_tensors_random_and_the_replay_says_so(written):
    _, block = written
    wrong = copy.deepcopy(block)
    wrong["model"]["first_stage"]["ddconfig"]["num_res_blocks"] = 2  # the model has 1 block
    _, missing = _replay_upstream_load(wrong)
    assert len(missing) > 0 and any(".block.1." in k for k in missing)


def test_lossconfig_scale_and_unet_sizes(written):
    ckpt, block = written
    model = block["model"]
    assert set(model["first_stage"]["lossconfig"]) <= UPSTREAM_LOSS_ARGS
    assert "learn_logvar" not in model["first_stage"]["lossconfig"]
    assert model["image_size"] == [320, 320]  # the tiny checkpoint stores no data: the default
    assert model["unet"] == {"input_size": [80, 80], "cond_feature_size": [80, 80]}  # factor 4
    assert model["scale_by_std"] is True and model["default_scale"] is True
    assert model["scale_factor"] == pytest.approx(0.3)  # no latent_stats stored: the config's


def test_measured_scale_is_written_when_stored():
    _, block = build("reference")
    stats = read_checkpoint(block["model"]["first_stage"]["ckpt_path"])["latent_stats"]
    assert block["model"]["scale_factor"] == pytest.approx(stats["scale_factor"], abs=1e-6)
    assert block["model"]["unet"]["input_size"] == [64, 64]  # 256 native / factor 4


def test_a_config_that_does_not_describe_the_checkpoint_is_refused(written, tmp_path, capsys):
    ckpt, _ = written
    cfg = tmp_path / "wrong.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"embed_dim": 3, "ddconfig": {
        "resolution": [64, 64], "ch": 32, "ch_mult": [1, 2, 4], "num_res_blocks": 2}}}))
    assert export_main(["radiodiff-config", "--ckpt", str(ckpt), "--cfg", str(cfg)]) == 2
    assert "missing" in capsys.readouterr().err
