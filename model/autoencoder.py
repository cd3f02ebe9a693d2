"""AutoencoderKL: the RadioDiff / Latent-Diffusion first stage, with upstream state-dict names."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .blocks import AttnBlock, Downsample, ResnetBlock, Upsample, normalize, swish
from .config import MAX_PARAMETERS, ConfigError, DDConfig, ModelConfig
from .distributions import DiagonalGaussianDistribution


def _stage(resolution: int, attn_resolutions: list[int]) -> bool:
    return resolution in attn_resolutions


class _Blocks(nn.Module):
    """Runs its residual and attention blocks through `run`: with gradient checkpointing on,
    a block's activations are recomputed in the backward pass instead of kept."""

    gradient_checkpointing = False

    def run(self, block: nn.Module, h: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, h, use_reentrant=False)
        return block(h)

    def run_mid(self, h: torch.Tensor) -> torch.Tensor:
        for block in (self.mid.block_1, self.mid.attn_1, self.mid.block_2):
            h = self.run(block, h)
        return h


class Encoder(_Blocks):
    """Image [N, in_channels, H, W] -> moments [N, 2*z_channels, H/f, W/f]."""

    def __init__(self, cfg: DDConfig):
        super().__init__()
        ch, mult = cfg.ch, cfg.ch_mult
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        res = cfg.size[0]
        block_in = ch
        self.down = nn.ModuleList()
        for level, m in enumerate(mult):
            stage = nn.Module()
            stage.block, stage.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                stage.block.append(ResnetBlock(block_in, ch * m, cfg.dropout))
                block_in = ch * m
                if _stage(res, cfg.attn_resolutions):
                    stage.attn.append(AttnBlock(block_in))
            if level != len(mult) - 1:
                stage.downsample = Downsample(block_in)
                res //= 2
            self.down.append(stage)
        self.mid = _mid_block(block_in, cfg.dropout)
        self.norm_out = normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level, stage in enumerate(self.down):
            for i, block in enumerate(stage.block):
                h = self.run(block, h)
                if len(stage.attn):
                    h = self.run(stage.attn[i], h)
            if level != len(self.down) - 1:
                h = stage.downsample(h)
        h = self.run_mid(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(_Blocks):
    """Latent [N, z_channels, h, w] -> image [N, out_ch, h*f, w*f]."""

    def __init__(self, cfg: DDConfig):
        super().__init__()
        ch, mult = cfg.ch, cfg.ch_mult
        block_in = ch * mult[-1]
        res = cfg.size[0] // cfg.downsample_factor
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = _mid_block(block_in, cfg.dropout)
        self.up = nn.ModuleList()
        for level in reversed(range(len(mult))):
            stage = nn.Module()
            stage.block, stage.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                stage.block.append(ResnetBlock(block_in, ch * mult[level], cfg.dropout))
                block_in = ch * mult[level]
                if _stage(res, cfg.attn_resolutions):
                    stage.attn.append(AttnBlock(block_in))
            if level != 0:
                stage.upsample = Upsample(block_in)
                res *= 2
            self.up.insert(0, stage)  # upstream order: up[0] is the full-resolution stage
        self.norm_out = normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.run_mid(self.conv_in(z))
        for level in reversed(range(len(self.up))):
            stage = self.up[level]
            for i, block in enumerate(stage.block):
                h = self.run(block, h)
                if len(stage.attn):
                    h = self.run(stage.attn[i], h)
            if level != 0:
                h = stage.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


def _mid_block(channels: int, dropout: float) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, dropout)
    mid.attn_1 = AttnBlock(channels)
    mid.block_2 = ResnetBlock(channels, channels, dropout)
    return mid


class AutoencoderKL(nn.Module):
    """Encoder -> quant_conv -> DiagonalGaussian -> post_quant_conv -> Decoder."""

    def __init__(self, ddconfig: DDConfig, embed_dim: int, scale_factor: float = 0.3):
        super().__init__()
        self.ddconfig = ddconfig
        self.embed_dim = embed_dim
        self.scale_factor = scale_factor
        self.encoder = Encoder(ddconfig)
        self.decoder = Decoder(ddconfig)
        self.quant_conv = nn.Conv2d(2 * ddconfig.z_channels, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig.z_channels, 1)

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> AutoencoderKL:
        """The network `cfg` describes, after check_network_size."""
        check_network_size(cfg)
        return cls(cfg.ddconfig, cfg.embed_dim, cfg.scale_factor)

    @property
    def downsample_factor(self) -> int:
        return self.ddconfig.downsample_factor

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, sample_posterior: bool = True,
                generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each residual / attention block's activations in the backward pass
        instead of keeping them: far less training memory for about a third more compute."""
        self.encoder.gradient_checkpointing = self.decoder.gradient_checkpointing = enabled

    def get_last_layer(self) -> torch.Tensor:
        """The decoder's last weight, where the adaptive GAN weight takes its gradient norms."""
        return self.decoder.conv_out.weight


def check_network_size(cfg: ModelConfig) -> int:
    """The parameter count of the network `cfg` describes, counted on the meta device (nothing
    allocated); ConfigError over MAX_PARAMETERS."""
    with torch.device("meta"):
        count = sum(p.numel() for p in AutoencoderKL(cfg.ddconfig, cfg.embed_dim,
                                                     cfg.scale_factor).parameters())
    if count > MAX_PARAMETERS:
        raise ConfigError(f"model.ddconfig: this network has {count / 1e6:.0f} M parameters; "
                          f"the bound is {MAX_PARAMETERS / 1e6:.0f} M (first_radio.yaml's is "
                          f"55 M): check ch, ch_mult and num_res_blocks")
    return count
