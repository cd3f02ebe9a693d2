import os
import pickle
import subprocess

import pytest
import torch

from model.autoencoder import AutoencoderKL
from model.checkpoint import CheckpointError, latest_checkpoint, read_checkpoint, save_checkpoint
from model.config import to_dict
from model.loading import load
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
    loaded = load(path).model
    assert not loaded.training
    assert torch.equal(_outputs(loaded), _outputs(model))
    # a run directory resolves to its newest milestone
    _own_file(tmp_path, _model(1), name="model-10.pt")
    assert latest_checkpoint(tmp_path).name == "model-10.pt"
    assert torch.equal(_outputs(load(tmp_path).model), _outputs(_model(1)))


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
    assert torch.equal(_outputs(load(path, config=cfg).model), _outputs(ema_net))
    assert torch.equal(_outputs(load(path, config=cfg, use_ema=False).model), _outputs(net))


def test_plain_and_state_dict_layouts(tmp_path):
    net = _model()
    for i, payload in enumerate(({"state_dict": net.state_dict()}, net.state_dict())):
        torch.save(payload, tmp_path / f"m{i}.pt")
        loaded = load(tmp_path / f"m{i}.pt", config=tiny_model_config()).model
        assert torch.equal(_outputs(loaded), _outputs(net))


def test_upstream_file_without_config_asks_for_one(tmp_path):
    torch.save({"model": _model().state_dict()}, tmp_path / "model-1.pt")
    with pytest.raises(CheckpointError, match="stores no config.*first_radio.yaml"):
        load(tmp_path / "model-1.pt")


def test_truncated_file_is_refused_with_its_name(tmp_path):
    path = _own_file(tmp_path, _model())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model-3\.pt.*not a readable torch checkpoint"):
        load(path)


def test_foreign_file_is_refused(tmp_path):
    (tmp_path / "noise.pt").write_bytes(bytes(range(256)) * 8)
    with pytest.raises(CheckpointError, match=r"noise\.pt: not a torch checkpoint: expected a "
                       r"file written by torch.save \(a zip archive\), found other bytes "
                       r"\(starting 00 01 02"):
        load(tmp_path / "noise.pt")
    path = tmp_path / "notes.pt"
    path.write_text("these are not weights\n")  # torch.load's own error: "KeyError 116"
    with pytest.raises(CheckpointError, match=r"notes.pt: not a torch checkpoint: .* found a "
                       r"text file \(starting 'these are not weights'\)$"):
        load(path)
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="found an empty file"):
        load(tmp_path / "empty.pt")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="no model-N.pt"):
        load(tmp_path)


class _Exploit:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_callable_is_refused_without_running(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"model": _Exploit()}, path)
    with pytest.raises(CheckpointError, match=r"refused.*builtins\.print"):
        load(path, config=tiny_model_config())
    assert "pwned" not in capsys.readouterr().out


class _Calls:
    """Unpickled without weights_only, this calls `func(*args)`: a checkpoint carrying code."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


def _payloads(marker) -> dict[str, _Calls]:
    """What each payload would run, by the global a refusal must name; each creates `marker`."""
    touch = f"touch {marker}"
    return {"posix.system": _Calls(os.system, touch), "os.popen": _Calls(os.popen, touch),
            "builtins.eval": _Calls(eval, f"open({str(marker)!r}, 'w')"),
            "builtins.exec": _Calls(exec, f"open({str(marker)!r}, 'w')"),
            "subprocess.Popen": _Calls(subprocess.Popen, ["touch", str(marker)])}


WRITERS = {
    "torch.save": lambda obj, path: torch.save(obj, path),
    "torch.save legacy": lambda obj, path: torch.save(obj, path,
                                                      _use_new_zipfile_serialization=False),
    "pickle.dump": lambda obj, path: path.write_bytes(pickle.dumps(obj)),
    "pickle protocol 0": lambda obj, path: path.write_bytes(pickle.dumps(obj, protocol=0)),
}
TORCH_ADVICE = ("weights_only=False", "`weights_only` set to `False`", "add_safe_globals")


def _evil_file(tmp_path, writer: str, global_name: str):
    marker = tmp_path / "code-ran"
    path = tmp_path / f"model-{len(list(tmp_path.glob('model-*.pt')))}.pt"
    WRITERS[writer]({"model": _model().state_dict(), "step": 1,
                     "extra": _payloads(marker)[global_name]}, path)
    return path, marker


@pytest.mark.parametrize("writer", WRITERS)
@pytest.mark.parametrize("global_name", _payloads("x"))
def test_a_file_carrying_code_is_refused_naming_the_global(tmp_path, writer, global_name):
    path, marker = _evil_file(tmp_path, writer, global_name)
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(path)
    message = str(err.value)
    assert message.startswith(f"{path}: refused: ") and message.endswith(global_name), message
    assert not any(advice in message for advice in TORCH_ADVICE), message
    assert not marker.exists()


def test_every_loader_names_the_global_and_never_advises_weights_only_false(tmp_path, capsys):
    from export.__main__ import main as export_main
    from server.settings import Settings
    from server.spec import ModelSourceError, describe_model
    from train.__main__ import main as train_main

    for writer, global_name in (("torch.save", "posix.system"), ("pickle.dump", "builtins.eval"),
                                ("torch.save", "subprocess.Popen")):
        path, marker = _evil_file(tmp_path, writer, global_name)
        assert train_main(["eval", "--ckpt", str(path)]) == 2
        assert export_main(["--ckpt", str(path), "--out", str(tmp_path / "out")]) == 2
        with pytest.raises(ModelSourceError) as err:
            describe_model(Settings(model=str(path)))
        outputs = [*capsys.readouterr().err.splitlines(), str(err.value)]
        assert len(outputs) == 3, outputs
        for text in outputs:
            assert "refused" in text and global_name in text and str(path) in text, text
            assert not any(advice in text for advice in TORCH_ADVICE), text
        assert not marker.exists() and not (tmp_path / "out").exists()


def test_an_unreadable_file_never_gets_torchs_advice(tmp_path):
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps({"model": {"w": [1.0]}}))  # no globals, but no torch.save file
    torn = _own_file(tmp_path, _model())
    torn.write_bytes(torn.read_bytes()[:40_000])
    for path in (raw, torn):
        with pytest.raises(CheckpointError, match="not a readable torch checkpoint") as err:
            read_checkpoint(path)
        assert not any(advice in str(err.value) for advice in TORCH_ADVICE), err.value


def test_wrong_config_names_the_mismatch(tmp_path):
    path = _own_file(tmp_path, _model())
    bigger = tiny_model_config()
    bigger.ddconfig.ch = 64
    with pytest.raises(CheckpointError, match=r"shape mismatch.*encoder\.conv_in\.weight"):
        load(path, config=bigger)
    deeper = tiny_model_config()
    deeper.ddconfig.num_res_blocks = 2
    with pytest.raises(CheckpointError, match=r"weights missing: encoder\.down\.0\.block\.1"):
        load(path, config=deeper)
    torch.save({"model": {"something.else": torch.zeros(1)}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="no autoencoder weights"):
        load(tmp_path / "other.pt", config=tiny_model_config())


def test_atomic_save_leaves_no_temp_files(tmp_path):
    _own_file(tmp_path, _model())
    assert [p.name for p in tmp_path.iterdir()] == ["model-3.pt"]
