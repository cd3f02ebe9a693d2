import pytest

from model.config import ConfigError
from model.run_config import load_config


def test_bundled_configs_load_with_upstream_values():
    cfg = load_config("first_radio.yaml")
    assert cfg.model.embed_dim == 3 and cfg.model.ddconfig.size == (320, 320)
    assert cfg.model.lossconfig.disc_start == 50001 and cfg.model.lossconfig.kl_weight == 1e-6
    assert (cfg.trainer.lr, cfg.trainer.min_lr, cfg.trainer.train_num_steps) == (5e-6, 5e-7, 150000)
    assert (cfg.batch_size, cfg.trainer.gradient_accumulate_every) == (8, 2)
    assert load_config("quickstart.yaml").data.name == "synthetic"


def test_upstream_file_verbatim_loads(tmp_path):
    text = """model:
  embed_dim: 3
  lossconfig: {disc_start: 50001, kl_weight: 0.000001, disc_weight: 0.5, disc_in_channels: 1}
  ddconfig: {double_z: True, z_channels: 3, resolution: [320, 320], in_channels: 1, out_ch: 1,
             ch: 128, ch_mult: [1, 2, 4], num_res_blocks: 2, attn_resolutions: [], dropout: 0.0}
  ckpt_path:
data:
  name: radio
  root: /data/RadioMapSeer
  batch_size: 2
trainer:
  gradient_accumulate_every: 2
  lr: !!float 5e-6
  min_lr: 5e-7
  train_num_steps: 150000
  save_and_sample_every: 5000
  log_freq: 100
  results_folder: '/tmp/radio_Vae_3'
  amp: False
  fp16: False
"""
    path = tmp_path / "upstream.yaml"
    path.write_text(text)
    cfg = load_config(path)
    assert cfg.batch_size == 2 and cfg.trainer.min_lr == 5e-7 and cfg.model.ckpt_path is None


def test_dotted_overrides_are_typed():
    cfg = load_config("first_radio.yaml", ["trainer.batch_size=4", "model.ddconfig.ch=64",
                                           "data.image_size=native", "trainer.amp=true"])
    assert (cfg.batch_size, cfg.model.ddconfig.ch, cfg.data.image_size, cfg.trainer.amp) == \
        (4, 64, "native", True)


@pytest.mark.parametrize("override, message", [
    ("trainer.batchsize=3", r"unknown key trainer\.batchsize \(did you mean trainer\.batch_size\?\)"),
    ("model.ddconfig.ch=abc", r"model\.ddconfig\.ch: expected an integer, got 'abc'"),
    ("data.simulation=XYZ", r"data\.simulation: expected one of \['DPM', 'IRT2', 'IRT4'\]"),
    ("model.ddconfig.ch=48", r"model\.ddconfig\.ch: .*multiples of 32"),
    ("trainer.lr=-1", r"trainer\.lr"),
    ("model.lossconfig.disc_loss=wasserstein", r"model\.lossconfig\.disc_loss"),
    ("data.batch_size=3", r"data\.batch_size \(3\) and trainer\.batch_size \(8\) disagree"),
    ("trainer=5", r"trainer: expected a mapping"),
    ("nonsense", r"expected KEY\.PATH=VALUE"),
])
def test_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("first_radio.yaml", [override])


def test_missing_config_lists_bundled_ones():
    with pytest.raises(ConfigError, match="first_radio.yaml.*quickstart.yaml"):
        load_config("nope.yaml")


def test_radio_data_requires_root():
    with pytest.raises(ConfigError, match=r"data\.root"):
        load_config("first_radio.yaml", ["data.root=null"])


def test_installed_wheel_ships_the_bundled_configs(tmp_path):
    """A non-editable install (the Docker image) must still resolve `--cfg quickstart.yaml`."""
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(root)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("radiodiff_vae-*.whl")
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    code = "from model.config import resolve_config_path as r; print(r('quickstart.yaml'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, env={"PYTHONPATH": str(tmp_path / "site")}, check=True)
    assert Path(out.stdout.strip()) == tmp_path / "site" / "model" / "configs" / "quickstart.yaml"
