"""`python -m export`: ONNX graphs, manifest, parity, and the failures a user must be told about."""
import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export.__main__ import main
from export.ort_session import make_session
from export.parity import check_parity
from export.precise_norm import precise_instance_norms
from model.autoencoder import AutoencoderKL
from model.checkpoint import EMA_PREFIX, save_checkpoint
from model.config import to_dict
from model.loading import load
from model.manifest import ManifestError, read_manifest, sha256_file
from tests.conftest import tiny_model_config

FLOAT, FLOAT16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16


def write_tiny_checkpoint(path, seed: int, ema: bool = True, size: int = 64):
    """A tiny-config checkpoint in our format, with EMA weights that differ from `model`."""
    torch.manual_seed(seed)
    cfg = tiny_model_config(size)
    model, ema_model = AutoencoderKL.from_config(cfg), AutoencoderKL.from_config(cfg)
    payload = {"model": model.state_dict(), "step": 7, "config": {"model": to_dict(cfg)}}
    if ema:
        payload["ema"] = {EMA_PREFIX + k: v for k, v in ema_model.state_dict().items()}
    return save_checkpoint(path, payload)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "model-7.pt", seed=0)


@pytest.fixture(scope="module")
def exported(ckpt, tmp_path_factory):
    """One default export (dynamo exporter, fp32, parity check on), shared by the tests."""
    out = tmp_path_factory.mktemp("export")
    assert main(["--ckpt", str(ckpt.parent), "--out", str(out)]) == 0
    return out


def test_manifest_describes_graphs_model_and_source(exported, ckpt):
    m = json.loads((exported / "manifest.json").read_text())
    assert m["format_version"] == 1 and m["precision"] == "fp32" and m["opset"] == 18
    assert m["exporter"] == "dynamo"
    assert (m["downsample_factor"], m["latent_channels"], m["in_channels"]) == (4, 3, 1)
    assert m["scale_factor"] == 0.3
    assert m["scale_factor_source"] == "config (RadioDiff's fixed 0.3)"  # no latent-stats run
    assert m["latents_mean"] is None and m["latents_std"] is None
    assert m["value_range"] == {"image": [-1, 1], "map": [0, 1]}
    assert m["model_config"] == to_dict(tiny_model_config())
    assert m["source_checkpoint"] == {"path": str(ckpt.resolve()), "sha256": sha256_file(ckpt),
                                      "step": 7, "weights": "ema"}
    assert set(m["versions"]) >= {"torch", "onnx", "onnxruntime"}
    for name, ins, outs in (("encoder", ["image"], ["mean", "logvar"]),
                            ("decoder", ["latent"], ["image"])):
        entry = m[name]
        assert entry["sha256"] == sha256_file(exported / entry["file"])
        assert [t["name"] for t in entry["inputs"]] == ins
        assert [t["name"] for t in entry["outputs"]] == outs
    assert m["encoder"]["inputs"][0]["shape"] == ["N", 1, "H", "W"]
    assert m["decoder"]["outputs"][0]["shape"] == ["N", 1, "h*4", "w*4"]
    assert m["providers"][0] in ort.get_available_providers()
    assert read_manifest(exported) == m


def test_parity_figures_cover_batch_1_and_3_random_and_radio(exported):
    parity = json.loads((exported / "manifest.json").read_text())["parity"]
    assert parity["passed"] and parity["precision"] == "fp32"
    seen = {(c["graph"], c["input"], c["shape"][0]) for c in parity["cases"]}
    for graph in ("encoder", "decoder"):
        for kind in ("random", "radio"):
            assert {(graph, kind, 1), (graph, kind, 3)} <= seen
        assert 0 < parity["max_abs_err"][graph] < 1e-4
    assert all(c["passed"] for c in parity["cases"])


def test_graph_interface_is_float32_with_symbolic_batch_height_width(exported):
    enc = onnx.load(str(exported / "encoder.onnx"))
    dec = onnx.load(str(exported / "decoder.onnx"))

    def dims(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    assert [(v.name, dims(v)) for v in enc.graph.input] == [("image", ["N", 1, "H", "W"])]
    assert [v.name for v in enc.graph.output] == ["mean", "logvar"]
    assert [(v.name, dims(v)) for v in dec.graph.input] == [("latent", ["N", 3, "h", "w"])]
    assert [(v.name, dims(v)) for v in dec.graph.output] == [("image", ["N", 1, "h*4", "w*4"])]
    for v in [*enc.graph.input, *enc.graph.output, *dec.graph.input, *dec.graph.output]:
        assert v.type.tensor_type.elem_type == FLOAT
    for graph in (enc, dec):  # the mid-block self-attention was exported, not dropped
        ops = {n.op_type for n in graph.graph.node}
        assert {"Softmax", "MatMul"} <= ops
        assert "InstanceNormalization" not in ops  # rewritten with float64 statistics


def test_graphs_match_torch_at_other_batch_sizes_and_shapes(exported, ckpt):
    ae = load(ckpt).model  # EMA weights, as exported
    raw = load(ckpt, use_ema=False).model
    enc = make_session(exported / "encoder.onnx", "cpu")
    dec = make_session(exported / "decoder.onnx", "cpu")
    # The graphs were traced at batch 2, 32x48; parity ran at 64x64 and 32x64 (batch 1-3).
    for batch, height, width in [(5, 16, 24), (1, 40, 8)]:
        x = torch.rand(batch, 1, height, width, generator=torch.Generator().manual_seed(1)) * 2 - 1
        mean, logvar = enc.run(None, {"image": x.numpy()})
        with torch.inference_mode():
            posterior = ae.encode(x)
            image = dec.run(None, {"latent": posterior.mean.numpy()})[0]
            ref = ae.decode(posterior.mean).numpy()
            raw_mean = raw.encode(x).mean.numpy()
        assert mean.shape == (batch, 3, height // 4, width // 4)
        assert image.shape == (batch, 1, height, width)
        assert np.abs(mean - posterior.mean.numpy()).max() < 1e-4
        assert np.abs(logvar - posterior.logvar.numpy()).max() < 1e-4
        assert np.abs(image - ref).max() < 1e-4
        assert np.abs(mean - raw_mean).max() > 1e-2  # the EMA weights, not the raw ones


def test_flipped_bytes_in_a_graph_are_detected(exported, tmp_path, capsys):
    copy = shutil.copytree(exported, tmp_path / "export")
    graph = copy / "decoder.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="corrupted graph detected: .*decoder.onnx"):
        read_manifest(copy)
    assert main(["--verify", str(copy)]) == 1
    assert "corrupted graph detected" in capsys.readouterr().err


def test_verify_of_a_folder_without_an_export_is_bad_input(tmp_path, capsys):
    """A missing folder (or one with no manifest.json) is bad input, exit 2; a manifest that
    does not match its files is a failed check, exit 1 (above)."""
    for folder in (tmp_path / "missing", tmp_path):
        assert main(["--verify", str(folder)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {folder}: no manifest.json") and len(err.splitlines()) == 1


def test_manifest_inconsistent_with_its_config_is_rejected(exported, tmp_path):
    copy = shutil.copytree(exported, tmp_path / "export")
    m = json.loads((copy / "manifest.json").read_text())
    m["latent_channels"] = 4
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ManifestError, match="latent_channels is 4 but model_config implies 3"):
        read_manifest(copy)
    m["latent_channels"], m["format_version"] = 3, 2
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ManifestError, match="unsupported format_version 2"):
        read_manifest(copy)


def test_verify_against_source_and_a_different_checkpoint(exported, ckpt, tmp_path, capsys):
    assert main(["--verify", str(exported), "--ckpt", str(ckpt), "--no-check"]) == 0
    assert "is the source checkpoint" in capsys.readouterr().out
    other = write_tiny_checkpoint(tmp_path / "other.pt", seed=1)
    assert main(["--verify", str(exported), "--ckpt", str(other)]) == 1
    err = capsys.readouterr().err
    assert "checkpoint/manifest mismatch" in err and str(other) in err


def test_parity_check_fails_with_figures_for_other_weights(exported, tmp_path):
    # Same architecture, other weights; configured at 16x16 so the check runs small.
    other = load(write_tiny_checkpoint(tmp_path / "other.pt", seed=1, size=16)).model
    report = check_parity(other, make_session(exported / "encoder.onnx", "cpu"),
                          make_session(exported / "decoder.onnx", "cpu"))
    assert not report.passed
    assert "NO" in report.table() and report.worst("encoder") > 1e-2


@pytest.mark.parametrize("ckpt_arg,message", [
    ("/nonexistent/run/model-3.pt", "no such checkpoint file or run directory"),
    ("truncated", "not a readable torch checkpoint"),
])
def test_bad_ckpt_is_a_clear_error_with_exit_2(ckpt, tmp_path, capsys, ckpt_arg, message):
    if ckpt_arg == "truncated":
        ckpt_arg = str(tmp_path / "model-1.pt")
        (tmp_path / "model-1.pt").write_bytes(ckpt.read_bytes()[:50_000])
    assert main(["--ckpt", ckpt_arg, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and ckpt_arg in err and "Traceback" not in err
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_upstream_checkpoint_without_config_needs_config(tmp_path, capsys):
    ae = AutoencoderKL.from_config(tiny_model_config())
    path = save_checkpoint(tmp_path / "model-1.pt", {"model": ae.state_dict(), "step": 1})
    assert main(["--ckpt", str(path), "--out", str(tmp_path / "out")]) == 2
    assert "stores no config" in capsys.readouterr().err


def test_fp16_torchscript_graphs_and_diffusers_folder_in_one_dir(tmp_path):
    ckpt = write_tiny_checkpoint(tmp_path / "model-7.pt", seed=0, size=32)
    out = tmp_path / "fp16"
    assert main(["--ckpt", str(ckpt), "--out", str(out), "--fp16", "--exporter", "torchscript",
                 "--format", "onnx,diffusers"]) == 0
    m = read_manifest(out)
    assert m["precision"] == "fp16" and m["exporter"] == "torchscript" and m["parity"]["passed"]
    assert "max(1, max|torch|)" in m["parity"]["bound"]
    assert m["diffusers"]["sha256"] == sha256_file(out / m["diffusers"]["weights"])
    assert json.loads((out / m["diffusers"]["config"]).read_text())["latent_channels"] == 3
    for name in ("encoder", "decoder"):
        graph = onnx.load(str(out / f"{name}.onnx")).graph
        for v in [*graph.input, *graph.output]:
            assert v.type.tensor_type.elem_type == FLOAT
        conv_weights = [i for i in graph.initializer if len(i.dims) == 4]
        assert conv_weights and all(i.data_type == FLOAT16 for i in conv_weights)
        assert "Cast" in {n.op_type for n in graph.node}


def test_session_reports_the_provider_actually_in_use(exported, capsys):
    session = make_session(exported / "encoder.onnx", "cuda")
    if "CUDAExecutionProvider" in ort.get_available_providers():
        assert session.get_providers()[0] == "CUDAExecutionProvider"
    else:
        assert session.get_providers() == ["CPUExecutionProvider"]
        assert ("asked onnxruntime for CUDAExecutionProvider but the session runs on "
                "CPUExecutionProvider") in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore")  # the TorchScript exporter's deprecation/tracer notes
def test_group_norm_of_a_flat_offset_map_is_as_accurate_as_torch(tmp_path):
    """A group whose mean dwarfs its spread (flat radio-map regions): against float64, the
    rewritten graph must be as close as torch's float32 GroupNorm (~5e-5; onnxruntime's
    InstanceNormalization alone is ~2e-3 off)."""
    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(32, 64, eps=1e-6)
    x = torch.randn(1, 64, 256, 256) * 0.01 + 3.0
    x[:, :, :128] = 3.0
    path = tmp_path / "norm.onnx"
    torch.onnx.export(norm, (x,), str(path), dynamo=False, input_names=["x"], opset_version=18)
    proto = onnx.load(str(path))
    assert precise_instance_norms(proto) == 1
    onnx.checker.check_model(proto, full_check=True)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        torch_err = np.abs(norm(x).numpy() - norm.double()(x.double()).numpy()).max()
        ref = norm(x.double()).numpy()
    assert np.abs(session.run(None, {"x": x.numpy()})[0] - ref).max() <= max(torch_err, 1e-5)
