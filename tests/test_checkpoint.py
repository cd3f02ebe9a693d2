import pytest
import torch

from model.autoencoder import AutoencoderKL
from model.checkpoint import (CheckpointError, latest_checkpoint, load_autoencoder,
                              save_checkpoint)
from model.config import to_dict
from tests.conftest import tiny_model_config


def _model(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL.from_config(tiny_model_config()).eval()


def _outputs(model: AutoencoderKL) -> torch.Tensor:
    x = torch.linspace(-1, 1, 64 * 64).reshape(1, 1, 64, 64)
    with torch.no_grad():
        return model(x, sample_posterior=False)[0]


def _own_file(tmp_path, model, name="model-3.pt", **extra):
    cfg = {"model": to_dict(tiny_model_config())}
    return save_checkpoint(tmp_path / name, {"model": model.state_dict(), "step": 3,
                                             "config": cfg, **extra})


def test_round_trip_gives_identical_outputs(tmp_path):
    model = _model()
    path = _own_file(tmp_path, model)
    loaded = load_autoencoder(path)
    assert not loaded.training
    assert torch.equal(_outputs(loaded), _outputs(model))
    # a run directory resolves to its newest milestone
    _own_file(tmp_path, _model(1), name="model-10.pt")
    assert latest_checkpoint(tmp_path).name == "model-10.pt"
    assert torch.equal(_outputs(load_autoencoder(tmp_path)), _outputs(_model(1)))


def test_upstream_file_with_loss_keys_and_ema(tmp_path):
    net, ema_net = _model(0), _model(1)
    sd = dict(net.state_dict())
    sd["loss.logvar"] = torch.zeros(())
    sd["loss.discriminator.main.0.weight"] = torch.randn(64, 1, 4, 4)
    sd["loss.perceptual_loss.net.slice1.0.weight"] = torch.randn(64, 3, 3, 3)
    ema = {f"ema_model.{k}": v for k, v in ema_net.state_dict().items()}
    ema.update({"initted": torch.tensor(True), "step": torch.tensor(7)})
    path = tmp_path / "model-1.pt"
    torch.save({"step": 7, "model": sd, "ema": ema, "opt_ae": {}, "opt_disc": {}}, path)
    cfg = tiny_model_config()
    assert torch.equal(_outputs(load_autoencoder(path, config=cfg)), _outputs(ema_net))
    assert torch.equal(_outputs(load_autoencoder(path, config=cfg, use_ema=False)), _outputs(net))


def test_plain_and_state_dict_layouts(tmp_path):
    net = _model()
    for i, payload in enumerate(({"state_dict": net.state_dict()}, net.state_dict())):
        torch.save(payload, tmp_path / f"m{i}.pt")
        loaded = load_autoencoder(tmp_path / f"m{i}.pt", config=tiny_model_config())
        assert torch.equal(_outputs(loaded), _outputs(net))


def test_upstream_file_without_config_asks_for_one(tmp_path):
    torch.save({"model": _model().state_dict()}, tmp_path / "model-1.pt")
    with pytest.raises(CheckpointError, match="stores no config.*first_radio.yaml"):
        load_autoencoder(tmp_path / "model-1.pt")


def test_truncated_file_is_refused_with_its_name(tmp_path):
    path = _own_file(tmp_path, _model())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model-3\.pt.*not a readable torch checkpoint"):
        load_autoencoder(path)


def test_foreign_file_is_refused(tmp_path):
    (tmp_path / "noise.pt").write_bytes(bytes(range(256)) * 8)
    with pytest.raises(CheckpointError, match=r"noise\.pt: not a readable torch checkpoint"):
        load_autoencoder(tmp_path / "noise.pt")
    path = tmp_path / "notes.pt"
    path.write_text("these are not weights\n")
    with pytest.raises(CheckpointError, match="notes.pt"):
        load_autoencoder(path)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_autoencoder(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="no model-N.pt"):
        load_autoencoder(tmp_path)


class _Exploit:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_callable_is_refused_without_running(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"model": _Exploit()}, path)
    with pytest.raises(CheckpointError, match="refused.*Unsupported global.*print"):
        load_autoencoder(path, config=tiny_model_config())
    assert "pwned" not in capsys.readouterr().out


def test_wrong_config_names_the_mismatch(tmp_path):
    path = _own_file(tmp_path, _model())
    bigger = tiny_model_config()
    bigger.ddconfig.ch = 64
    with pytest.raises(CheckpointError, match=r"shape mismatch.*encoder\.conv_in\.weight"):
        load_autoencoder(path, config=bigger)
    deeper = tiny_model_config()
    deeper.ddconfig.num_res_blocks = 2
    with pytest.raises(CheckpointError, match=r"weights missing: encoder\.down\.0\.block\.1"):
        load_autoencoder(path, config=deeper)
    torch.save({"model": {"something.else": torch.zeros(1)}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="no autoencoder weights"):
        load_autoencoder(tmp_path / "other.pt", config=tiny_model_config())


def test_atomic_save_leaves_no_temp_files(tmp_path):
    _own_file(tmp_path, _model())
    assert [p.name for p in tmp_path.iterdir()] == ["model-3.pt"]
