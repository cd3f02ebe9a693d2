"""`--format diffusers`: a diffusers AutoencoderKL folder with our weights under diffusers' names."""
import json
import os
import stat

import pytest
import torch
from safetensors.torch import load_file

from export.__main__ import main
from export.diffusers_format import (CONFIG_FILE, WEIGHTS_FILE, DiffusersFormatError,
                                     DiffusersUnavailable, diffusers_config, diffusers_parity,
                                     diffusers_state_dict, write_diffusers)
from export.parity import synthetic_radio_maps
from export.pipeline import staged
from model.autoencoder import AutoencoderKL
from model.checkpoint import save_checkpoint
from model.config import to_dict
from model.io import to_model
from model.run_config import load_config
from tests.conftest import tiny_model_config

# Names as diffusers' AutoencoderKL lays them out (Encoder/Decoder/UNetMidBlock2D/Attention).
DIFFUSERS_NAMES = [
    "encoder.conv_in.weight", "encoder.conv_norm_out.bias", "encoder.conv_out.weight",
    "encoder.down_blocks.0.resnets.1.norm2.weight",
    "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
    "encoder.down_blocks.1.downsamplers.0.conv.weight",
    "encoder.mid_block.resnets.1.conv2.bias", "encoder.mid_block.attentions.0.group_norm.weight",
    "encoder.mid_block.attentions.0.to_q.weight", "encoder.mid_block.attentions.0.to_out.0.bias",
    "decoder.up_blocks.0.resnets.2.conv1.weight", "decoder.up_blocks.0.upsamplers.0.conv.weight",
    "decoder.up_blocks.2.resnets.0.conv_shortcut.weight", "decoder.mid_block.attentions.0.to_v.bias",
    "quant_conv.weight", "post_quant_conv.bias",
]


def first_radio_on_meta() -> AutoencoderKL:
    with torch.device("meta"):
        return AutoencoderKL.from_config(load_config("first_radio.yaml").model)


def test_first_radio_keys_map_one_to_one_onto_diffusers_layout():
    ae = first_radio_on_meta()
    ours, theirs = ae.state_dict(), diffusers_state_dict(ae)
    assert len(theirs) == len(ours) == 204
    assert set(DIFFUSERS_NAMES) <= set(theirs)
    # upstream up.2 (lowest resolution, 512 wide) is diffusers' up_blocks.0
    assert theirs["decoder.up_blocks.0.resnets.0.conv1.weight"].shape == (512, 512, 3, 3)
    assert theirs["decoder.up_blocks.2.resnets.0.conv_shortcut.weight"].shape == (128, 256, 1, 1)
    assert theirs["encoder.mid_block.attentions.0.to_q.weight"].shape == (512, 512)
    assert sum(t.numel() for t in theirs.values()) == 55_307_453


def test_config_json_describes_a_one_channel_vae_with_mid_attention():
    cfg = diffusers_config(first_radio_on_meta())
    assert cfg["_class_name"] == "AutoencoderKL"
    assert (cfg["in_channels"], cfg["out_channels"], cfg["latent_channels"]) == (1, 1, 3)
    assert cfg["block_out_channels"] == [128, 256, 512] and cfg["layers_per_block"] == 2
    assert cfg["down_block_types"] == ["DownEncoderBlock2D"] * 3
    assert cfg["mid_block_add_attention"] is True and cfg["scaling_factor"] == 0.3


@pytest.mark.parametrize("change,message", [
    ({"attn_resolutions": [16]}, "attn_resolutions"),
    ({"z_channels": 4}, "z_channels=4 != embed_dim=3"),
])
def test_networks_diffusers_cannot_express_are_refused(tmp_path, capsys, change, message):
    cfg = tiny_model_config()
    for key, value in change.items():
        setattr(cfg.ddconfig, key, value)
    ae = AutoencoderKL.from_config(cfg)
    with pytest.raises(DiffusersFormatError, match=message):
        diffusers_config(ae)
    path = save_checkpoint(tmp_path / "model-1.pt", {"model": ae.state_dict(), "step": 1,
                                                      "config": {"model": to_dict(cfg)}})
    assert main(["--ckpt", str(path), "--out", str(tmp_path / "out"), "--format", "diffusers"]) == 2
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model-1.pt"]  # no folder, no temp


def test_written_folder_holds_config_and_renamed_weights(tmp_path):
    torch.manual_seed(0)
    ae = AutoencoderKL.from_config(tiny_model_config())
    info = write_diffusers(ae, tmp_path)
    assert json.loads((tmp_path / CONFIG_FILE).read_text())["block_out_channels"] == [32, 64, 128]
    weights = load_file(str(tmp_path / info["weights"]))
    assert info["weights"] == WEIGHTS_FILE
    assert torch.equal(weights["decoder.up_blocks.2.resnets.1.conv2.weight"],
                       ae.state_dict()["decoder.up.0.block.1.conv2.weight"])
    assert torch.equal(weights["encoder.mid_block.attentions.0.to_k.weight"],
                       ae.state_dict()["encoder.mid.attn_1.k.weight"][:, :, 0, 0])


def test_diffusers_encode_decode_equal_ours(tmp_path):
    torch.manual_seed(0)
    ae = AutoencoderKL.from_config(tiny_model_config()).eval()
    write_diffusers(ae, tmp_path)
    images = to_model(synthetic_radio_maps(2, 64, 64))
    try:
        errs = diffusers_parity(tmp_path, ae, images)
    except DiffusersUnavailable as err:
        if os.environ.get("RADIODIFF_DIFFUSERS_REQUIRED"):  # `make test-diffusers` sets it
            pytest.fail(str(err))
        pytest.skip(f"{err}; `make test-diffusers` runs this in a venv without torchvision")
    assert all(v["passed"] for v in errs.values()) and max(
        v["max_abs_err"] for v in errs.values()) < 1e-4, errs


def test_the_bundled_model_exports_with_one_outcome_in_any_environment(tmp_path, capsys):
    """The same command once exited 1 in the diffusers venv (decode 1.2e-4 against a 1e-4
    bound, the folder left behind) and 0 in the main one (check skipped). Now the folder is
    read back exactly everywhere, diffusers' own forward is compared where it imports
    (`make test-diffusers` runs this file there) within REL_ERR's bound, and the outcome is the
    same: exit 0, the same files."""
    out = tmp_path / "vae"
    assert main(["--ckpt", "reference", "--out", str(out), "--format", "diffusers"]) == 0
    printed = capsys.readouterr().out
    assert "read back: every tensor equal to the checkpoint's, bit for bit" in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vae"]  # no temp folder left
    assert sorted(p.name for p in out.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert stat.S_IMODE((out / WEIGHTS_FILE).stat().st_mode) == 0o644  # safetensors: 0600
    if os.environ.get("RADIODIFF_DIFFUSERS_REQUIRED"):
        assert "diffusers parity (max_abs_err <= 0.001 * max(1, max|ours|))" in printed


def test_a_failed_export_leaves_the_folder_as_it_was(tmp_path):
    """Files go to a temp folder beside --out and move in only when everything passed."""
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="a check failed"):
        with staged(out) as staging:
            (staging / CONFIG_FILE).write_text("{}")
            raise RuntimeError("a check failed")
    assert list(tmp_path.iterdir()) == []
    out.mkdir()
    (out / CONFIG_FILE).write_text("earlier")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(RuntimeError):
        with staged(out) as staging:
            (staging / CONFIG_FILE).write_text("new")
            raise RuntimeError("a check failed")
    assert (out / CONFIG_FILE).read_text() == "earlier" and len(list(tmp_path.iterdir())) == 1
    with staged(out) as staging:
        (staging / CONFIG_FILE).write_text("new")
        (staging / WEIGHTS_FILE).write_text("w")
    assert {p.name: p.read_text() for p in out.iterdir()} == {
        CONFIG_FILE: "new", WEIGHTS_FILE: "w", "notes.txt": "mine"}
    assert len(list(tmp_path.iterdir())) == 1
