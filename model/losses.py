"""LPIPSWithDiscriminator: the VAE-GAN loss of Latent Diffusion / RadioDiff's first stage.

Generator (autoencoder) objective, per upstream:
    rec  = pixelloss_weight * (|x - x'| + (x - x')^2) + perceptual_weight * LPIPS(x, x')  per pixel
    nll  = sum(rec / exp(logvar) + logvar) / N
    loss = nll + kl_weight * KL + d_weight * disc_factor * (-mean(D(x')))
with d_weight = ||grad nll|| / (||grad g|| + 1e-4) at the decoder's last layer, clamped to
[0, 1e4], times disc_weight; disc_factor is 0 before `disc_start` (phase 1), then
`lossconfig.disc_factor` (phase 2). The discriminator minimises the hinge (or vanilla) loss.
Logged names match upstream's, prefixed by the split (`train/total_loss`, ...).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import LossConfig
from .discriminator import NLayerDiscriminator, weights_init
from .distributions import DiagonalGaussianDistribution
from .lpips import LPIPS

# LPIPS is frozen and rebuilt from its weight files (model/lpips.py) whenever the loss is built,
# so the trainer's checkpoints leave it out: its ~56 MiB would dwarf a small autoencoder.
FROZEN_PREFIX = "perceptual_loss."


def adopt_weight(weight: float, global_step: int, threshold: int = 0, value: float = 0.0) -> float:
    """`weight` from `threshold` on, `value` before it."""
    return value if global_step < threshold else weight


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def _grad_norm(loss: torch.Tensor, layer: torch.Tensor, scale: torch.Tensor | None
               ) -> torch.Tensor:
    """||d loss / d layer||, taken of `loss * scale` and divided by `scale` when given."""
    scaled = loss if scale is None else loss.float() * scale
    norm = torch.norm(torch.autograd.grad(scaled, layer, retain_graph=True)[0].float())
    return norm if scale is None else norm / scale


def adaptive_weight(nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    disc_weight: float, grad_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Balance the GAN term against the NLL by their gradient norms at `last_layer`.

    Under float16 autocast pass the GradScaler's scale as `grad_scale`: the gradients are then
    taken of the scaled losses, as backward takes them (unscaled, small ones underflow to zero
    in float16 activations' backward), and their norms divided by the scale again. A scale too
    large overflows them: the weight is then NaN, which the trainer treats as GradScaler treats
    any overflow (the step skipped, the scale lowered)."""
    nll_norm = _grad_norm(nll_loss, last_layer, grad_scale)
    g_norm = _grad_norm(g_loss, last_layer, grad_scale)
    d_weight = nll_norm / (g_norm + 1e-4)
    return torch.clamp(d_weight, 0.0, 1e4).detach() * disc_weight


class LPIPSWithDiscriminator(nn.Module):
    """Reconstruction + KL + adaptive-weighted PatchGAN loss; holds LPIPS, logvar and the critic."""

    def __init__(self, cfg: LossConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.perceptual_weight > 0:
            self.perceptual_loss = LPIPS.pretrained(allow_random=cfg.allow_random_lpips)
        # Upstream registers logvar as a parameter but gives it to no optimizer: it stays put.
        self.logvar = nn.Parameter(torch.full((), float(cfg.logvar_init)),
                                   requires_grad=cfg.learn_logvar)
        self.discriminator = NLayerDiscriminator(cfg.disc_in_channels, n_layers=cfg.disc_num_layers,
                                                 use_actnorm=cfg.use_actnorm).apply(weights_init)
        self.d_loss_fn = hinge_d_loss if cfg.disc_loss == "hinge" else vanilla_d_loss

    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict without the frozen LPIPS weights: critic, its BatchNorm stats, logvar."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(FROZEN_PREFIX)}

    def load_trained_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """A strict load, except that the frozen LPIPS keys may be absent (or present)."""
        expected = self.state_dict().keys()
        missing = [k for k in expected if k not in state and not k.startswith(FROZEN_PREFIX)]
        unexpected = [k for k in state if k not in expected]
        if missing or unexpected:
            raise RuntimeError(f"loss weights do not match this lossconfig: {len(missing)} "
                               f"missing {missing[:3]}, {len(unexpected)} unexpected "
                               f"{unexpected[:3]}")
        self.load_state_dict(state, strict=False)

    def disc_factor(self, global_step: int) -> float:
        """0 in phase 1 (before disc_start), lossconfig.disc_factor in phase 2."""
        return adopt_weight(self.cfg.disc_factor, global_step, threshold=self.cfg.disc_start)

    def adversarial(self, global_step: int) -> bool:
        """Whether the GAN terms are on (phase 2) at this step."""
        return self.disc_factor(global_step) > 0

    def _reconstruction(self, inputs: torch.Tensor, recon: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-pixel rec loss and the per-sample-summed, batch-averaged NLL."""
        rec = self.cfg.pixelloss_weight * ((inputs - recon).abs() + (inputs - recon).pow(2))
        if self.cfg.perceptual_weight > 0:
            rec = rec + self.cfg.perceptual_weight * self.perceptual_loss(inputs, recon)
        nll = rec / torch.exp(self.logvar) + self.logvar
        return rec, nll.sum() / nll.shape[0]

    def generator_loss(self, inputs: torch.Tensor, recon: torch.Tensor,
                       posterior: DiagonalGaussianDistribution, global_step: int,
                       last_layer: torch.Tensor, split: str = "train",
                       grad_scale: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The autoencoder's loss and its log. Phase 1 never runs the discriminator.
        `grad_scale`: the GradScaler's scale under float16 (see adaptive_weight)."""
        rec, nll = self._reconstruction(inputs, recon)
        kl = posterior.kl().sum() / inputs.shape[0]
        loss = nll + self.cfg.kl_weight * kl
        factor = self.disc_factor(global_step)
        d_weight = torch.zeros((), device=inputs.device)
        log = {}
        if factor > 0:
            g_loss = -self._frozen_critic(recon).mean()
            d_weight = adaptive_weight(nll, g_loss, last_layer, self.cfg.disc_weight, grad_scale)
            loss = loss + d_weight * factor * g_loss
            log["g_loss"] = g_loss.detach()
        log = {"total_loss": loss.detach(), "logvar": self.logvar.detach(),
               "kl_loss": kl.detach(), "nll_loss": nll.detach(), "rec_loss": rec.detach().mean(),
               "d_weight": d_weight, "disc_factor": torch.full((), factor, device=inputs.device),
               **log}
        return loss, {f"{split}/{k}": v for k, v in log.items()}

    def _frozen_critic(self, x: torch.Tensor) -> torch.Tensor:
        """D(x) with the critic's weights as constants: the generator step gives them no grads."""
        params = [p for p in self.discriminator.parameters() if p.requires_grad]
        for p in params:
            p.requires_grad_(False)
        try:
            return self.discriminator(x)
        finally:
            for p in params:
                p.requires_grad_(True)

    def discriminator_loss(self, inputs: torch.Tensor, recon: torch.Tensor, global_step: int,
                           split: str = "train", discriminator: nn.Module | None = None
                           ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The critic's loss on real maps vs detached reconstructions (a DDP wrapper may be
        passed as `discriminator`)."""
        disc = discriminator if discriminator is not None else self.discriminator
        logits_real = disc(inputs.detach())
        logits_fake = disc(recon.detach())
        loss = self.disc_factor(global_step) * self.d_loss_fn(logits_real, logits_fake)
        log = {"disc_loss": loss.detach(), "logits_real": logits_real.detach().mean(),
               "logits_fake": logits_fake.detach().mean()}
        return loss, {f"{split}/{k}": v for k, v in log.items()}
