"""The inference fast paths give the plain fp32 network's outputs, shapes and layouts."""
import copy
import time

import pytest
import torch
import torch.nn.functional as F

from model.autoencoder import AutoencoderKL
from runtime import fast_layers
from runtime.fast_layers import (PointwiseConv2d, WinogradConv2d, use_matmul_1x1, use_winograd,
                                 winograd_available)
from runtime import inference, machine
from runtime.inference import InferenceOptions, prepare_for_inference
from tests.conftest import tiny_model_config

needs_nnpack = pytest.mark.skipif(not winograd_available(), reason="torch built without NNPACK")


@pytest.fixture(scope="module")
def tiny() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL.from_config(tiny_model_config(attn=[16])).eval()


@pytest.fixture(scope="module")
def maps() -> torch.Tensor:
    """Radio-map-like inputs in [-1, 1]: smooth gain falling off from a corner, with a hole."""
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    gain = 1.0 - torch.log1p(torch.hypot(yy - 5, xx - 25)) / 4.0
    gain[10:15, 3:12] = 0.0
    x = torch.stack([gain, gain.flip(1)])[:, None].clamp(0, 1)
    return x * 2 - 1


@pytest.fixture(scope="module")
def reference(tiny, maps) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        posterior = tiny.encode(maps)
        return {"mean": posterior.mean, "logvar": posterior.logvar,
                "image": tiny.decode(posterior.mean)}


def prepared(tiny: AutoencoderKL, **options) -> object:
    return prepare_for_inference(copy.deepcopy(tiny), "cpu", **options)


@pytest.mark.parametrize("options", [
    pytest.param(dict(winograd=True, matmul_1x1=True), marks=needs_nnpack),
    pytest.param(dict(winograd=True, channels_last=True), marks=needs_nnpack),
    dict(winograd=False, matmul_1x1=True, channels_last=True),
])
def test_fp32_paths_match_the_plain_network(tiny, maps, reference, options):
    model = prepared(tiny, **options)
    posterior = model.encode(maps)
    image = model.decode(reference["mean"])
    torch.testing.assert_close(posterior.mean, reference["mean"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(posterior.logvar, reference["logvar"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(image, reference["image"], rtol=1e-4, atol=1e-4)
    assert posterior.mean.dtype == image.dtype == torch.float32
    assert image.is_contiguous()  # callers get plain NCHW whatever layout ran inside
    assert image.shape == (2, 1, 32, 32) and posterior.mean.shape == (2, 3, 8, 8)


def test_reconstruct_is_decode_of_the_posterior_mode(tiny, maps, reference):
    model = prepared(tiny, winograd=False, matmul_1x1=False)
    torch.testing.assert_close(model.reconstruct(maps), reference["image"])
    torch.testing.assert_close(model(maps), reference["image"])


def test_channels_last_is_kept_inside_the_network(tiny, maps):
    model = prepared(tiny, winograd=False, channels_last=True)
    assert model.model.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    seen = []
    hook = model.model.decoder.conv_out.register_forward_hook(
        lambda mod, inp, out: seen.append(inp[0].is_contiguous(memory_format=torch.channels_last)))
    model.decode(torch.randn(1, 3, 8, 8))
    hook.remove()
    assert seen == [True]


@needs_nnpack
def test_winograd_swaps_every_3x3_stride1_conv_and_keeps_the_state_dict(tiny):
    model = copy.deepcopy(tiny)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    swapped = use_winograd(model)
    convs3 = [m for m in tiny.modules() if isinstance(m, torch.nn.Conv2d)
              and m.kernel_size == (3, 3) and m.stride == (1, 1)]
    assert swapped == len(convs3) > 0
    assert isinstance(model.decoder.mid.block_1.conv1, WinogradConv2d)
    assert isinstance(model.decoder.conv_out, WinogradConv2d)  # thin: measured, not assumed
    assert type(model.encoder.down[0].downsample.conv) is torch.nn.Conv2d  # stride 2 stays
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_matmul_1x1_swaps_the_pointwise_convs_with_the_same_output():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(16, 8, 1)
    holder = torch.nn.Sequential(conv)
    assert use_matmul_1x1(holder) == 1 and isinstance(holder[0], PointwiseConv2d)
    x = torch.randn(3, 16, 5, 7)
    with torch.inference_mode():
        torch.testing.assert_close(holder(x), F.conv2d(x, conv.weight, conv.bias))
        out = holder(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, F.conv2d(x, conv.weight, conv.bias))
    assert out.is_contiguous(memory_format=torch.channels_last)


@needs_nnpack
def test_winograd_conv_measures_only_when_asked_and_runs_the_winner(monkeypatch):
    """Under measure_kernels() a layer times both kernels once per size and keeps the winner;
    outside it an unmeasured size runs oneDNN without timing anything, so a serving process
    never makes a choice of its own (runtime/decision.py records them)."""
    torch.manual_seed(0)
    plain = torch.nn.Conv2d(16, 16, 3, padding=1)
    conv = WinogradConv2d.from_conv(plain)
    verdicts = {32: True, 24: False}  # what the timing says, per map side
    timed = []

    def nnpack_is_faster(nnpack, onednn):
        side = nnpack().shape[-1]
        timed.append(side)
        return verdicts[side]

    monkeypatch.setattr(fast_layers, "nnpack_is_faster", nnpack_is_faster)
    calls = []
    nnpack = torch._nnpack_spatial_convolution
    monkeypatch.setattr(torch, "_nnpack_spatial_convolution",
                        lambda *a: calls.append(a[0].shape) or nnpack(*a))
    with torch.inference_mode():
        x = torch.randn(2, 16, 32, 32)
        conv(x)
        assert timed == [] and calls == [] and conv.measured == {}  # not measuring: oneDNN
    for side, runs_nnpack in ((32, True), (24, False), (32, True)):
        calls.clear()
        x = torch.randn(2, 16, side, side)
        with torch.inference_mode(), fast_layers.measure_kernels():
            torch.testing.assert_close(conv(x), plain(x), rtol=1e-4, atol=1e-4)
        assert (len(calls) >= 2) == runs_nnpack, side  # per map, when NNPACK won
    assert timed == [32, 24] and conv.measured == {(32, 32): True, (24, 24): False}


@needs_nnpack
def test_a_recorded_winograd_plan_reproduces_the_measured_kernels_bit_for_bit(tiny, maps):
    """The plan measured in one model, installed in a fresh copy, gives identical bytes and
    runs NNPACK exactly where the plan says; a plan naming a missing layer is refused."""
    measured = prepared(tiny, winograd=True)
    with fast_layers.measure_kernels():
        measured.encode(maps)
    plan = fast_layers.winograd_plan(measured.model)
    assert plan and set(map(len, [s for sizes in plan.values() for s in sizes])) <= {2}
    forced = {name: [[16, 16], [32, 32], [8, 8]] for name in plan}  # NNPACK everywhere
    for chosen in (plan, forced):
        a, b = prepared(tiny, winograd=True), prepared(tiny, winograd=True)
        fast_layers.apply_winograd_plan(a.model, chosen)
        fast_layers.apply_winograd_plan(b.model, chosen)
        assert torch.equal(a.encode(maps).mean, b.encode(maps).mean)
        assert fast_layers.winograd_plan(a.model) == {n: sorted(s) for n, s in chosen.items()}
    with pytest.raises(ValueError, match="layers this network lacks"):
        fast_layers.apply_winograd_plan(prepared(tiny, winograd=True).model, {"nope": []})


def test_the_kernel_race_is_real_timing():
    slow = lambda: time.sleep(0.002) or torch.zeros(1)  # noqa: E731
    fast = lambda: torch.zeros(1)  # noqa: E731
    assert fast_layers.nnpack_is_faster(fast, slow) and not fast_layers.nnpack_is_faster(slow,
                                                                                         fast)


@needs_nnpack
def test_winograd_conv_falls_back_where_nnpack_cannot_run():
    conv = WinogradConv2d.from_conv(torch.nn.Conv2d(4, 4, 3, padding=1))
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    conv(x).sum().backward()  # autograd: the ordinary convolution, so gradients flow
    assert x.grad is not None
    with torch.no_grad():
        double = conv.double()(x.detach().double())
    assert double.dtype == torch.float64
    expected = F.conv2d(x.detach().double(), conv.weight, conv.bias, padding=1)
    torch.testing.assert_close(double, expected)


def test_bf16_autocast_stays_close_and_returns_float32(tiny, reference):
    z = reference["mean"][:1, :, :4, :4]  # small: CPUs without native bf16 emulate it slowly
    with torch.no_grad():
        expected = tiny.decode(z)
    image = prepared(tiny, winograd=False, precision="bf16").decode(z)
    assert image.dtype == torch.float32
    err = (image - expected).abs().max()
    assert 0 < err < 0.25  # bf16 has an 8-bit mantissa: close, never identical


def test_no_options_is_the_plain_fp32_network_whatever_the_machine(tiny, monkeypatch):
    """No machine-dependent default: with no options every toggle is off, whatever this CPU
    has (NNPACK, glibc, native bf16); the fastest path is measured (runtime/decision.py)."""
    assert not hasattr(inference, "default_options")
    seen = []
    for has in (False, True):
        monkeypatch.setattr(inference, "winograd_available", lambda: has)
        monkeypatch.setattr(inference, "glibc", lambda: object() if has else None)
        monkeypatch.setattr(machine, "cpu_flags", lambda: {"avx512_bf16", "amx_bf16"} if has
                            else set())
        seen.append(prepared(tiny).options)
    assert seen == [InferenceOptions(), InferenceOptions()]
    assert InferenceOptions().describe() == "fp32"


def test_fp16_within_range_stays_fp16_and_close(tiny, maps, reference):
    model = prepared(tiny, precision="fp16")
    image = model.decode(reference["mean"])
    err = (image - reference["image"]).abs().max()
    assert image.dtype == torch.float32 and 0 < err < 0.05
    assert model.fp32_recomputes == 0


def test_fp16_overflow_is_recomputed_in_fp32_even_under_an_outer_autocast(tiny, maps, caplog):
    big = copy.deepcopy(tiny)
    with torch.no_grad():  # activations past fp16's 65504: inf under fp16 autocast
        big.encoder.conv_in.weight.mul_(1e6)
        big.decoder.conv_in.weight.mul_(1e6)
        expected = big.encode(maps).mean
        z = torch.randn(2, 3, 8, 8)
        expected_image = big.decode(z)
    assert torch.isfinite(expected).all() and torch.isfinite(expected_image).all()
    model = prepared(big, precision="fp16", channels_last=True)
    with torch.autocast("cpu", dtype=torch.float16):
        mean = model.encode(maps).mean
    image = model.decode(z)
    torch.testing.assert_close(mean, expected)
    torch.testing.assert_close(image, expected_image, rtol=1e-4, atol=1e-4)  # channels_last
    assert model.fp32_recomputes == 2 and "fp16 inference overflowed" in caplog.text


def test_non_finite_input_is_not_blamed_on_fp16(tiny, maps):
    model = prepared(tiny, precision="fp16")
    bad = maps.clone()
    bad[0, 0, 0, 0] = float("nan")
    assert not torch.isfinite(model.encode(bad).mean).all()
    assert model.fp32_recomputes == 0


def test_bad_options_are_named(tiny):
    with pytest.raises(TypeError, match="unknown inference option 'channel_last'"):
        prepared(tiny, channel_last=True)
    with pytest.raises(ValueError, match="precision must be one of"):
        prepared(tiny, precision="int8")
    with pytest.raises(ValueError, match="winograd is a CPU path"):
        prepare_for_inference(copy.deepcopy(tiny), "cuda", winograd=True)
    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA device"):
        prepared(tiny, cuda_graphs=True)
    with pytest.raises(ValueError, match="winograd does not combine with compile"):
        prepared(tiny, winograd=True, compile=True)


def test_onednn_bf16_stays_close_to_fp32_and_leaves_the_global_setting_as_it_was(tiny):
    x = torch.rand(2, 1, 64, 64) * 2 - 1
    plain = prepared(tiny, winograd=False, matmul_1x1=False)
    fast = prepared(tiny, winograd=False, onednn_bf16=True)
    want, got = plain.reconstruct(x), fast.reconstruct(x)
    assert torch.backends.mkldnn.conv.fp32_precision == "none"  # restored after the call
    assert torch.backends.mkldnn.matmul.fp32_precision == "none"
    assert got.dtype == torch.float32 and 0 < (got - want).abs().max() < 0.2
    with pytest.raises(ValueError, match="does not combine with bf16"):
        prepared(tiny, onednn_bf16=True, precision="bf16")


@pytest.mark.slow
def test_a_compiled_bf16_channels_last_encoder_gives_finite_latents_on_cpu(maps):
    """Without inductor's freezing, torch.compile of this network (first_radio's family: two
    ResNet blocks per level) in bf16 + channels_last returned all-NaN latents on CPU."""
    cfg = tiny_model_config(32)
    cfg.ddconfig.num_res_blocks = 2
    torch.manual_seed(0)
    net = AutoencoderKL.from_config(cfg).eval()
    bf16 = dict(precision="bf16", channels_last=True, winograd=False, matmul_1x1=False)
    eager = prepared(net, **bf16).encode(maps).mean
    compiled = prepared(net, compile=True, **bf16).encode(maps).mean
    assert torch.isfinite(compiled).all()
    span = float(eager.max() - eager.min())  # bf16 against bf16: only the rounding differs
    assert float((compiled - eager).abs().max()) < 0.05 * span
