"""Write the autoencoder as a diffusers `AutoencoderKL` folder (config.json + safetensors).

Only the state-dict keys are renamed (upstream Latent-Diffusion layout -> diffusers layout);
the attention's 1x1 convolutions become the linear layers diffusers uses. Writing needs only
safetensors; loading back (`AutoencoderKL.from_pretrained(DIR)`) needs the `diffusers` extra.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from model.autoencoder import AutoencoderKL
from model.manifest import sha256_file, write_safetensors

WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
CONFIG_FILE = "config.json"
# diffusers' AutoencoderKL config fields that follow from our ModelConfig (>= 0.30 layout).
_DIFFUSERS_VERSION = "0.30.0"
# How far diffusers' own forward may stray from ours (float32 both): max|err| <= REL_ERR *
# max(1, max|ours|), i.e. 1e-3 on decoded maps in [-1, 1]. The two run the same weights through
# different kernels (diffusers: linear-layer attention, its own GroupNorm), and float32 roundoff
# through ~30 normalised layers leaves ~1e-4 (the bundled model: 1.2e-4 on decode). What a
# diffusers pipeline needs: 1e-3 in [-1, 1] is 5e-4 of the [0, 1] map, an eighth of one 8-bit
# gray level (RadioMapSeer's PNG step, 100 dB / 255 = 0.39 dB; so 0.05 dB), 66 dB below the map
# range and ~30x under the VAE's own reconstruction error (36.8 dB PSNR: RMSE 0.014 of [0, 1]);
# on latents (std ~4 for the bundled model) it is far inside the posterior's own spread.
REL_ERR = 1e-3

_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
           "nin_shortcut": "conv_shortcut"}
_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_RULES = [
    (r"(encoder|decoder)\.(conv_in|conv_out)\.", r"\1.\2."),
    (r"(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out."),
    (r"(encoder|decoder)\.mid\.block_(\d)\.(\w+)\.",
     lambda m: f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{_RESNET[m[3]]}."),
    (r"(encoder|decoder)\.mid\.attn_1\.(\w+)\.",
     lambda m: f"{m[1]}.mid_block.attentions.0.{_ATTN[m[2]]}."),
    (r"encoder\.down\.(\d+)\.block\.(\d+)\.(\w+)\.",
     lambda m: f"encoder.down_blocks.{m[1]}.resnets.{m[2]}.{_RESNET[m[3]]}."),
    (r"encoder\.down\.(\d+)\.downsample\.conv\.", r"encoder.down_blocks.\1.downsamplers.0.conv."),
    (r"(quant_conv|post_quant_conv)\.", r"\1."),
]


class DiffusersFormatError(ValueError):
    """The network has a feature diffusers' AutoencoderKL cannot express."""


def _decoder_rules(levels: int) -> list:
    """Upstream numbers decoder stages from full resolution (up.0); diffusers from the latent."""
    return [
        (r"decoder\.up\.(\d+)\.block\.(\d+)\.(\w+)\.",
         lambda m: f"decoder.up_blocks.{levels - 1 - int(m[1])}.resnets.{m[2]}.{_RESNET[m[3]]}."),
        (r"decoder\.up\.(\d+)\.upsample\.conv\.",
         lambda m: f"decoder.up_blocks.{levels - 1 - int(m[1])}.upsamplers.0.conv."),
    ]


def diffusers_key(key: str, levels: int) -> str:
    """The diffusers name of one upstream state-dict key."""
    for pattern, repl in _RULES + _decoder_rules(levels):
        new, found = re.subn("^" + pattern, repl, key, count=1)
        if found:
            return new
    raise DiffusersFormatError(f"no diffusers name for state-dict key {key!r}")


def diffusers_state_dict(ae: AutoencoderKL) -> dict[str, torch.Tensor]:
    """Our weights under diffusers' names (attention 1x1 convs squeezed to linear weights)."""
    levels = len(ae.ddconfig.ch_mult)
    out = {}
    for key, value in ae.state_dict().items():
        new = diffusers_key(key, levels)
        if ".attentions." in new and new.endswith(".weight") and value.dim() == 4:
            value = value[:, :, 0, 0]
        out[new] = value.detach().float().contiguous().clone()
    return out


def diffusers_config(ae: AutoencoderKL, scaling: dict | None = None) -> dict:
    """diffusers' AutoencoderKL config.json for this network, with the latent scaling of
    model.loading.latent_scaling (default: the config's); refuses what it cannot express."""
    dd = ae.ddconfig
    if dd.attn_resolutions:
        raise DiffusersFormatError(
            f"ddconfig.attn_resolutions={dd.attn_resolutions}: diffusers' AutoencoderKL "
            "(DownEncoderBlock2D/UpDecoderBlock2D) has no attention outside the mid block; "
            "only attn_resolutions: [] (as in first_radio.yaml) can be written")
    if dd.z_channels != ae.embed_dim:
        raise DiffusersFormatError(
            f"ddconfig.z_channels={dd.z_channels} != embed_dim={ae.embed_dim}: diffusers' "
            "AutoencoderKL ties the encoder's latent width to latent_channels")
    levels = len(dd.ch_mult)
    scaling = scaling or {"scale_factor": ae.scale_factor}
    return {
        "_class_name": "AutoencoderKL", "_diffusers_version": _DIFFUSERS_VERSION,
        "in_channels": dd.in_channels, "out_channels": dd.out_ch,
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [dd.ch * m for m in dd.ch_mult],
        "layers_per_block": dd.num_res_blocks, "act_fn": "silu",
        "latent_channels": ae.embed_dim, "norm_num_groups": 32,
        "sample_size": dd.size[0], "scaling_factor": scaling["scale_factor"],
        "shift_factor": None, "latents_mean": scaling.get("latents_mean"),
        "latents_std": scaling.get("latents_std"),
        "force_upcast": True, "use_quant_conv": True, "use_post_quant_conv": True,
        "mid_block_add_attention": True,
    }


def write_diffusers(ae: AutoencoderKL, out_dir: str | Path, scaling: dict | None = None) -> dict:
    """Write config.json + safetensors into `out_dir`; returns their names and SHA-256."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = diffusers_config(ae, scaling)
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    write_safetensors(out_dir / WEIGHTS_FILE, diffusers_state_dict(ae), {"format": "pt"})
    return {"config": CONFIG_FILE, "weights": WEIGHTS_FILE,
            "sha256": sha256_file(out_dir / WEIGHTS_FILE)}


class DiffusersUnavailable(RuntimeError):
    """diffusers cannot be imported here; the message says why."""


def load_diffusers_vae(directory: str | Path) -> torch.nn.Module:
    """diffusers' AutoencoderKL.from_pretrained(directory), in eval mode."""
    try:
        from diffusers import AutoencoderKL as DiffusersAutoencoderKL
    except Exception as err:  # diffusers imports torchvision when it is installed, even broken
        while err.__cause__ is not None:  # diffusers wraps the real reason
            err = err.__cause__
        raise DiffusersUnavailable(f"cannot import diffusers.AutoencoderKL (note: diffusers "
                                   "imports torchvision whenever it is installed): "
                                   f"{type(err).__name__}: {err}") from None
    return DiffusersAutoencoderKL.from_pretrained(str(directory), low_cpu_mem_usage=False).eval()


def round_trip_mismatches(directory: str | Path, ae: AutoencoderKL) -> list[str]:
    """The written folder read back without diffusers: every tensor under its diffusers name,
    equal to ours bit for bit, and nothing else; the names of what is not (empty: exact)."""
    from safetensors.torch import load_file

    written = load_file(str(Path(directory) / WEIGHTS_FILE))
    expected = diffusers_state_dict(ae)
    wrong = sorted(set(expected) ^ set(written))
    wrong += [k for k in expected if k in written and not torch.equal(written[k], expected[k])]
    return wrong


def within_bound(err: float, reference: float) -> bool:
    """REL_ERR's bound: max|err| <= REL_ERR * max(1, max|ours|)."""
    return err <= REL_ERR * max(1.0, reference)


@torch.inference_mode()
def diffusers_parity(directory: str | Path, ae: AutoencoderKL, images: torch.Tensor) -> dict:
    """Diffusers' loaded folder against ours, per output (encode: mean, logvar; decode of our
    posterior mean): {"max_abs_err", "max_abs_ref" (max|ours|), "passed"} (within_bound)."""
    vae = load_diffusers_vae(directory)
    ae = ae.float().eval()
    theirs, ours = vae.encode(images).latent_dist, ae.encode(images)
    pairs = {"mean": (theirs.mean, ours.mean), "logvar": (theirs.logvar, ours.logvar),
             "decode": (vae.decode(ours.mean).sample, ae.decode(ours.mean))}
    report = {}
    for name, (got, want) in pairs.items():
        err, ref = float((got - want).abs().max()), float(want.abs().max())
        report[name] = {"max_abs_err": err, "max_abs_ref": ref, "passed": within_bound(err, ref)}
    return report
