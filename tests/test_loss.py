import pytest
import torch

from model.autoencoder import AutoencoderKL
from model.checkpoint import CheckpointError
from model.config import LossConfig
from model.discriminator import NLayerDiscriminator
from model.losses import LPIPSWithDiscriminator, adaptive_weight, hinge_d_loss, vanilla_d_loss
from model.lpips import LPIPS, LPIPSWeightsError, lpips_linear_weights_path
from tests.conftest import tiny_model_config
from tests.test_trainer import one_thread  # noqa: F401  (autouse: one intra-op thread)

VGG_CONVS = {0: (64, 3), 2: (64, 64), 5: (128, 64), 7: (128, 128), 10: (256, 128),
             12: (256, 256), 14: (256, 256), 17: (512, 256), 19: (512, 512), 21: (512, 512),
             24: (512, 512), 26: (512, 512), 28: (512, 512)}
SLICE_OF = {0: 1, 2: 1, 5: 2, 7: 2, 10: 3, 12: 3, 14: 3, 17: 4, 19: 4, 21: 4, 24: 5, 26: 5, 28: 5}
UPSTREAM_GEN_TERMS = {"total_loss", "logvar", "kl_loss", "nll_loss", "rec_loss", "d_weight",
                      "disc_factor"}


def test_lpips_keys_are_taming_upstream_keys():
    expected = {"scaling_layer.shift", "scaling_layer.scale"}
    expected |= {f"net.slice{SLICE_OF[i]}.{i}.{p}" for i in VGG_CONVS for p in ("weight", "bias")}
    expected |= {f"lin{i}.model.1.weight" for i in range(5)}
    assert set(LPIPS().state_dict()) == expected


def test_real_lpips_linear_file_loads_strictly():
    path = lpips_linear_weights_path()
    assert path is not None and path.is_file(), "the lpips package ships weights/v0.1/vgg.pth"
    model = LPIPS()
    model.load_linear_heads(path)
    shipped = torch.load(path, map_location="cpu", weights_only=True)
    assert sorted(shipped) == [f"lin{i}.model.1.weight" for i in range(5)]
    for key, value in shipped.items():
        assert torch.equal(model.state_dict()[key], value)


def test_torchvision_vgg16_file_layout_loads(tmp_path):
    gen = torch.Generator().manual_seed(0)
    state = {}
    for i, (out_ch, in_ch) in VGG_CONVS.items():
        state[f"features.{i}.weight"] = torch.randn(out_ch, in_ch, 3, 3, generator=gen)
        state[f"features.{i}.bias"] = torch.randn(out_ch, generator=gen)
    state["classifier.0.weight"] = torch.zeros(4, 4)  # torchvision's head: ignored
    torch.save(state, tmp_path / "vgg16.pth")
    model = LPIPS()
    model.load_vgg16(tmp_path / "vgg16.pth")
    assert torch.equal(model.state_dict()["net.slice4.19.weight"], state["features.19.weight"])
    assert torch.equal(model.state_dict()["net.slice1.0.bias"], state["features.0.bias"])


def test_an_lpips_file_carrying_code_is_refused_like_a_checkpoint(tmp_path):
    path = tmp_path / "vgg16.pth"
    torch.save({"features.0.weight": _Eval("1")}, path)
    for load in (LPIPS().load_vgg16, LPIPS().load_linear_heads):
        with pytest.raises(CheckpointError, match=r"vgg16\.pth: refused: .*builtins\.eval$"):
            load(path)


class _Eval:
    def __init__(self, source: str):
        self.source = source

    def __reduce__(self):
        return (eval, (self.source,))


def test_missing_vgg_weights_stop_with_the_file_and_the_key(tmp_path):
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    try:
        with pytest.raises(LPIPSWeightsError) as err:
            LPIPSWithDiscriminator(LossConfig(perceptual_weight=1.0))
        message = str(err.value)
        assert str(tmp_path / "hub" / "checkpoints" / "vgg16-397923af.pth") in message
        assert "model.lossconfig.perceptual_weight: 0" in message
        loss = LPIPSWithDiscriminator(LossConfig(perceptual_weight=1.0, allow_random_lpips=True))
        assert isinstance(loss.perceptual_loss, LPIPS)
    finally:
        torch.hub.set_dir(old)


def test_lpips_is_frozen_in_eval_and_treats_one_channel_as_gray():
    torch.manual_seed(0)
    model = LPIPS()
    model.load_linear_heads(lpips_linear_weights_path())
    model.train()
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    x, y = torch.rand(2, 1, 32, 32) * 2 - 1, torch.rand(2, 1, 32, 32) * 2 - 1
    d = model(x, y)
    assert d.shape == (2, 1, 1, 1) and (d > 0).all()
    assert torch.allclose(d, model(x.repeat(1, 3, 1, 1), y.repeat(1, 3, 1, 1)))
    assert torch.allclose(model(x, x), torch.zeros(2, 1, 1, 1))


def test_adaptive_weight_matches_hand_computation():
    w = torch.tensor([[0.5, -1.0], [2.0, 0.25]], requires_grad=True)
    a, b = torch.tensor([[1.0, 2.0], [3.0, -1.0]]), torch.tensor([[0.1, 0.2], [-0.3, 0.4]])
    s = (w * a).sum()  # s = 0.5 - 2 + 6 - 0.25 = 4.25
    nll, g = s ** 2, (w * b).sum()
    # d nll / dw = 2 s a, d g / dw = b
    expected = (2 * 4.25 * a).norm() / (b.norm() + 1e-4) * 0.5
    got = adaptive_weight(nll, g, w, disc_weight=0.5)
    assert torch.allclose(got, expected)
    assert not got.requires_grad
    tiny_g = (w * b * 1e-9).sum()
    assert adaptive_weight(nll, tiny_g, w, disc_weight=0.5).item() == pytest.approx(0.5e4)


def test_discriminator_losses():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-3.0, 0.0])
    # hinge: relu(1 - real) = [0, 0.5], relu(1 + fake) = [0, 1]
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.25 + 0.5))
    sp = torch.nn.functional.softplus
    expected = 0.5 * (sp(-real).mean() + sp(fake).mean())
    assert torch.allclose(vanilla_d_loss(real, fake), expected)


def _setup(disc_start=5, **kw):
    torch.manual_seed(0)
    model = AutoencoderKL.from_config(tiny_model_config(32))
    cfg = LossConfig(disc_start=disc_start, perceptual_weight=0.0, kl_weight=1e-6, **kw)
    loss = LPIPSWithDiscriminator(cfg)
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    recon, posterior = model(x)
    return model, loss, x, recon, posterior


def test_phase1_generator_loss_is_reconstruction_plus_kl_and_never_runs_the_critic():
    model, loss, x, recon, posterior = _setup(disc_start=5)
    total, log = loss.generator_loss(x, recon, posterior, 4, model.get_last_layer())
    assert set(log) == {f"train/{k}" for k in UPSTREAM_GEN_TERMS}
    assert log["train/disc_factor"].item() == 0 and log["train/d_weight"].item() == 0
    rec = (x - recon).abs() + (x - recon) ** 2
    assert torch.allclose(log["train/rec_loss"], rec.mean())
    nll = rec.sum() / 2  # logvar 0: nll = rec
    kl = posterior.kl().sum() / 2
    assert torch.allclose(log["train/nll_loss"], nll)
    assert torch.allclose(total, nll + 1e-6 * kl)
    assert loss.discriminator.main[3].num_batches_tracked.item() == 0


def test_phase2_adds_adaptive_gan_term_and_gives_the_critic_no_generator_grads():
    model, loss, x, recon, posterior = _setup(disc_start=5)
    total, log = loss.generator_loss(x, recon, posterior, 5, model.get_last_layer())
    assert set(log) == {f"train/{k}" for k in UPSTREAM_GEN_TERMS | {"g_loss"}}
    assert log["train/disc_factor"].item() == 1.0 and log["train/d_weight"].item() > 0
    expected = (log["train/nll_loss"] + 1e-6 * log["train/kl_loss"]
                + log["train/d_weight"] * log["train/g_loss"])
    assert torch.allclose(total.detach(), expected)
    total.backward()
    assert model.decoder.conv_out.weight.grad is not None
    assert all(p.grad is None for p in loss.discriminator.parameters())
    assert all(p.requires_grad for p in loss.discriminator.parameters())
    d_loss, d_log = loss.discriminator_loss(x, recon, 5)
    assert set(d_log) == {"train/disc_loss", "train/logits_real", "train/logits_fake"}
    d_loss.backward()
    assert all(p.grad is not None for p in loss.discriminator.parameters())


def test_logvar_is_fixed_unless_learned():
    assert not _setup()[1].logvar.requires_grad
    model, loss, x, recon, posterior = _setup(learn_logvar=True, logvar_init=0.5)
    total, log = loss.generator_loss(x, recon, posterior, 0, model.get_last_layer())
    rec = (x - recon).abs() + (x - recon) ** 2
    nll = (rec / torch.exp(torch.tensor(0.5)) + 0.5).sum() / 2
    assert torch.allclose(log["train/nll_loss"], nll)
    total.backward()
    assert loss.logvar.grad is not None


def test_actnorm_discriminator_initialises_from_first_batch():
    torch.manual_seed(0)
    disc = NLayerDiscriminator(1, use_actnorm=True)
    x = torch.randn(4, 1, 32, 32)
    disc(x)
    norm = disc.main[3]
    assert norm.initialized.item() == 1
    h = disc.main[:3](x)
    out = norm(h).transpose(0, 1).reshape(h.shape[1], -1)
    assert torch.allclose(out.mean(1), torch.zeros(h.shape[1]), atol=1e-5)
    assert torch.allclose(out.std(1), torch.ones(h.shape[1]), atol=1e-3)


@pytest.mark.parametrize("step", [4, 5])  # phase 1, phase 2
def test_every_logged_term_lives_on_the_inputs_device(step):
    # The trainer stacks the log's values into one tensor; a term left on the CPU breaks every
    # CUDA run. The meta device stands in for a second device here.
    model, loss, x, _, _ = _setup(disc_start=5)
    model, loss, x = model.to("meta"), loss.to("meta"), x.to("meta")
    recon, posterior = model(x)
    _, log = loss.generator_loss(x, recon, posterior, step, model.get_last_layer())
    _, d_log = loss.discriminator_loss(x, recon, step)
    assert {name: v.device.type for name, v in {**log, **d_log}.items()} == \
        {name: "meta" for name in {**log, **d_log}}


def test_loss_state_without_frozen_lpips_loads_and_other_mismatches_are_refused():
    cfg = LossConfig(perceptual_weight=1.0, allow_random_lpips=True)
    torch.manual_seed(0)
    loss = LPIPSWithDiscriminator(cfg)
    lean = loss.trained_state_dict()
    assert lean.keys() == {k for k in loss.state_dict() if not k.startswith("perceptual_loss.")}
    assert {"logvar", "discriminator.main.0.weight"} <= lean.keys()
    full = {k: v + 1 if v.is_floating_point() else v for k, v in loss.state_dict().items()}
    other = LPIPSWithDiscriminator(cfg)
    other.load_trained_state_dict(full)  # a file that carries LPIPS (older or upstream) loads
    assert torch.equal(other.state_dict()["perceptual_loss.lin0.model.1.weight"],
                       full["perceptual_loss.lin0.model.1.weight"])
    other.load_trained_state_dict(lean)
    assert all(torch.equal(other.state_dict()[k], v) for k, v in lean.items())
    no_logvar = {k: v for k, v in lean.items() if k != "logvar"}
    for bad in (no_logvar, {**lean, "extra": lean["logvar"]}):
        with pytest.raises(RuntimeError, match="do not match this lossconfig"):
            other.load_trained_state_dict(bad)
    with pytest.raises(RuntimeError, match="unexpected"):  # LPIPS keys where none is built
        LPIPSWithDiscriminator(LossConfig(perceptual_weight=0.0)).load_trained_state_dict(full)


def test_fp16_adaptive_weight_from_scaled_gradients_matches_fp32():
    """With logvar_init 18 the NLL's gradients at the reconstruction are ~exp(-18) / 2 = 8e-9,
    under float16's smallest subnormal (6e-8): taken unscaled under float16 autocast they
    underflow (the weight comes out ~16x too small); taken of the loss times the GradScaler's
    scale and divided by it again they match float32's."""
    torch.manual_seed(0)
    loss = LPIPSWithDiscriminator(LossConfig(disc_start=0, perceptual_weight=0, logvar_init=18.0))
    ae = AutoencoderKL.from_config(tiny_model_config(32))
    x = torch.rand(2, 1, 32, 32) * 2 - 1

    def d_weight(dtype: torch.dtype | None, scale: float | None) -> float:
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            recon, posterior = ae(x, sample_posterior=False)
            _, log = loss.generator_loss(x, recon, posterior, 0, ae.get_last_layer(),
                                         grad_scale=None if scale is None
                                         else torch.tensor(scale))
        return log["train/d_weight"].item()

    fp32 = d_weight(None, None)
    assert d_weight(torch.float16, None) < 0.2 * fp32  # unscaled: underflow
    assert d_weight(torch.float16, 2.0 ** 12) == pytest.approx(fp32, rel=1e-2)
    assert d_weight(None, 2.0 ** 12) == pytest.approx(fp32, rel=1e-6)  # the scale cancels
