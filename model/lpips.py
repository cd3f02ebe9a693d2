"""LPIPS (VGG16) without torchvision: the perceptual term of the first-stage loss.

The module tree and state-dict keys are those of taming-transformers' LPIPS, which upstream
RadioDiff checkpoints hold under `loss.perceptual_loss.` (`net.slice1.0.weight`, ...,
`lin0.model.1.weight`, `scaling_layer.shift`). Weights come from two files and never from the
network: torchvision's `vgg16-397923af.pth` in the torch hub cache (its `features.N.*` keys map
onto the slices) and the linear heads the `lpips` package ships (`weights/v0.1/vgg.pth`).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from .checkpoint import read_checkpoint

VGG16_FILE = "vgg16-397923af.pth"
VGG16_URL = f"https://download.pytorch.org/models/{VGG16_FILE}"
CHANNELS = (64, 128, 256, 512, 512)
# torchvision vgg16().features layer indices at which taming's five slices end (exclusive).
SLICE_ENDS = (4, 9, 16, 23, 30)
_VGG_LAYOUT = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]


class LPIPSWeightsError(FileNotFoundError):
    """A weight file LPIPS needs is absent; the message names the file and the way out."""


def vgg16_weights_path() -> Path:
    """Where torchvision caches the ImageNet VGG16 weights (torch hub dir / checkpoints)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE


def lpips_linear_weights_path() -> Path | None:
    """The linear-head file shipped by the `lpips` package (found without importing it)."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "weights" / "v0.1" / "vgg.pth"


def missing_weights(allow_random: bool = False) -> list[str]:
    """One message per weight file LPIPS needs and cannot find (none with `allow_random`)."""
    if allow_random:
        return []
    missing = []
    vgg, lin = vgg16_weights_path(), lpips_linear_weights_path()
    if not vgg.is_file():
        missing.append(
            f"LPIPS needs the VGG16 weights at {vgg} (download {VGG16_URL} and place it "
            "there); or set model.lossconfig.perceptual_weight: 0 to train without the "
            "perceptual term, or model.lossconfig.allow_random_lpips: true to use a random "
            "VGG backbone")
    if lin is None or not lin.is_file():
        missing.append(
            f"LPIPS needs the linear-head file {lin or 'lpips/weights/v0.1/vgg.pth'} that "
            "the `lpips` package ships (pip install lpips==0.1.4); or set "
            "model.lossconfig.perceptual_weight: 0")
    return missing


def _vgg_layers() -> list[nn.Module]:
    """torchvision's vgg16().features as a flat list, same indices (conv, relu, maxpool)."""
    layers: list[nn.Module] = []
    in_ch = 3
    for item in _VGG_LAYOUT:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(in_ch, item, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            in_ch = item
    return layers


class VGG16Slices(nn.Module):
    """VGG16 conv stack cut after relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3."""

    def __init__(self):
        super().__init__()
        layers = _vgg_layers()
        start = 0
        for i, end in enumerate(SLICE_ENDS, start=1):
            block = nn.Sequential()
            for idx in range(start, end):
                block.add_module(str(idx), layers[idx])  # keep torchvision's index in the key
            setattr(self, f"slice{i}", block)
            start = end

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for i in range(1, len(SLICE_ENDS) + 1):
            x = getattr(self, f"slice{i}")(x)
            feats.append(x)
        return feats


def torchvision_to_slices(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename torchvision `features.N.weight` keys to `sliceK.N.weight` (classifier dropped)."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] != "features":
            continue
        idx = int(parts[1])
        k = next(i for i, end in enumerate(SLICE_ENDS, start=1) if idx < end)
        out[f"slice{k}.{idx}.{parts[2]}"] = value
    return out


class ScalingLayer(nn.Module):
    """Maps [-1, 1] input to ImageNet-normalised VGG input (LPIPS's constants)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) / self.scale


class NetLinLayer(nn.Module):
    """A 1x1 conv to one channel; slot 0 is LPIPS's dropout, inert in eval, kept for the keys."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, 1, bias=False))


def _unit_normalize(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return x / (torch.sqrt(torch.sum(x * x, dim=1, keepdim=True)) + eps)


class LPIPS(nn.Module):
    """Learned perceptual distance, [N, C, H, W] in [-1, 1] -> [N, 1, 1, 1]; frozen, always eval."""

    def __init__(self):
        super().__init__()
        self.scaling_layer = ScalingLayer()
        self.net = VGG16Slices()
        for i, ch in enumerate(CHANNELS):
            setattr(self, f"lin{i}", NetLinLayer(ch))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPS:
        # Always eval: upstream's trainer switched LPIPS's dropout on by accident.
        return super().train(False)

    @classmethod
    def pretrained(cls, allow_random: bool = False) -> LPIPS:
        """LPIPS with VGG16 + linear-head weights from disk; random ones only if allowed."""
        missing = missing_weights(allow_random)
        if missing:
            raise LPIPSWeightsError("; ".join(missing))
        model = cls()
        vgg, lin = vgg16_weights_path(), lpips_linear_weights_path()
        if lin is not None and lin.is_file():
            model.load_linear_heads(lin)
        if vgg.is_file():
            model.load_vgg16(vgg)
        return model

    def load_vgg16(self, path: str | Path) -> None:
        """Load torchvision's vgg16 state dict (all 13 convs, strictly)."""
        state = read_checkpoint(path)  # weights-only; a bad file is a CheckpointError
        self.net.load_state_dict(torchvision_to_slices(state), strict=True)

    def load_linear_heads(self, path: str | Path) -> None:
        """Load the lpips package's `lin0..lin4.model.1.weight` file; every head key must match."""
        state = read_checkpoint(path)  # weights-only; a bad file is a CheckpointError
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if k.startswith("lin")]
        if missing or unexpected:
            raise KeyError(f"{path}: LPIPS head keys do not match: missing {missing}, "
                           f"unexpected {unexpected}")

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:  # radio maps: one channel seen as gray RGB
            x, y = x.repeat(1, 3, 1, 1), y.repeat(1, 3, 1, 1)
        fx = self.net(self.scaling_layer(x))
        fy = self.net(self.scaling_layer(y))
        total = 0.0
        for i, (a, b) in enumerate(zip(fx, fy)):
            diff = (_unit_normalize(a) - _unit_normalize(b)) ** 2
            total = total + getattr(self, f"lin{i}").model(diff).mean(dim=[2, 3], keepdim=True)
        return total
