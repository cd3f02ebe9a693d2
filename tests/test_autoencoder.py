import torch

from model.autoencoder import AutoencoderKL
from model.blocks import AttnBlock
from model.checkpoint import load_into
from model.config import ModelConfig
from model.run_config import load_config
from tests.conftest import tiny_model_config
from tests.upstream_reference import RefAttn, RefAutoencoderKL


def expected_first_radio_keys() -> list[str]:
    """The upstream key list for ch_mult [1,2,4], 2 res blocks, no attn_resolutions,
    written out from the architecture description, not from our model."""
    def resnet(prefix, shortcut):
        names = ["norm1", "conv1", "norm2", "conv2"] + (["nin_shortcut"] if shortcut else [])
        return [f"{prefix}.{n}.{p}" for n in names for p in ("weight", "bias")]

    def mid(prefix):
        attn = [f"{prefix}.mid.attn_1.{n}.{p}" for n in ("norm", "q", "k", "v", "proj_out")
                for p in ("weight", "bias")]
        return resnet(f"{prefix}.mid.block_1", False) + attn + resnet(f"{prefix}.mid.block_2", False)

    def conv(name):
        return [f"{name}.weight", f"{name}.bias"]

    keys = conv("encoder.conv_in")
    widths_in, widths = [128, 128, 256], [128, 256, 512]
    for i in range(3):
        keys += resnet(f"encoder.down.{i}.block.0", widths_in[i] != widths[i])
        keys += resnet(f"encoder.down.{i}.block.1", False)
        if i < 2:
            keys += conv(f"encoder.down.{i}.downsample.conv")
    keys += mid("encoder") + conv("encoder.norm_out") + conv("encoder.conv_out")
    keys += conv("decoder.conv_in") + mid("decoder")
    block_in = 512
    for i in (2, 1, 0):
        for j in range(3):
            keys += resnet(f"decoder.up.{i}.block.{j}", block_in != widths[i])
            block_in = widths[i]
        if i > 0:
            keys += conv(f"decoder.up.{i}.upsample.conv")
    keys += conv("decoder.norm_out") + conv("decoder.conv_out")
    keys += conv("quant_conv") + conv("post_quant_conv")
    return keys


def first_radio_model() -> AutoencoderKL:
    return AutoencoderKL.from_config(load_config("first_radio.yaml").model)


def test_first_radio_parameter_count_and_key_names():
    model = first_radio_model()
    assert sum(p.numel() for p in model.parameters()) == 55_307_453
    assert sorted(model.state_dict()) == sorted(expected_first_radio_keys())
    assert len(model.state_dict()) == 204


def test_first_radio_latent_shape_320_and_256():
    with torch.device("meta"):
        model = first_radio_model()
        for size, latent in ((320, 80), (256, 64)):
            posterior = model.encode(torch.empty(1, 1, size, size))
            assert posterior.mean.shape == (1, 3, latent, latent)
            assert model.decode(posterior.mode()).shape == (1, 1, size, size)


def test_matches_upstream_network_output():
    torch.manual_seed(0)
    ref = RefAutoencoderKL(ch=32, ch_mult=[1, 2, 4], num_res_blocks=1, z_channels=3, embed_dim=3)
    ours = AutoencoderKL.from_config(tiny_model_config()).eval()
    load_into(ours, ref.state_dict(), "reference")  # strict: every key and shape must line up
    x = torch.rand(2, 1, 64, 48) * 2 - 1  # non-square too: fully convolutional
    with torch.no_grad():
        moments = ref.encode_moments(x)
        posterior = ours.encode(x)
        torch.testing.assert_close(torch.cat([posterior.mean, posterior.logvar], 1),
                                   moments, atol=1e-5, rtol=0)
        z = posterior.mode()
        torch.testing.assert_close(ours.decode(z), ref.decode(z), atol=1e-5, rtol=0)


def test_attention_block_is_upstreams_function_on_the_fused_kernel():
    """AttnBlock computes upstream's attention (same parameters and key names) in the layout
    scaled_dot_product_attention runs fused: no unfused math kernel, no HW x HW scores."""
    torch.manual_seed(0)
    ref = RefAttn(64).eval()
    block = AttnBlock(64).eval()
    load_into(block, ref.state_dict(), "RefAttn")
    x = torch.randn(2, 64, 8, 8)
    with torch.inference_mode(), torch.profiler.profile() as prof:
        out = block(x)
    torch.testing.assert_close(out, ref(x), rtol=1e-5, atol=1e-5)
    ops = {event.name for event in prof.events()}
    assert any("flash_attention" in op for op in ops), sorted(ops)
    assert "aten::_scaled_dot_product_attention_math" not in ops
    with torch.inference_mode():  # channels_last activations give the same output
        torch.testing.assert_close(block(x.to(memory_format=torch.channels_last)), out)


def test_attention_resolutions_place_attention_and_run():
    cfg = tiny_model_config(size=32, attn=[16])
    model = AutoencoderKL.from_config(cfg).eval()
    names = [k for k in model.state_dict() if ".attn." in k]
    assert "encoder.down.1.attn.0.q.weight" in names and "decoder.up.1.attn.1.q.weight" in names
    with torch.no_grad():
        out, posterior = model(torch.zeros(1, 1, 32, 32), sample_posterior=False)
    assert out.shape == (1, 1, 32, 32) and posterior.mean.shape == (1, 3, 8, 8)


def test_posterior_sampling_reproducible_and_kl():
    model = AutoencoderKL.from_config(tiny_model_config()).eval()
    with torch.no_grad():
        posterior = model.encode(torch.zeros(2, 1, 64, 64))
    a = posterior.sample(torch.Generator().manual_seed(3))
    b = posterior.sample(torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.equal(a, posterior.mode())
    assert posterior.kl().shape == (2,) and (posterior.kl() >= 0).all()
    assert posterior.logvar.max() <= 20 and posterior.logvar.min() >= -30


def test_model_config_defaults_are_the_radiodiff_network():
    cfg = ModelConfig()
    assert (cfg.embed_dim, cfg.ddconfig.ch, cfg.ddconfig.ch_mult) == (3, 128, [1, 2, 4])
    assert cfg.ddconfig.downsample_factor == 4


def _saved_bytes_and_grads(model: AutoencoderKL, x: torch.Tensor) -> tuple[int, list, torch.Tensor]:
    """Bytes autograd keeps for the backward pass, the parameter grads, and the output."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(t.numel() * t.element_size()) or t, lambda t: t):
        recon, _ = model(x, sample_posterior=False)
    model.zero_grad()
    recon.square().mean().backward()
    return sum(saved), [p.grad.clone() for p in model.parameters()], recon.detach()


def test_gradient_checkpointing_keeps_results_and_cuts_saved_activations():
    torch.manual_seed(0)
    model = AutoencoderKL.from_config(tiny_model_config(attn=[16]))
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    plain_bytes, plain_grads, plain_out = _saved_bytes_and_grads(model, x)
    model.enable_gradient_checkpointing()
    ckpt_bytes, ckpt_grads, ckpt_out = _saved_bytes_and_grads(model, x)
    torch.testing.assert_close(ckpt_out, plain_out)
    for a, b in zip(ckpt_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert ckpt_bytes < 0.4 * plain_bytes
    with torch.no_grad():  # inference is unaffected
        torch.testing.assert_close(model(x, sample_posterior=False)[0], plain_out)
